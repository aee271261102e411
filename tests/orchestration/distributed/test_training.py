"""Ray Train + DeepSpeed on CPU: the real TorchTrainer, 2 gloo workers, tiny LLaMA on learnable data.

One teacher run (ZeRO-2) and one healing run (ZeRO-3 with LoRA) are shared by the tests of this module;
together about 1.5 minutes on 2 busy cores (the first run ever also JIT-builds DeepSpeed's small
shared-memory op, about a minute, cached afterwards in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerwise.baselines import mostpop_scorer
from layerwise.compression.compact import load_compact
from layerwise.compression.distill import HealConfig
from layerwise.evaluation.evaluate import evaluate
from layerwise.models.checkpoint import load_recommender, read_manifest
from layerwise.training.train import TrainConfig, train_recommender
from orchestration.distributed.deepspeed_config import deepspeed_config
from orchestration.distributed.specs import DataSpec, ModelSpec, build_model
from orchestration.distributed.training import heal_distributed, train_teacher_distributed

# 300 users, 120 items: MostPop scores valid NDCG@10 0.087, random 0.055, a trained tiny model ~0.27.
DATA = "synthetic:300:120:6000:0"
# No dropout: then the only noise left between the 2-worker run and single-process training (same seed,
# so the same windows in every step and the same weighted gradient) is float summation order in the
# all-reduce. Measured: identical NDCG@10 to 4 decimals at every epoch. One user whose target moves one
# rank changes the mean by up to 0.0012, so 0.005 allows a few such flips and nothing more; with dropout
# 0.1 the runs differed by 0.007 (seed-to-seed spread 0.007, SE of a 300-user mean 0.021).
MODEL = ModelSpec("llama", "tiny", n_layers=4, max_len=50, dropout=0.0, seed=0)
TRAIN = TrainConfig(epochs=6, batch_size=64, lr=3e-3, eval_every=1, patience=3, seed=0)
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def data_spec(tmp_path_factory):
    return DataSpec(DATA, cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def teacher_run(ray_local, data_spec, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ray_train")
    return train_teacher_distributed(data_spec, MODEL, TRAIN, num_workers=2, zero_stage=2,
                                     storage_path=str(storage), cpus_per_worker=0.5, name="teacher")


@pytest.fixture(scope="module")
def heal_run(teacher_run, data_spec, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ray_heal")
    config = HealConfig(epochs=1, batch_size=64, lr=3e-3, trainable="lora", lora_rank=4, prefit_steps=20,
                        max_len=50, seed=0)
    return heal_distributed(data_spec, teacher_run["model_dir"], keep=[0, 3], bridge_rank=8,
                            heal_config=config, num_workers=2, zero_stage=3, storage_path=str(storage),
                            name="heal", out_dir=str(storage / "compact"))


def _valid_ndcg(model, data) -> float:
    return evaluate(model.eval().score, data, stage="valid", max_len=50).means["ndcg@10"]


@pytest.mark.slow
def test_distributed_teacher_matches_single_process_and_beats_baselines(teacher_run, data_spec):
    data = data_spec.load()
    single = build_model(MODEL, data)
    reference = train_recommender(single, data, TRAIN, progress=False)
    distributed = teacher_run["best"]["valid_ndcg@10"]
    assert abs(distributed - reference.best_valid["ndcg@10"]) <= TOLERANCE
    per_epoch = [(a["valid_ndcg@10"], b["valid_ndcg@10"]) for a, b in zip(teacher_run["history"], reference.history)]
    assert len(per_epoch) == TRAIN.epochs and all(abs(a - b) <= TOLERANCE for a, b in per_epoch), per_epoch
    mostpop = evaluate(mostpop_scorer(data), data, stage="valid").means["ndcg@10"]
    generator = torch.Generator().manual_seed(0)
    uniform = evaluate(lambda h: torch.rand(len(h), data.n_items + 1, generator=generator), data,
                       stage="valid").means["ndcg@10"]
    assert distributed > mostpop + 0.1 and distributed > uniform + 0.1, (distributed, mostpop, uniform)


@pytest.mark.slow
def test_teacher_checkpoint_is_the_best_epoch_and_loads(teacher_run, data_spec):
    data = data_spec.load()
    model = load_recommender(teacher_run["model_dir"])
    assert model.n_layers == 4 and model.n_items == data.n_items
    best = max(r["valid_ndcg@10"] for r in teacher_run["history"])
    assert teacher_run["best"]["valid_ndcg@10"] == pytest.approx(best)
    # The copied model scores exactly what rank 0 measured before saving it.
    assert _valid_ndcg(model, data) == pytest.approx(best, abs=1e-6)
    manifest = read_manifest(teacher_run["model_dir"])
    assert manifest["kind"] == "teacher" and manifest["data_fingerprint"] == data.fingerprint
    assert manifest["best_epoch"] == teacher_run["best"]["epoch"]
    suffixes = {p.suffix for p in Path(teacher_run["model_dir"]).rglob("*") if p.is_file()}
    assert suffixes == {".json", ".safetensors"}, suffixes  # no pickle anywhere


@pytest.mark.slow
def test_engine_used_the_configured_zero_stage(teacher_run, heal_run):
    assert (teacher_run["zero_stage"], teacher_run["world_size"]) == (2, 2)
    assert (heal_run["zero_stage"], heal_run["world_size"]) == (3, 2)


@pytest.mark.slow
def test_heal_under_zero3_saves_a_stock_compact_model(heal_run, teacher_run, data_spec):
    data = data_spec.load()
    student = load_compact(heal_run["model_dir"])
    assert student.n_layers == 2 and student.kept == [0, 3] and sorted(student.bridges) == ["1"]
    backbone = load_file(f"{heal_run['model_dir']}/backbone/model.safetensors")
    assert not [k for k in backbone if "lora" in k], "LoRA must be merged into plain weights"
    before = heal_run["history"][0]
    assert before["epoch"] == 0  # the pre-healing student is evaluated and checkpointed first
    assert heal_run["best"]["valid_ndcg@10"] >= before["valid_ndcg@10"]
    # The gathered ZeRO-3 partitions are the weights that were saved.
    assert _valid_ndcg(student, data) == pytest.approx(heal_run["best"]["valid_ndcg@10"], abs=1e-6)
    manifest = json.loads((Path(heal_run["model_dir"]) / "manifest.json").read_text())
    assert manifest["kind"] == "compact" and manifest["teacher_dir"] == teacher_run["model_dir"]


def test_bad_arguments_fail_before_any_worker_starts(data_spec, tmp_path):
    with pytest.raises(ValueError, match="absolute"):
        train_teacher_distributed(data_spec, MODEL, TRAIN, storage_path="relative/dir")
    with pytest.raises(ValueError, match="split evenly"):
        train_teacher_distributed(data_spec, MODEL, TrainConfig(batch_size=63), storage_path=str(tmp_path))
    with pytest.raises(ValueError, match="ZeRO stage"):
        train_teacher_distributed(data_spec, MODEL, TRAIN, zero_stage=4, storage_path=str(tmp_path))


# --- the DeepSpeed config, checked by DeepSpeed's own parser ----------------------------------------
def _parsed(config: dict):
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


def test_cpu_config_is_fp32_torch_adamw():
    config = deepspeed_config(2, 1e-3, 16, grad_clip=0.5, weight_decay=0.02)
    parsed = _parsed(config)
    assert parsed.zero_optimization_stage == 2 and parsed.train_micro_batch_size_per_gpu == 16
    assert parsed.optimizer_name == "adamw" and parsed.optimizer_params["torch_adam"] is True
    assert parsed.optimizer_params["weight_decay"] == 0.02 and parsed.gradient_clipping == 0.5
    assert not parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert "bf16" not in config and set(config["zero_optimization"]) == {"stage"}


@pytest.mark.parametrize("stage", [-1, 4, True, 2.0, "2"])
def test_bad_zero_stage_is_refused(stage):
    with pytest.raises(ValueError, match="ZeRO stage must be 0, 1, 2 or 3"):
        deepspeed_config(stage, 1e-3, 16)


def test_gpu_options_are_refused_on_cpu():
    with pytest.raises(ValueError, match="GPU options"):
        deepspeed_config(2, 1e-3, 16, bf16=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU is visible"):
            deepspeed_config(3, 1e-3, 16, device="cuda")


def test_gpu_branch_builds_a_valid_zero3_bf16_config(monkeypatch):
    # No GPU on this machine: pretend one with bf16 so the branch's output can be parsed by DeepSpeed.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    config = deepspeed_config(3, 1e-4, 4, device="cuda", offload=True)
    parsed = _parsed(config)
    assert parsed.zero_optimization_stage == 3 and parsed.bfloat16_config.enabled
    assert parsed.zero_config.gather_16bit_weights_on_model_save
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert config["optimizer"]["params"]["torch_adam"] is False  # ZeRO-Offload needs DeepSpeedCPUAdam
    assert deepspeed_config(3, 1e-4, 4, device="cuda", bf16=False)["bf16"] == {"enabled": False}
