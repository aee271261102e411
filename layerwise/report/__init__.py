"""The study's figures and its Markdown/HTML report.

    from layerwise.report import write_report
    paths = write_report(results, "runs/study/report")   # {"markdown": ..., "html": ..., "figures": {...}}
"""

from layerwise.report.document import SECTIONS, fmt_estimate, fmt_p, write_report
from layerwise.report.plots import (
    dependency_heatmap,
    importance_heatmap,
    k_sweep_plot,
    noise_plot,
    pareto_plot,
    save_figure,
    slice_plot,
)

__all__ = [
    "SECTIONS",
    "fmt_estimate",
    "fmt_p",
    "write_report",
    "dependency_heatmap",
    "importance_heatmap",
    "k_sweep_plot",
    "noise_plot",
    "pareto_plot",
    "save_figure",
    "slice_plot",
]
