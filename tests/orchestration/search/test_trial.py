"""One search trial, run twice in Ray workers, measures the same model: the same retention, the same
bridges. Ray starts every worker with its own torch random state, so anything a trial draws without its
seed differs between runs."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import ray
import torch

from layerwise.compression.compact import load_compact
from layerwise.models.checkpoint import save_recommender
from layerwise.training.train import TrainConfig, train_recommender
from orchestration.distributed.specs import DataSpec, ModelSpec, build_model
from orchestration.search.space import Protocol
from orchestration.search.trial import _measure_trial, valid_ndcg

DATA = "synthetic:300:60:6000:0"
CONFIG = {"layers": 2, "bridge_rank": 4, "selector": "topk", "method": "block_influence", "heal_epochs": 1,
          "lr": 1e-3, "trainable": "all", "prefit_steps": 0}  # no pre-fit: the bridges keep their initial draw


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict:
    """The context a search hands its trials, around a tiny trained 4-layer teacher."""
    root = tmp_path_factory.mktemp("trial")
    spec = DataSpec(DATA, cache_dir=str(root / "cache"))
    data = spec.load()
    teacher = build_model(ModelSpec("llama", "tiny", n_layers=4, max_len=50, dropout=0.1, seed=0), data)
    train_recommender(teacher, data, TrainConfig(epochs=3, lr=3e-3, seed=0), progress=False)
    save_recommender(teacher, root / "teacher", {"kind": "teacher", "data_fingerprint": data.fingerprint,
                                                 "max_len": 50})
    protocol = asdict(Protocol(calib_batches=2, calib_batch_size=32, bench_batch_size=4, bench_runs=5,
                                 bench_warmup=1))
    return {"data": asdict(spec), "teacher_dir": str(root / "teacher"), "max_len": 50, "protocol": protocol,
            "teacher_valid_ndcg": valid_ndcg(teacher, data, 50), "run_dir": str(root / "run"),
            "distributed_heal": False, "threads": 1}


@ray.remote(num_cpus=0.5)
def trial_in_a_worker(config: dict, ctx: dict, trial_id: str, torch_seed: int) -> dict:
    torch.manual_seed(torch_seed)  # as a fresh worker would be: a random state of its own
    torch.set_num_threads(ctx["threads"])
    return _measure_trial(config, ctx, trial_id)[0]


@pytest.mark.slow
def test_the_same_trial_twice_gives_the_same_retention(ray_local, ctx):
    first, second = ray.get([trial_in_a_worker.remote(CONFIG, ctx, "a", 1),
                             trial_in_a_worker.remote(CONFIG, ctx, "b", 2)])
    assert first["kept"] == second["kept"]
    assert first["retention"] == second["retention"] and first["valid_ndcg_at_10"] == second["valid_ndcg_at_10"]
    bridges = [load_compact(r["model_dir"]).bridges.state_dict() for r in (first, second)]
    assert bridges[0] and bridges[0].keys() == bridges[1].keys()
    assert all(torch.equal(bridges[0][k], bridges[1][k]) for k in bridges[0])
