"""The report's equal-compute view: what each student cost to make against what it reached.

    entry = results["equal_compute"]     # orchestration.study.compute.equal_compute
    blocks = equal_compute_section(entry, figures)
    fig = equal_compute_plot(entry)

    entry = {"metric": str, "seeds": [int], "unit": "CPU minutes" (absent: wall minutes),
             "teacher_minutes": Estimate,
             "rows": [{"name": str, "metric": Estimate, "own_minutes": Estimate, "with_teacher_minutes": Estimate}],
             "curves": {name: [[{"epoch": int, "minutes": float, "valid": float | None}, ...] per seed]},
             "estimated": [str]}   # the runs whose minutes are estimates, named ("scratch, seed 0")

A user who has the teacher already pays only a student's own minutes; one who has not pays the teacher's
training too. The view gives both: each student's validation NDCG@10 after every epoch against its minutes,
and its test metric at the end, with the teacher's minutes charged to ours in the second panel.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from layerwise.report.format import MISSING, fmt_estimate
from layerwise.report.plots import COLORS


def equal_compute_section(entry: Mapping | None, figures) -> list:
    """The section's blocks: a paragraph, the table, the figure."""
    if not entry or not entry.get("rows"):
        return [("p", MISSING)]
    metric = str(entry.get("metric", "ndcg@10")).upper()
    unit = entry.get("unit", "wall minutes")
    teacher = fmt_estimate(entry["teacher_minutes"], "minutes")
    rows = [[r["name"], fmt_estimate(r["metric"]), fmt_estimate(r["own_minutes"], "minutes"),
             fmt_estimate(r["with_teacher_minutes"], "minutes")] for r in entry["rows"]]
    why = (" (every thread of the stage's process: unlike wall minutes, they compare stages run at other thread "
           "counts or beside other work)" if unit == "CPU minutes" else "")
    estimated = entry.get("estimated") or []
    note = (f" Estimated, for runs that recorded only wall time (their wall minutes times their stage's CPU/wall "
            f"ratio): {'; '.join(estimated)}." if estimated else "")
    return [("p", f"{unit[0].upper()}{unit[1:]}{why} of each student's own training and validation (ours: its "
                  f"importance stage, the teacher's outputs cached, its healing epochs), mean over seeds "
                  f"{entry.get('seeds')} [95% CI], and the same with the teacher's training ({teacher} minutes) "
                  f"charged to ours.{note} The figure gives validation {metric} after each epoch (one line a "
                  f"seed) and the test {metric} at the end (marker: mean over seeds)."),
            ("table", ["student", f"test {metric} [95% CI]", f"own {unit}", f"{unit}, teacher charged"], rows),
            ("img", "equal_compute", f"{metric} against training {unit}")]


def equal_compute_plot(entry: Mapping, title: str = "What each student cost, and what it reached") -> Figure:
    """Two panels: validation curves and final test points against the student's own minutes, and against
    its minutes with the teacher's training charged to ours."""
    fig = Figure(figsize=(11.0, 4.2))
    metric = str(entry.get("metric", "ndcg@10")).upper()
    teacher = float(entry["teacher_minutes"]["mean"])
    unit = entry.get("unit", "wall minutes")
    shifts = {f"own {unit}": lambda name: 0.0,
              f"{unit}, the teacher's training charged to ours": lambda name: teacher if name == "ours" else 0.0}
    for p, (label, shift) in enumerate(shifts.items()):
        ax = fig.add_subplot(1, 2, p + 1)
        for i, row in enumerate(entry["rows"]):
            name, color = row["name"], COLORS[i % len(COLORS)]
            for s, curve in enumerate(entry["curves"][name]):
                points = [(c["minutes"] + shift(name), c["valid"]) for c in curve if c["valid"] is not None]
                if points:
                    x, y = np.asarray(points, dtype=float).T
                    ax.plot(x, y, ".-", color=color, lw=1.0, alpha=0.6, label=f"{name} (valid)" if s == 0 else None)
            own = row["own_minutes"]["mean"] + shift(name)
            ax.plot([own], [row["metric"]["mean"]], "*", color=color, markersize=12, label=f"{name} (test, end)")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
