"""Every study figure renders from synthetic inputs to a readable PNG with labelled axes and legends."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.text import Annotation, Text

from layerwise.report import plots


def importance_scores(n_layers: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    base = np.linspace(1, 0.2, n_layers) + rng.normal(0, 0.1, n_layers)
    return {name: base * scale + rng.normal(0, 0.05 * scale, n_layers)
            for name, scale in (("fisher", 1e-3), ("taylor", 0.5), ("param_fisher", 30.0), ("block_influence", 0.2),
                                ("angular", 0.1), ("activation", 2.0), ("ablation", 0.05), ("combined", 1.0))}


def pareto_points() -> list[dict]:
    """A realistic crowd: many methods near 1x speed and near 100% retention, where labels collide."""
    rng = np.random.default_rng(1)
    specs = [("ours k=2", "ours", 3.4, 0.91), ("ours k=4", "ours", 1.9, 0.97), ("random", "depth", 3.4, 0.62),
             ("uniform", "depth", 3.4, 0.74), ("first-k", "depth", 3.4, 0.55), ("last-k", "depth", 3.4, 0.58),
             ("ShortGPT", "depth", 3.4, 0.80), ("Gromov angular", "depth", 3.4, 0.78),
             ("magnitude 75%", "pruning", 1.0, 0.40), ("width 75%", "pruning", 2.6, 0.66),
             ("INT8", "quantization", 1.3, 0.99), ("INT4", "quantization", 1.05, 0.97),
             ("ours + INT8", "ours", 3.9, 0.90), ("DistilBERT-style", "distillation", 3.4, 0.86),
             ("TinyBERT-style", "distillation", 3.4, 0.87), ("from scratch", "distillation", 3.4, 0.83),
             ("NAS (Optuna)", "search", 3.4, 0.88)]
    out = []
    for name, group, speed, ret in specs:
        s_half, r_half = rng.uniform(0.03, 0.15), rng.uniform(0.01, 0.04)
        out.append({"name": name, "group": group, "speedup": speed, "retention": ret,
                    "speedup_ci95": [speed - s_half, speed + s_half], "retention_ci95": [ret - r_half, ret + r_half]})
    return out


def curves() -> dict[str, dict]:
    k = np.array([1, 2, 3, 4, 6, 8])
    out = {}
    for name, top in (("ours (beam)", 0.98), ("random", 0.85), ("uniform", 0.9)):
        mean = top - 0.5 * np.exp(-k / 2) * (1.2 if name == "random" else 1.0)
        out[name] = {"k": k.tolist(), "mean": mean.tolist(), "ci95": np.stack([mean - 0.03, mean + 0.03], 1).tolist()}
    return out


def noise_results() -> dict[str, dict]:
    levels = [0.0, 0.1, 0.2, 0.4]
    out = {}
    for kind, slope in (("replace_uniform", 0.06), ("replace_popularity", 0.05), ("drop", 0.03), ("reorder", 0.01)):
        entry = {"levels": levels}
        for model, start in (("teacher", 0.075), ("compact", 0.068)):
            mean = start - slope * np.asarray(levels) * 0.5
            entry[model] = {"mean": mean.tolist(), "ci95": np.stack([mean - 0.004, mean + 0.004], 1).tolist()}
        out[kind] = entry
    return out


def slice_rows(n: int = 124) -> list[dict]:
    rng = np.random.default_rng(2)
    rows = []
    for i in range(n):
        ret = rng.normal(0.92, 0.08)
        half = rng.uniform(0.03, 0.12)
        rows.append({"name": f"occupation=admin & activity=q{i % 10 + 1}/10 #{i}", "n": int(rng.integers(20, 300)),
                     "teacher": 0.07, "compact": 0.07 * ret, "retention": ret, "ci95": [ret - half, ret + half],
                     "p_holm": 0.5, "flagged": ret + half < 1 and ret < 0.8})
    return rows


def _texts_overlap(fig, texts) -> list[tuple[str, str]]:
    fig.canvas.draw()  # positions as saved
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts if t.get_text()]
    return [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb)]


def _check_png(fig, path) -> None:
    plots.save_figure(fig, path)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))  # atomic: no temporary file left


def _labelled(ax) -> None:
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def dense_points() -> list[dict]:
    """The crowd of a real 5-seed ml-100k study (rounded): two dozen methods inside 3-4x and 90-105%, with
    CIs wider than the gaps between them, three of them on one retention."""
    rows = [("teacher", "teacher", 1.0, 1.0, 0, 0), ("ours", "ours", 3.76, 1.022, 0.37, 0.078),
            ("random", "depth", 3.46, 0.801, 0.3, 0.076), ("random +heal", "depth", 3.46, 1.007, 0.3, 0.048),
            ("uniform", "depth", 3.71, 0.729, 0.28, 0.014), ("uniform +heal", "depth", 3.71, 1.003, 0.28, 0.073),
            ("first", "depth", 3.67, 0.918, 0.4, 0.05), ("first +heal", "depth", 3.67, 1.03, 0.4, 0.057),
            ("last", "depth", 3.6, 0.623, 0.33, 0.02), ("last +heal", "depth", 3.6, 1.025, 0.33, 0.065),
            ("shortgpt", "depth", 3.74, 0.918, 0.46, 0.05), ("shortgpt +heal", "depth", 3.74, 1.03, 0.46, 0.057),
            ("gromov", "depth", 3.56, 0.918, 0.33, 0.05), ("gromov +heal", "depth", 3.56, 1.03, 0.33, 0.057),
            ("nas", "search", 3.7, 0.926, 0.37, 0.022), ("nas +heal", "search", 3.7, 1.005, 0.37, 0.077),
            ("magnitude", "pruning", 1.11, 0.948, 0.09, 0.044), ("magnitude +heal", "pruning", 1.11, 1.035, 0.09, 0.024),
            ("width", "pruning", 3.12, 0.874, 0.3, 0.07), ("width +heal", "pruning", 3.12, 0.992, 0.3, 0.077),
            ("int8", "quantization", 0.96, 0.994, 0.08, 0.016), ("int4", "quantization", 0.79, 0.997, 0.06, 0.014),
            ("ours+int8", "quantization", 3.53, 1.022, 0.45, 0.088), ("distilbert", "students", 3.5, 1.04, 0.3, 0.059),
            ("tinybert", "students", 3.55, 0.989, 0.33, 0.053), ("scratch", "students", 3.57, 1.015, 0.41, 0.064)]
    return [{"name": name, "group": group, "speedup": x, "retention": y, "speedup_ci95": [x - dx, x + dx],
             "retention_ci95": [y - dy, y + dy]} for name, group, x, y, dx, dy in rows]


def _covered_labels(fig, ax, points) -> list[str]:
    """Labels whose text box covers another point's marker or the legend."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    centres = ax.transData.transform([(p["speedup"], 100 * p["retention"]) for p in points])
    legend = ax.get_legend().get_window_extent(renderer)
    covered = []
    for t in (t for t in ax.texts if isinstance(t, Annotation)):
        box = Text.get_window_extent(t, renderer)
        on_marker = any(box.x0 - 4 < x < box.x1 + 4 and box.y0 - 4 < y < box.y1 + 4 for x, y in centres)
        if on_marker or box.overlaps(legend):
            covered.append(t.get_text())
    return covered


def test_pareto_labels_stay_readable_in_a_dense_crowd(tmp_path):
    points = dense_points()
    fig = plots.pareto_plot(points)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert sorted(t.get_text() for t in labels) == sorted(p["name"] for p in points)
    assert _texts_overlap(fig, labels) == []
    assert _covered_labels(fig, ax, points) == []
    _check_png(fig, tmp_path / "pareto_dense.png")


def test_importance_heatmap(tmp_path):
    fig = plots.importance_heatmap(importance_scores(), kept=[0, 5])
    ax = fig.axes[0]
    _labelled(ax)
    image = ax.get_images()[0].get_array()
    assert image.shape == (8, 12)
    np.testing.assert_allclose(image.min(1), 0)
    np.testing.assert_allclose(image.max(1), 1)
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["0*", "1"]
    assert len(ax.texts) == 8 * 12  # one annotation per cell
    assert fig.axes[1].get_ylabel()  # the colorbar says what the colour means
    _check_png(fig, tmp_path / "importance.png")


def test_dependency_heatmap_is_centred_at_zero(tmp_path):
    d = np.random.default_rng(3).normal(0, 0.01, (8, 8)) + 0.02 * np.eye(8)
    fig = plots.dependency_heatmap(d)
    ax = fig.axes[0]
    _labelled(ax)
    norm = ax.get_images()[0].norm
    assert norm.vcenter == 0 and norm.vmin == -norm.vmax == -np.abs(d).max()
    assert ax.get_images()[0].get_cmap().name == "RdBu_r"
    _check_png(fig, tmp_path / "dependency.png")


def test_pareto_plot_has_error_bars_a_legend_and_no_overlapping_labels(tmp_path):
    points = pareto_points()
    fig = plots.pareto_plot(points)
    ax = fig.axes[0]
    _labelled(ax)
    labels = [t for t in ax.texts if isinstance(t, Annotation)]
    assert sorted(t.get_text() for t in labels) == sorted(p["name"] for p in points)
    assert _texts_overlap(fig, labels) == []
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"ours", "depth", "pruning", "quantization", "distillation", "search", "Pareto frontier"} <= set(legend)
    assert len(ax.containers) == 6  # one errorbar container per group
    _check_png(fig, tmp_path / "pareto.png")


def test_pareto_front_keeps_only_non_dominated_points():
    front = plots._pareto_front(np.array([1.0, 2.0, 2.0, 3.0]), np.array([0.99, 0.9, 0.8, 0.7]))
    assert front.tolist() == [0, 1, 3]


def test_k_sweep_plot(tmp_path):
    fig = plots.k_sweep_plot(curves(), n_layers=8)
    ax = fig.axes[0]
    _labelled(ax)
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 3  # one CI band each
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ours (beam)", "random", "uniform", "teacher"]
    assert ax.lines[0].get_ydata()[-1] == pytest.approx(100 * curves()["ours (beam)"]["mean"][-1])
    _check_png(fig, tmp_path / "k_sweep.png")


def test_noise_plot_has_one_panel_per_kind(tmp_path):
    fig = plots.noise_plot(noise_results())
    assert len(fig.axes) == 4 and fig.get_suptitle()
    assert all(ax.get_xlabel() and ax.get_title() for ax in fig.axes) and fig.axes[0].get_ylabel()
    assert all(len(ax.lines) == 2 for ax in fig.axes)  # teacher and compact in every panel
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["teacher", "compact"]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), [0, 10, 20, 40])
    _check_png(fig, tmp_path / "noise.png")


def test_slice_plot_marks_flagged_slices(tmp_path):
    rows = slice_rows()
    fig = plots.slice_plot(rows, n_worst=15)
    left, right = fig.axes
    for ax in (left, right):
        assert ax.get_xlabel() and ax.get_title()
    assert left.get_ylabel() and left.get_legend() is not None
    assert len(right.get_yticklabels()) == 15
    shown = {c.get_label(): len(c.lines[0].get_xdata()) for c in right.containers}
    n_flagged = sum(r["flagged"] for r in sorted(rows, key=lambda r: r["retention"])[:15])
    assert shown == {"flagged": n_flagged, "not flagged": 15 - n_flagged} and n_flagged > 0
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["not flagged", "flagged"]
    assert _texts_overlap(fig, right.get_yticklabels()) == []
    _check_png(fig, tmp_path / "slices.png")
