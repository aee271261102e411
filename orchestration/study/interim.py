"""What a study's finished stages have measured so far, seed by seed, before its report exists: every row's
test metric, its retention of that seed's teacher, and ours against it on that seed's test users (the ratio
of their mean metric, its paired bootstrap 95% CI, and a paired Wilcoxon p, unadjusted). A study on 2 cores
spans sessions; this is how to follow it without reading per-user tables by hand.

These are interim, per-seed figures. The study's report (orchestration.study.results) pools the seeds, tests
on seed means as well as users, and Holm-adjusts across its tables; only it is the study's answer. A stage
that has not finished gives no number here, only its name under "not finished".

    layerwise study status studies/smollm2-ml100k.yaml --rows
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from orchestration.study.rows import METRIC, ROWS

FINISHED = ("done", "reused")


def interim_rows(status: Mapping, metric: str = METRIC) -> dict:
    """{"metric", "seeds": [{"seed", "rows": [entry], "not_finished": [stage names]}]} from a study status
    (orchestration.study.status.study_status). An entry: {"row", "stage", "table", "value" (the mean over
    draws), "draws", "retention" (of the seed's teacher), "vs_ours": {"ratio", "ci95", "p_value", "n"} or
    None}, in the order the stages run."""
    from layerwise.evaluation.stats import paired_test, ratio_ci

    seeds = []
    for seed in sorted({row["seed"] for row in status["stages"]}):
        stages = [row for row in status["stages"] if row["seed"] == seed]
        found = _read_rows([row for row in stages if row["state"] in FINISHED], metric)
        teacher, ours = found.get("teacher"), found.get("ours")
        entries = []
        for name, made in found.items():
            entry = {"row": name, "stage": made["stage"], "table": made["table"], "value": made["value"],
                     "draws": made["draws"], "vs_ours": None,
                     "retention": made["value"] / teacher["value"] if teacher and teacher["value"] > 0 else None}
            if ours is not None and ours["users"] is not None and name not in ("ours", "teacher") \
                    and made["users"] is not None:
                a, b = _aligned(ours, made)
                test = paired_test(a, b, test="wilcoxon")
                entry["vs_ours"] = {"ratio": a.mean() / b.mean() if b.mean() > 0 else None,
                                    "ci95": list(ratio_ci(a, b)) if b.mean() > 0 else None,
                                    "p_value": test.p_value, "n": test.n}
            entries.append(entry)
        seeds.append({"seed": seed, "rows": entries,
                      "not_finished": [row["stage"] for row in stages if row["state"] not in FINISHED]})
    return {"metric": metric, "seeds": seeds}


def format_interim(interim: Mapping) -> str:
    """The interim figures as text: a block per seed, a line per row, then the stages with no figure yet."""
    metric = interim["metric"]
    lines = [(f"Rows of the finished stages, test {metric.upper()} per seed. Interim: each seed alone, p unadjusted; "
              f"the study's report pools the seeds and Holm-adjusts.")]
    for block in interim["seeds"]:
        lines.append(f"seed {block['seed']}")
        for e in block["rows"]:
            parts = [f"{e['value']:.4f}" + (f" (mean of {e['draws']} draws)" if e["draws"] > 1 else "")]
            if e["retention"] is not None and e["row"] != "teacher":
                parts.append(f"{100 * e['retention']:.1f}% of the teacher")
            v = e["vs_ours"]
            if v and v["ratio"] is not None:
                parts.append(f"ours {100 * v['ratio']:.1f}% [{100 * v['ci95'][0]:.1f}%, {100 * v['ci95'][1]:.1f}%] "
                             f"of it, Wilcoxon p = {v['p_value']:.2g} ({v['n']} users)")
            lines.append(f"  {e['row']:<28} " + "; ".join(parts))
        if block["not_finished"]:
            lines.append(f"  not finished: {', '.join(block['not_finished'])}")
    return "\n".join(lines)


def _read_rows(stages: Sequence[Mapping], metric: str) -> dict[str, dict]:
    """Row name -> {"stage", "table", "value", "draws", "users", "values"} over the finished stages' rows.json
    (stages without one, noise and dependency, have no rows). Draws of a row (random layers) are averaged,
    per user too, as the report does."""
    found: dict[str, dict] = {}
    for stage in stages:
        folder = Path(stage["folder"])
        if not (folder / ROWS).exists():
            continue
        for row in json.loads((folder / ROWS).read_text()):
            made = found.setdefault(row["row"], {"stage": stage["stage"], "table": row.get("table"), "means": [],
                                                 "tables": []})
            made["means"].append(row["means"][metric])
            path = folder / row["per_user"] if row.get("per_user") else None
            made["tables"].append(path if path is not None and path.exists() else None)
    for made in found.values():
        made["value"], made["draws"] = float(np.mean(made.pop("means"))), len(made["tables"])
        tables = made.pop("tables")
        made["users"], made["values"] = None, None
        if tables and all(t is not None for t in tables):
            loaded = [_per_user(t, metric) for t in tables]
            for path, (users, _) in zip(tables[1:], loaded[1:]):
                if not np.array_equal(users, loaded[0][0]):
                    raise ValueError(f"{path}: its test users differ from {tables[0]}'s")
            made["users"], made["values"] = loaded[0][0], np.mean([v for _, v in loaded], axis=0)
    return found


def _per_user(path: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path, columns=["user", metric])
    return table.column("user").to_numpy(), table.column(metric).to_numpy()


def _aligned(a: Mapping, b: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Both rows' per-user values on the same users, in the same order (every row of a seed is evaluated on
    its whole test split, so a mismatch means the folders are not one study's)."""
    if not np.array_equal(a["users"], b["users"]):
        raise ValueError(f"the test users of {a['stage']} and {b['stage']} differ: not one study's stages")
    return a["values"], b["values"]
