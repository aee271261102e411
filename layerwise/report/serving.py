"""The report's serving view: the teacher and our compact model behind Ray Serve, at each number of clients.

    entry = results["serving"]     # orchestration.study.publish.serving_results, from a `layerwise bench-serve` JSON
    blocks = serving_section(entry, figures)
    fig = serving_plot(entry)

    entry = {"source": str, "started": str, "cpus": int | None, "settings": {name: value},
             "client": {name: value},
             "models": [{"label": str, "stage": "seed-N/<stage folder>", "layers": int,
                         "levels": [{"concurrency": int, "goodput_per_s": float, "p50_ms": float | None,
                                     "p99_ms": float | None, "refused_share": float, "other_failures": int}],
                         "paired": {"goodput_ratio": float, "p99_ratio": float | None, "met": bool} | None}]}

Each model is served alone, one after the other, on the same machine: the table gives answered requests a
second (goodput) and the answered requests' p50 and p99 at every level, and each model's req/s as a multiple
of the teacher's at the same level.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from layerwise.report.format import MISSING
from layerwise.report.plots import COLORS

HOW = ("Publish with `layerwise study report RUN_DIR --out DIR --serving SWEEP.json`, where SWEEP.json is a "
       "`layerwise bench-serve --sweep` of this study's models.")


def serving_section(entry: Mapping | None, figures) -> list:
    """The section's blocks: what was served and how, the table, the figure."""
    if not entry or not entry.get("models"):
        return [("p", MISSING), ("p", HOW)]
    models = entry["models"]
    reference = next((m for m in models if m["label"] == "teacher"), None)
    s, c = entry.get("settings") or {}, entry.get("client") or {}
    blocks = [("p", f"`layerwise bench-serve` ({entry.get('source')}, started {entry.get('started')}) served "
                    + ", ".join(f"{m['label']} ({m['stage']}, {m['layers']} layers)" for m in models)
                    + f" one at a time on {entry.get('cpus', '?')} CPUs: {s.get('num_replicas', '?')} replica of "
                      f"{s.get('torch_threads', '?')} torch thread(s), batches of up to "
                      f"{s.get('max_batch_size', '?')}, {s.get('max_queued_requests', '?')} requests queued "
                      f"before a 503. Each level is {c.get('seconds', '?')} s of closed-loop clients that "
                      f"honour Retry-After. req/s counts answered requests; p50 and p99 are of those.")]
    levels = sorted({lv["concurrency"] for m in models for lv in m["levels"]})
    header, rows = ["clients"], []
    for m in models:
        header += [f"{m['label']} req/s", f"{m['label']} p50 ms", f"{m['label']} p99 ms"]
    others = [m for m in models if reference is not None and m is not reference]
    header += [f"{m['label']} / teacher req/s" for m in others]
    for n in levels:
        row, at = [str(n)], {m["label"]: _level(m, n) for m in models}
        for m in models:
            lv = at[m["label"]]
            row += ["-"] * 3 if lv is None else [f"{lv['goodput_per_s']:.1f}", _ms(lv["p50_ms"]), _ms(lv["p99_ms"])]
        row += [_ratio(at[m["label"]], at["teacher"]) for m in others]
        rows.append(row)
    blocks.append(("table", header, rows))
    for m in others:
        ratios = [r for n in levels if (r := _ratio_value(_level(m, n), _level(reference, n))) is not None]
        peak, ref_peak = _peak(m), _peak(reference)
        if ratios and peak and ref_peak:
            blocks.append(("p", f"{m['label']}: {min(ratios):.2f}x to {max(ratios):.2f}x the teacher's req/s at "
                                f"the same level; peaks {peak['goodput_per_s']:.1f} req/s ({peak['concurrency']} "
                                f"clients) against {ref_peak['goodput_per_s']:.1f} ({ref_peak['concurrency']}), "
                                f"{peak['goodput_per_s'] / ref_peak['goodput_per_s']:.2f}x."))
    paired = [m for m in models if m.get("paired")]
    if paired:
        blocks.append(("p", "Overload, paired rounds at 4x the peak's clients (median round; target: goodput at least 90% "
                            "of the peak's, p99 at most 3x the peak's): " + "; ".join(
                                f"{m['label']} {m['paired']['goodput_ratio']:.0%} goodput, p99 "
                                f"{_times(m['paired'].get('p99_ratio'))} ({'met' if m['paired'].get('met') else 'not met'})"
                                for m in paired) + "."))
    if "serving" in figures:
        blocks.append(("img", "serving", "answered requests a second and p99 against clients"))
    return blocks


def serving_plot(entry: Mapping, title: str = "Serving: the teacher against our compact model") -> Figure:
    """Two panels against the number of clients (log scale): answered req/s, and the answered p99."""
    fig = Figure(figsize=(10.0, 4.0))
    panels = (("goodput_per_s", "answered requests / s"), ("p99_ms", "answered p99 (ms)"))
    for p, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, p + 1)
        for i, m in enumerate(entry["models"]):
            points = [(lv["concurrency"], lv[key]) for lv in m["levels"] if lv[key] is not None]
            if points:
                x, y = np.asarray(points, dtype=float).T
                ax.plot(x, y, "o-", color=COLORS[i % len(COLORS)], label=f"{m['label']} ({m['layers']} layers)")
        ax.set_xscale("log", base=2)
        levels = sorted({lv["concurrency"] for m in entry["models"] for lv in m["levels"]})
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_ylim(bottom=0)  # ratios read true from the axis
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _level(model: Mapping | None, concurrency: int) -> Mapping | None:
    return None if model is None else next((lv for lv in model["levels"] if lv["concurrency"] == concurrency), None)


def _peak(model: Mapping | None) -> Mapping | None:
    return max(model["levels"], key=lambda lv: lv["goodput_per_s"]) if model and model["levels"] else None


def _ratio_value(level: Mapping | None, reference: Mapping | None) -> float | None:
    if level is None or reference is None or not reference["goodput_per_s"]:
        return None
    return level["goodput_per_s"] / reference["goodput_per_s"]


def _ratio(level: Mapping | None, reference: Mapping | None) -> str:
    return _times(_ratio_value(level, reference))


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"
