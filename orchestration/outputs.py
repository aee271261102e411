"""Command output: console tables of metrics, JSON files written atomically, file-name-safe names."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

# The columns of every metrics table: HR and NDCG at 5, 10 and 20, the figures the sequential-recommendation
# literature reports (layerwise.data.LITERATURE_METRICS; S3Rec, ICLRec, DuoRec), then MRR.
METRIC_COLUMNS = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr")


def print_metrics_table(rows: dict[str, dict[str, float]], columns, title: str | None = None) -> None:
    """rows: name -> metric -> value; prints one row per name with the given metric columns."""
    table = Table(title=title)
    table.add_column("model")
    for column in columns:
        table.add_column(column.upper().replace("PRECISION", "P"), justify="right")
    for name, metrics in rows.items():
        table.add_row(name, *(_fmt(metrics.get(c)) for c in columns))
    Console().print(table)


def write_json(path: str | Path, payload) -> Path:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def slug(name: str) -> str:
    """A file-name-safe form of a row name ("ours+int8 +heal" -> "ours-int8-heal")."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-") or "row"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
