"""What the `layerwise tune` tests share: the tiny search overrides and readers of a search's outputs (its
report, Optuna study and MLflow runs)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from layerwise.compression.compact import load_compact
from layerwise.evaluation.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[2]
DATA = "synthetic:300:60:6000:0"
TINY = [f"teacher.dataset={DATA}", "teacher.preset=tiny", "teacher.n_layers=4", "teacher.epochs=8",
        "teacher.lr=0.003", "space.heal_epochs=1", "space.prefit_steps=20", "protocol.calib_batches=2",
        "protocol.calib_batch_size=32", "protocol.bench_runs=5", "protocol.bench_warmup=1"]
EXPERIMENT = "layerwise-tune"


def tiny(cache: Path, *extra: str) -> list[str]:
    return [*TINY, f"teacher.cache_dir={cache}", *extra]


def timed_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["speed_status"] == "ok"]


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report" / "trials.json").read_text())


def mlflow_client(run_dir: Path) -> MlflowClient:
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry URI another test left set


def trial_runs(run_dir: Path) -> list:
    client = mlflow_client(run_dir)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune-trial'")


def study(run_dir: Path):
    state = json.loads((run_dir / "search.json").read_text())
    return optuna.load_study(study_name=state["study"], storage=f"sqlite:///{run_dir / 'optuna.db'}")


def valid_ndcg(model_dir: str, data) -> float:
    model = load_compact(model_dir).eval()
    return evaluate(model.score, data, stage="valid", exclude_seen=True, max_len=50).means["ndcg@10"]
