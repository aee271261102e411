"""MLflow tracking against a real sqlite store in a temporary run directory (schema created once)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from layerwise.evaluation.evaluate import recommend
from layerwise.models.checkpoint import load_recommender, save_recommender
from orchestration.tracking import (
    artifact_location,
    ensure_experiment,
    load_champion,
    log_artifacts,
    log_compact_model,
    log_figure,
    log_json,
    log_metrics,
    log_table_parquet,
    promote,
    tracked_run,
    tracking_uri,
)
from orchestration.tracking.runs import EXPERIMENT_KIND_TAG
from tests.helpers.tiny_models import tiny_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A run directory with its sqlite store and one experiment (creating the schema takes seconds)."""
    run_dir = tmp_path_factory.mktemp("runs")
    experiment_id = ensure_experiment("layerwise-test", run_dir)
    yield run_dir, experiment_id
    mlflow.set_tracking_uri(None)


def test_default_store_is_absolute_sqlite_with_explicit_artifacts(store, monkeypatch, tmp_path):
    run_dir, experiment_id = store
    uri = tracking_uri(run_dir)
    assert uri == f"sqlite:///{run_dir.resolve()}/mlflow.db" and uri.startswith("sqlite:////")
    assert mlflow.get_tracking_uri() == uri and (run_dir / "mlflow.db").is_file()
    experiment = MlflowClient().get_experiment(experiment_id)
    assert experiment.artifact_location == (run_dir.resolve() / "mlartifacts").as_uri()
    assert artifact_location(uri) == experiment.artifact_location
    monkeypatch.chdir(tmp_path)  # relative forms resolve against the working directory, once
    assert tracking_uri("runs") == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert tracking_uri("sqlite:///rel.db") == f"sqlite:///{tmp_path.resolve()}/rel.db"
    assert tracking_uri("http://tracker:5000") == "http://tracker:5000"
    assert artifact_location("http://tracker:5000") is None
    assert ensure_experiment("layerwise-test", run_dir) == experiment_id  # idempotent


def test_experiments_open_on_their_training_runs_in_the_mlflow_ui(store):
    run_dir, experiment_id = store
    client = MlflowClient()
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment created without the tag (by an older version, or by hand) gets it on its next use.
    older = client.create_experiment("created-untagged")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert ensure_experiment("created-untagged", run_dir) == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert ensure_experiment("layerwise-test", run_dir) == experiment_id  # leaves the active one as it was


def test_params_and_metrics_read_back(store):
    params = {"lr": 1e-3, "model": {"family": "llama", "keep": [0, 3]}, "note": "x" * 7000}
    with tracked_run("train", params, tags={"stage": "teacher"}) as run:
        for step, value in enumerate([0.10, 0.15]):
            logged = log_metrics({"valid": {"ndcg@10": np.float64(value), "hr@10": value * 2},
                                  "loss": torch.tensor(1.5 - step), "name": "ignored", "none": None,
                                  "flag": True}, step=step)
    assert set(logged) == {"valid/ndcg_at_10", "valid/hr_at_10", "loss"}
    client = MlflowClient()
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["stage"] == "teacher"
    assert finished.data.params["lr"] == "0.001" and finished.data.params["model/keep"] == "[0, 3]"
    assert finished.data.params["model/family"] == "llama" and len(finished.data.params["note"]) == 6000
    assert finished.data.metrics == pytest.approx({"valid/ndcg_at_10": 0.15, "valid/hr_at_10": 0.3,
                                                   "loss": 0.5})
    history = client.get_metric_history(run.info.run_id, "valid/ndcg_at_10")
    assert [(m.step, m.value) for m in history] == [(0, 0.10), (1, 0.15)]


def test_crashing_run_ends_failed_and_keeps_partial_metrics(store):
    with pytest.raises(RuntimeError, match="diverged"):
        with tracked_run("crash", {"lr": 10.0}) as run:
            log_metrics({"loss": 2.0}, step=0)
            log_metrics({"loss": float("nan")}, step=1)
            raise RuntimeError("diverged")
    failed = MlflowClient().get_run(run.info.run_id)
    assert failed.info.status == "FAILED" and mlflow.active_run() is None
    losses = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert losses[0] == 2.0 and math.isnan(losses[1])


def test_child_runs_point_at_their_parent(store):
    with tracked_run("study") as parent:
        with tracked_run("trial-0", {"k": 4}, nested=True) as child:
            log_metrics({"retention": 0.9})
    with tracked_run("trial-1", parent_run_id=parent.info.run_id) as late:
        pass
    client = MlflowClient()
    for run in (child, late):
        assert client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_artifacts_are_stored_and_readable(store, tmp_path):
    table = tmp_path / "per_user.parquet"
    pq.write_table(pa.table({"user": [0, 1], "ndcg@10": [0.5, 0.0]}), table)
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.md").write_text("# report\n")
    figure = Figure()  # no pyplot: no global state, no display backend
    figure.subplots().plot([1, 2], [3, 4])
    with tracked_run("artifacts") as run:
        log_table_parquet(table)
        log_json({"retention": np.float32(0.5), "kept": np.array([0, 3]), "path": Path("/x")}, "summary")
        log_figure(figure, "plots/curve.png")
        log_artifacts(report, "report")
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl")))
    assert pq.read_table(local / "tables" / "per_user.parquet").column("ndcg@10").to_pylist() == [0.5, 0.0]
    assert json.loads((local / "summary.json").read_text()) == {"retention": 0.5, "kept": [0, 3], "path": "/x"}
    assert (local / "plots" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (local / "report" / "index.md").read_text() == "# report\n"


def test_model_registry_round_trip_by_champion_alias(store, tmp_path):
    model = tiny_model("llama", n_layers=2, n_items=20, max_len=12).eval()
    first = save_recommender(model, tmp_path / "v1", {"kind": "teacher", "max_len": 12})
    other = save_recommender(tiny_model("llama", n_layers=2, n_items=20, max_len=12, seed=1),
                             tmp_path / "v2", {"kind": "teacher", "max_len": 12})
    with tracked_run("register"):
        v1 = log_compact_model(first, "tiny-llama")
        v2 = log_compact_model(other, "tiny-llama")
    assert (v1, v2) == (1, 2)
    promote("tiny-llama", v2)
    promote("tiny-llama", v1)  # the alias moves back: the champion is version 1
    assert int(MlflowClient().get_model_version_by_alias("tiny-llama", "champion").version) == 1
    local = load_champion("tiny-llama", dst_dir=tmp_path / "champion")
    assert not [p for p in local.parent.parent.rglob("*") if p.suffix in (".pkl", ".pickle")]
    loaded = load_recommender(local)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    histories = [[3, 4, 5], [7], list(range(1, 20))]
    served = mlflow.pyfunc.load_model("models:/tiny-llama@champion").predict(
        pd.DataFrame({"history": histories}), params={"k": 5})
    padded = torch.zeros(3, 12, dtype=torch.long)
    padded[0, -3:], padded[1, -1], padded[2] = torch.tensor([3, 4, 5]), 7, torch.arange(8, 20)
    items, scores = recommend(model.score, padded, k=5)
    assert served["items"].tolist() == items.tolist()
    assert np.allclose(np.array(served["scores"].tolist()), scores.numpy(), atol=1e-6)


def test_logging_a_directory_that_is_not_a_model_fails_clearly(store, tmp_path):
    with tracked_run("bad-model") as run:
        with pytest.raises(FileNotFoundError, match="not a layerwise model directory"):
            log_compact_model(tmp_path, "nothing")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"
