"""The one MLflow helper, part one: store location, experiments, runs, metrics and artifacts (the model
registry is `orchestration.tracking.registry`; both are re-exported by `orchestration.tracking`).

Smallest CPU run (a local sqlite store under /tmp/lw_runs, a few seconds):
    PYTHONPATH=. .venv/bin/python - <<'EOF'
    from orchestration.tracking import ensure_experiment, log_metrics, tracked_run
    ensure_experiment("demo", "/tmp/lw_runs")
    with tracked_run("first", {"lr": 1e-3}):
        log_metrics({"valid": {"ndcg@10": 0.1}})   # logged as valid/ndcg_at_10
    EOF

The default store is sqlite in the project's run directory, `sqlite:////abs/runs/mlflow.db`, with the
artifacts in `file:///abs/runs/mlartifacts`: absolute, so that Ray workers and Tune trials (each in its
own working directory) write to the same database, and never a plain file store (MLflow 3 refuses one).
On a cluster pass the tracking server's `http://host:5000` instead of a directory. Create the experiment
in the driver (`ensure_experiment`) before starting parallel work: several processes creating the sqlite
schema at once fail.

MLflow metric names may not contain "@": `log_metrics` writes "ndcg@10" as "ndcg_at_10" (MLflow's own
spelling for ranking metrics) and flattens nested dicts with "/" ("valid/ndcg_at_10").
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

DB_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
_SQLITE = "sqlite:///"
_BAD_KEY = re.compile(r"[^/\w.\- ]")
_MAX_PARAM = 6000  # MLflow's limit on a parameter value
# MLflow 3's UI opens an experiment by its kind: untagged ones land on the GenAI overview (traces, "Detect
# Issues"), this kind on the training runs, which is what every experiment here holds.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def tracking_uri(where: str | Path) -> str:
    """A run directory -> `sqlite:////abs/dir/mlflow.db`; a relative sqlite URI is made absolute (one
    database per working directory otherwise); other URIs (http://host:5000, ...) are kept as they are."""
    text = str(where)
    if text.startswith(_SQLITE):
        return _SQLITE + str(Path(text[len(_SQLITE):]).resolve())
    if "://" in text:
        return text
    return _SQLITE + str(Path(text).resolve() / DB_NAME)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: `file:///abs/dir/mlartifacts` beside a sqlite database;
    None for a tracking server (it serves its own artifact root)."""
    if not uri.startswith(_SQLITE):
        return None
    return (Path(uri[len(_SQLITE):]).parent / ARTIFACTS_NAME).as_uri()


def ensure_experiment(name: str, where: str | Path) -> str:
    """Point MLflow at `where` (run directory or URI), create experiment `name` if needed (and so the
    sqlite schema, in this process), tagged as a model-training experiment (an older untagged one gets
    the tag too), make it the active experiment; returns its id."""
    uri = tracking_uri(where)
    if uri.startswith(_SQLITE):
        Path(uri[len(_SQLITE):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # The registry lives in the same store. Set it explicitly: an earlier set_registry_uri in this process
    # (or MLFLOW_REGISTRY_URI, which that call exports) would otherwise send registrations elsewhere.
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name, artifact_location=artifact_location(uri),
                                                     tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except MlflowException:  # another process created it between our lookup and create
            experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def tracked_run(name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                parent_run_id: str | None = None, nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the active experiment (see `ensure_experiment`) that ends FAILED when an
    exception escapes (its metrics so far are kept, the exception propagates) and FINISHED otherwise.

    Args:
        name: run name.
        params: logged flattened (nested keys joined with "/"), values as strings.
        tags: run tags.
        parent_run_id: make this a child of that run (e.g. one Tune trial under a study's run).
        nested: start inside the currently active run.
    """
    run = mlflow.start_run(run_name=name, nested=nested, parent_run_id=parent_run_id,
                           tags={k: str(v) for k, v in (tags or {}).items()})
    try:
        if params:
            log_params(params)
        yield run
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))


def log_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Log flattened parameters of the active run; returns what was logged."""
    flat = {key: _param_value(value) for key, value in _flatten(params).items()}
    if flat:
        mlflow.log_params(flat)
    return flat


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the numbers in a (nested) dict; strings, None and lists are skipped. Returns what was logged,
    under the MLflow names ("valid/ndcg_at_10")."""
    flat = {key: float(value) for key, value in _flatten(metrics).items() if _is_number(value)}
    if flat:
        mlflow.log_metrics(flat, step=step)
    return flat


def log_table_parquet(path: str | Path, artifact_path: str = "tables") -> None:
    """A Parquet file (e.g. `EvalResult.to_parquet` per-user metrics) as a run artifact."""
    mlflow.log_artifact(str(path), artifact_path)


def log_json(payload: Any, name: str) -> None:
    """A JSON artifact; numpy and torch scalars and arrays are converted."""
    name = name if name.endswith(".json") else f"{name}.json"
    mlflow.log_dict(json.loads(json.dumps(payload, default=_jsonable)), name)


def log_figure(figure, name: str) -> None:
    """A matplotlib figure as an image artifact (`name` ends in .png, .svg or .pdf)."""
    mlflow.log_figure(figure, name)


def log_artifacts(directory: str | Path, artifact_path: str | None = None) -> None:
    """Every file under `directory` (a report, a model directory) as run artifacts."""
    mlflow.log_artifacts(str(directory), artifact_path)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}/{_clean(str(key))}" if prefix else _clean(str(key))
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _clean(key: str) -> str:
    return _BAD_KEY.sub("_", key.replace("@", "_at_"))


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if hasattr(value, "ndim") and hasattr(value, "item"):  # numpy or torch scalar (0-d)
        return value.ndim == 0 and not isinstance(value.item(), bool)
    return isinstance(value, (int, float))  # NaN included: a diverged loss must show


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=_jsonable)
    return text[:_MAX_PARAM]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
