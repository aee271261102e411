"""The study's figures, as matplotlib `Figure` objects (Agg canvas, no pyplot, no display, thread-safe).

    fig = importance_heatmap({"fisher": fisher_scores, "angular": angular_scores}, kept=[0, 3])
    save_figure(fig, "report/figures/importance.png")

Inputs are plain lists/arrays/dicts (the study's JSON), so a figure can be redrawn from saved results.
Retention is plotted in percent of the teacher; intervals are 95% CIs given as [low, high].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.text import Text

from layerwise.data.atomic import atomic_path

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as PNG to `path` atomically (a reader never sees a half-written image)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def importance_heatmap(scores: Mapping[str, Sequence[float]], kept: Sequence[int] | None = None,
                       title: str = "Layer importance by estimator") -> Figure:
    """Estimators x layers, each row min-max normalised to [0, 1] (estimators have unrelated scales).

    Args:
        scores: estimator -> (n_layers,) importance, higher = more important.
        kept: teacher layer indices the compact model keeps; their column labels are starred.
        title: figure title.
    """
    names = list(scores)
    raw = np.asarray([np.asarray(scores[n], dtype=np.float64) for n in names])
    lo, hi = raw.min(1, keepdims=True), raw.max(1, keepdims=True)
    norm = np.divide(raw - lo, hi - lo, out=np.zeros_like(raw), where=hi > lo)
    n_layers = raw.shape[1]
    fig = _figure((max(6.0, 0.55 * n_layers + 3), max(2.5, 0.45 * len(names) + 1.6)))
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    if n_layers <= 24:  # beyond that the numbers would not fit in their cells
        for (r, c), v in np.ndenumerate(norm):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 else "white")
    kept = set(kept or [])
    ax.set_xticks(range(n_layers), [f"{i}*" if i in kept else str(i) for i in range(n_layers)],
                  fontsize=8 if n_layers <= 32 else 6)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("teacher layer index (* = kept)" if kept else "teacher layer index")
    ax.set_ylabel("estimator")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="importance (row-normalised, 0-1)")
    fig.tight_layout()
    return fig


def dependency_heatmap(matrix, title: str = "Inter-layer dependency D[i, j]",
                       unit: str = "interaction in validation loss") -> Figure:
    """D[i, j] = delta(remove i and j) - delta(i) - delta(j), on a diverging colormap centred at 0.

    Args:
        matrix: (n_layers, n_layers) float.
        title: figure title; unit: the colorbar label (what a delta measures).
    """
    d = np.asarray(matrix, dtype=np.float64)
    bound = float(np.nanmax(np.abs(d))) or 1.0  # symmetric limits so 0 sits at the white centre
    n = d.shape[0]
    fig = _figure((max(5.0, 0.4 * n + 2.5), max(4.0, 0.4 * n + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(d, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound))
    if n <= 12:
        for (r, c), v in np.ndenumerate(d):
            ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=7)
    ticks = range(n) if n <= 32 else range(0, n, max(1, n // 16))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.set_xlabel("layer j (teacher index)")
    ax.set_ylabel("layer i (teacher index)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=unit)
    fig.tight_layout()
    return fig


def pareto_plot(points: Sequence[Mapping], metric: str = "NDCG@10",
                title: str = "Quality vs speed of every method") -> Figure:
    """Speedup (x) against retention (y) per method, with CI error bars, the Pareto frontier and labels
    placed so that they do not overlap each other or the markers.

    Args:
        points: one dict per method: name, speedup, retention (fraction of the teacher), optional
            speedup_ci95 / retention_ci95 [lo, hi] and group (legend entry, e.g. "ours", "pruning").
        metric: the retained metric, for the axis label.
        title: figure title.
    """
    fig = _figure((8.5, 6.0))
    ax = fig.add_subplot()
    groups = list(dict.fromkeys(p.get("group", "method") for p in points))
    for gi, group in enumerate(groups):
        members = [p for p in points if p.get("group", "method") == group]
        x = np.array([p["speedup"] for p in members], dtype=float)
        y = 100 * np.array([p["retention"] for p in members], dtype=float)
        ax.errorbar(x, y, xerr=_err(members, "speedup_ci95", x, 1.0), yerr=_err(members, "retention_ci95", y, 100.0),
                    fmt="o", color=COLORS[gi % len(COLORS)], ecolor=COLORS[gi % len(COLORS)], alpha=0.9,
                    capsize=3, markersize=6, label=group)
    xs = np.array([p["speedup"] for p in points], dtype=float)
    ys = 100 * np.array([p["retention"] for p in points], dtype=float)
    front = _pareto_front(xs, ys)
    ax.plot(xs[front], ys[front], "--", color="0.4", lw=1, label="Pareto frontier", zorder=0)
    ax.axhline(100, color="0.6", lw=0.8, ls=":", label="teacher (100%, 1x)")
    ax.axvline(1, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("speedup over the teacher (x, batch latency ratio)")
    ax.set_ylabel(f"{metric} retention (% of teacher)")
    ax.set_title(title)
    ax.margins(0.12)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    xerr, yerr = _err(points, "speedup_ci95", xs, 1.0), _err(points, "retention_ci95", ys, 100.0)
    colors = [COLORS[groups.index(p.get("group", "method")) % len(COLORS)] for p in points]
    _place_labels(fig, ax, xs, ys, [str(p["name"]) for p in points], _bar_boxes(ax, xs, ys, xerr, yerr), colors)
    return fig


def k_sweep_plot(curves: Mapping[str, Mapping], n_layers: int | None = None, metric: str = "NDCG@10",
                 title: str = "Retention against the number of kept layers k") -> Figure:
    """One line per selector with its 95% CI band.

    Args:
        curves: selector -> {"k": [...], "mean": [...] retention fractions, "ci95": [[lo, hi], ...]}.
        n_layers: the teacher's depth, shown as the top of the x axis when given.
        metric, title: axis label and title.
    """
    fig = _figure((7.0, 4.5))
    ax = fig.add_subplot()
    for i, (name, curve) in enumerate(curves.items()):
        k = np.asarray(curve["k"], dtype=float)
        mean = 100 * np.asarray(curve["mean"], dtype=float)
        color = COLORS[i % len(COLORS)]
        ax.plot(k, mean, "o-", color=color, label=name, lw=1.5, markersize=4)
        if curve.get("ci95") is not None:
            ci = 100 * np.asarray(curve["ci95"], dtype=float)
            ax.fill_between(k, ci[:, 0], ci[:, 1], color=color, alpha=0.18, lw=0)
    ax.axhline(100, color="0.5", lw=0.8, ls=":", label="teacher")
    if n_layers:
        ax.set_xlim(right=n_layers + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("kept layers k (of the teacher's" + (f" {n_layers})" if n_layers else ")"))
    ax.set_ylabel(f"{metric} retention (% of teacher)")
    ax.set_title(title)
    ax.legend(fontsize=8, title="selector (band: 95% CI)", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def noise_plot(kinds: Mapping[str, Mapping], metric: str = "NDCG@10",
               title: str = "Robustness to noisy test histories") -> Figure:
    """One panel per noise kind: metric against noise level, teacher and compact, with CI bands.

    Args:
        kinds: kind -> {"levels": [...] fractions, "<model>": {"mean": [...], "ci95": [[lo, hi], ...]}, ...}
            where every key other than "levels" is a model (e.g. "teacher", "compact").
        metric, title: axis label and title.
    """
    fig = _figure((3.6 * len(kinds) + 0.6, 3.8))
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, (kind, entry) in zip(axes, kinds.items()):
        levels = 100 * np.asarray(entry["levels"], dtype=float)
        for i, (model, series) in enumerate((m, s) for m, s in entry.items() if m != "levels"):
            color = COLORS[i % len(COLORS)]
            ax.plot(levels, series["mean"], "o-", color=color, label=model, markersize=4)
            if series.get("ci95") is not None:
                ci = np.asarray(series["ci95"], dtype=float)
                ax.fill_between(levels, ci[:, 0], ci[:, 1], color=color, alpha=0.18, lw=0)
        ax.set_title(kind.replace("_", " "), fontsize=10)
        ax.set_xlabel("noise level (% of history positions)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=8, title="band: 95% CI", title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def slice_plot(rows: Sequence[Mapping], n_worst: int = 15, metric: str = "NDCG@10",
               title: str = "Retention per evaluation slice") -> Figure:
    """Left: histogram of the retention of every slice, flagged ones stacked in red. Right: the `n_worst`
    slices as points with their 95% CIs, flagged ones (CI entirely below 100%) in red.

    Args:
        rows: `layerwise.evaluation.scenarios.slice_retention` output (name, n, retention, ci95, flagged).
        n_worst: how many of the lowest-retention slices to name.
        metric, title: axis label and title.
    """
    rows = [r for r in rows if np.isfinite(r["retention"])]
    flagged = np.array([bool(r.get("flagged")) for r in rows])
    ret = 100 * np.array([r["retention"] for r in rows])
    fig = _figure((12.0, max(4.5, 0.32 * min(n_worst, len(rows)) + 1.5)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    left.hist([ret[~flagged], ret[flagged]], bins=min(30, max(5, len(rows) // 4)), stacked=True,
              color=[COLORS[0], COLORS[1]], label=["slice", "flagged slice"])
    left.axvline(100, color="0.3", ls=":", label="teacher (100%)")
    left.set_xlabel(f"{metric} retention (% of teacher)")
    left.set_ylabel("number of slices")
    left.set_title(f"all {len(rows)} slices", fontsize=10)
    left.legend(fontsize=8)
    worst = sorted(rows, key=lambda r: r["retention"])[:n_worst][::-1]  # lowest at the top
    for is_flagged, color, label in ((False, COLORS[0], "not flagged"), (True, COLORS[1], "flagged")):
        idx = [i for i, r in enumerate(worst) if bool(r.get("flagged")) == is_flagged]
        if idx:
            mean = 100 * np.array([worst[i]["retention"] for i in idx])
            ci = 100 * np.array([worst[i]["ci95"] for i in idx], dtype=float).reshape(-1, 2)
            right.errorbar(mean, idx, xerr=np.clip([mean - ci[:, 0], ci[:, 1] - mean], 0, None), fmt="o",
                           color=color, capsize=2, markersize=5, label=label)
    right.set_yticks(range(len(worst)), [f"{r['name']} (n={r['n']})" for r in worst], fontsize=8)
    right.set_ylim(-0.7, len(worst) - 0.3)
    right.axvline(100, color="0.3", ls=":")
    right.grid(axis="x", alpha=0.3)
    right.set_xlabel(f"{metric} retention (% of teacher, 95% CI)")
    right.set_title(f"the {len(worst)} lowest (flagged: CI below 100%)", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)  # a renderer for measuring text, and savefig without pyplot
    return fig


def _err(points: Sequence[Mapping], key: str, centre: np.ndarray, scale: float) -> np.ndarray | None:
    if not all(p.get(key) is not None for p in points):
        return None
    ci = scale * np.array([p[key] for p in points], dtype=float)
    return np.clip(np.stack([centre - ci[:, 0], ci[:, 1] - centre]), 0, None)


def _pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (no other point is at least as fast AND as good), by speed."""
    keep = [i for i in range(len(x))
            if not any((x[j] >= x[i]) & (y[j] >= y[i]) & ((x[j] > x[i]) | (y[j] > y[i])) for j in range(len(x)))]
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


# Where a label may go, in points from its marker: near first, then out on a leader line. A crowd of two
# dozen methods with overlapping CIs (a real study's) needs the far rings and the in-between directions.
LABEL_RADII = (6, 14, 24, 36, 50, 68, 90, 115, 145)
LABEL_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1),
                    (1, 0.5), (-1, 0.5), (1, -0.5), (-1, -0.5), (0.5, 1), (-0.5, 1), (0.5, -1), (-0.5, -1))


def _place_labels(fig: Figure, ax, xs: np.ndarray, ys: np.ndarray, names: Sequence[str],
                  obstacles: list[tuple], colors: Sequence[str]) -> None:
    """Greedy label placement: around each point try 8 directions at growing distances and keep the
    first spot whose text box overlaps no earlier label, marker or error bar, inside the axes; a label
    pushed away from its point gets a thin leader line. Top points go first: usually the interesting ones.

    Args:
        obstacles: display-space boxes (x0, y0, x1, y1) that labels must avoid (the error bars).
        colors: one per point; a label takes its point's colour, which ties it to the right marker.
    """
    renderer = fig.canvas.get_renderer()
    pixels = ax.transData.transform(np.column_stack([xs, ys]))
    taken = [(px - 5, py - 5, px + 5, py + 5) for px, py in pixels] + list(obstacles)
    for i in np.argsort(-ys, kind="stable"):
        if not _place_one(ax, renderer, taken, names[i], xs[i], ys[i], colors[i]):
            _label(ax, names[i], xs[i], ys[i], 6, 6, False, colors[i])  # an overlap beats a lost name


def _bar_boxes(ax, xs: np.ndarray, ys: np.ndarray, xerr, yerr) -> list[tuple]:
    """Thin display-space boxes around each error bar, so that labels do not sit on them."""
    boxes = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if yerr is not None:
            (px, lo), (_, hi) = ax.transData.transform([(x, y - yerr[0, i]), (x, y + yerr[1, i])])
            boxes.append((px - 4, lo - 1, px + 4, hi + 1))
        if xerr is not None:
            (lo, py), (hi, _) = ax.transData.transform([(x - xerr[0, i], y), (x + xerr[1, i], y)])
            boxes.append((lo - 1, py - 4, hi + 1, py + 4))
    return boxes


def _place_one(ax, renderer, taken: list[tuple], name: str, x: float, y: float, color: str) -> bool:
    frame = ax.get_window_extent(renderer)
    for radius in LABEL_RADII:
        for dx, dy in LABEL_DIRECTIONS:
            text = _label(ax, name, x, y, dx * radius, dy * radius, radius > LABEL_RADII[0], color)
            text.update_positions(renderer)  # an annotation's position is otherwise only set when drawn
            box = Text.get_window_extent(text, renderer)  # the text alone, not its leader line
            bounds = (box.x0 - 2, box.y0 - 1, box.x1 + 2, box.y1 + 1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(_overlap(bounds, t) for t in taken):
                taken.append(bounds)
                return True
            text.remove()
    return False


def _label(ax, name: str, x: float, y: float, dx: float, dy: float, leader: bool, color: str):
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    arrow = {"arrowstyle": "-", "color": color, "lw": 0.6, "alpha": 0.7} if leader else None
    return ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8,
                       color=color, arrowprops=arrow)


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
