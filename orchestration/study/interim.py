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

from collections.abc import Mapping
from pathlib import Path

from orchestration.study.rows import METRIC, Rows

FINISHED = ("done", "reused")


def interim_rows(status: Mapping, metric: str = METRIC) -> dict:
    """{"metric", "seeds": [{"seed", "rows": [entry], "not_finished": [stage names]}]} from a study status
    (orchestration.study.status.study_status). An entry: {"row", "stage", "table", "value" (the mean over
    draws), "draws", "retention" (of the seed's teacher), "vs_ours": {"ratio", "ci95", "p_value", "n"} or
    None}, in the order the stages run. The rows are read as the report reads them (driver.collect_rows,
    rows.Rows: draws averaged, per user too; every table checked to cover the same users)."""
    from layerwise.evaluation.stats import paired_test, ratio_ci
    from orchestration.study.driver import collect_rows

    seeds = []
    for seed in sorted({row["seed"] for row in status["stages"]}):
        stages = [row for row in status["stages"] if row["seed"] == seed]
        dirs = {row["stage"]: Path(row["folder"]) for row in stages if row["state"] in FINISHED}
        table = Rows(collect_rows({seed: dirs}), [seed], metric)
        value = {name: float(table.seed_means(name)[0]) for name in table.by_name}
        teacher = value.get("teacher")
        entries = []
        for name in table.by_name:
            first = table.first(name)
            entry = {"row": name, "stage": first["stage"], "table": first["table"], "value": value[name],
                     "draws": len(table.by_name[name][seed]), "vs_ours": None,
                     "retention": value[name] / teacher if teacher else None}
            if "ours" in table.by_name and name not in ("ours", "teacher"):
                a, b = table.per_user("ours"), table.per_user(name)
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
