"""Tracking: the one MLflow helper. Runs, metrics and artifacts (`runs`), the model registry (`registry`),
and the pyfunc model the registry logs (`pyfunc_model`, loaded by MLflow from its file).

    from orchestration import tracking
    tracking.ensure_experiment("layerwise", "runs")
    with tracking.tracked_run("first", {"lr": 1e-3}):
        tracking.log_metrics({"valid": {"ndcg@10": 0.1}})
"""

from orchestration.tracking.registry import load_champion, log_compact_model, promote
from orchestration.tracking.runs import (
    artifact_location,
    ensure_experiment,
    log_artifacts,
    log_figure,
    log_json,
    log_metrics,
    log_params,
    log_table_parquet,
    tracked_run,
    tracking_uri,
)

__all__ = [
    "artifact_location", "ensure_experiment", "log_artifacts", "log_compact_model", "log_figure", "log_json",
    "log_metrics", "log_params", "log_table_parquet", "load_champion", "promote", "tracked_run", "tracking_uri",
]
