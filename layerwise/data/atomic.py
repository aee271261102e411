"""Atomic file writes, and the RecBole atomic-file writer (`.inter/.item/.user`).

Every file we write lands under its final name only once it is complete: it is written to a temporary file
in the same directory (so `os.replace` is a rename on one file system, atomic on POSIX), and on any failure
the temporary file is removed. A reader therefore never sees a partial file, and a crash leaves no debris.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from layerwise.data.readers import DataError, Interactions


def default_cache_dir() -> Path:
    """`$LAYERWISE_CACHE_DIR`, else `~/.cache/layerwise`."""
    env = os.environ.get("LAYERWISE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "layerwise"


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` on success, delete it on any failure.

    Example:
        with atomic_path(out / "x.parquet") as tmp:
            pq.write_table(table, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a temp file behind
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(interactions: Interactions, directory: Path | str, name: str) -> Path:
    """Write RecBole atomic files `{name}.inter` (+ `.item`, `.user` when the metadata exists).

    Args:
        interactions: the log to write; its rows are written in their current order.
        directory: output folder (created if missing).
        name: the files' stem.

    Returns:
        The directory, ready for `read_atomic(directory, name)`.
    """
    directory = Path(directory)
    cols = {"user_id:token": interactions.user, "item_id:token": interactions.item}
    if interactions.rating is not None:
        cols["rating:float"] = interactions.rating
    cols["timestamp:float"] = interactions.timestamp
    table = pa.table({k.split(":")[0]: pa.array(v) for k, v in cols.items()})
    inter = directory / f"{name}.inter"
    try:
        with atomic_path(inter) as tmp, open(tmp, "wb") as f:
            f.write(("\t".join(cols) + "\n").encode())
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False, delimiter="\t",
                                                         quoting_style="none"))
    except pa.ArrowInvalid:
        # pyarrow refuses to write a quote unquoted, though RecBole files (and our reader) take quotes
        # literally. The Python writer is slower but exact, and names the line of a tab or newline.
        _write_lines(inter, list(cols), list(zip(*(v.tolist() for v in cols.values()))))
    if interactions.item_meta:
        rows = [(i, t, " ".join(g)) for i, (t, g) in interactions.item_meta.items()]
        _write_lines(directory / f"{name}.item", ["item_id:token", "movie_title:token_seq", "class:token_seq"],
                     rows)
    if interactions.user_features:
        feats = list(interactions.user_features)
        users = list(interactions.user_features[feats[0]])
        rows = [(u, *(interactions.user_features[f].get(u, "") for f in feats)) for u in users]
        _write_lines(directory / f"{name}.user", ["user_id:token"] + [f"{f}:token" for f in feats], rows)
    return directory


def _write_lines(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> None:
    """Write a small tab-separated file atomically, refusing values that would break the format."""
    for lineno, row in enumerate(rows, start=2):
        bad = next((v for v in row if any(c in str(v) for c in "\t\r\n")), None)
        if bad is not None:
            raise DataError(f"{path}, line {lineno}: value {bad!r} contains a tab or newline")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(header) + "\n")
        f.writelines("\t".join(map(str, row)) + "\n" for row in rows)
