"""Teacher training and healing on Ray Train (`TorchTrainer`, Train V2) with DeepSpeed in every worker.

Smallest CPU run (2 workers, ZeRO-2 over gloo, tiny LLaMA, about a minute):
    PYTHONPATH=. .venv/bin/python - <<'EOF'
    from orchestration.distributed.ray_runtime import init_ray
    from layerwise.training.train import TrainConfig
    from orchestration.distributed.specs import ModelSpec
    from orchestration.distributed.training import train_teacher_distributed
    init_ray(num_cpus=2, object_store_mb=150)
    print(train_teacher_distributed("synthetic:300:120:6000:0", ModelSpec("llama", "tiny", n_layers=4),
                                    TrainConfig(epochs=4, batch_size=64, lr=3e-3), storage_path="/tmp/lw_ray"))
    EOF

This module is the driver side: it checks the arguments, starts a `TorchTrainer` and copies the best
checkpoint into place. Each worker loads the data set from a spec (never a pickled object, see
`specs`), builds the model with the same seed and runs DeepSpeed forward/backward/step (`train_loops`).
On a cluster, storage_path, data cache and teacher dir must be shared.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from layerwise.compression.distill import HealConfig
from layerwise.training.train import TrainConfig
from orchestration.distributed.deepspeed_config import deepspeed_config
from orchestration.distributed.specs import DataSpec, ModelSpec
from orchestration.distributed.train_loops import METRIC, heal_loop, teacher_loop


def train_teacher_distributed(data_spec: DataSpec | str, model_spec: ModelSpec, train_config: TrainConfig,
                              num_workers: int = 2, zero_stage: int = 2, storage_path: str = "",
                              cpus_per_worker: float = 0.5, out_dir: str | None = None,
                              name: str | None = None, use_gpu: bool = False) -> dict[str, Any]:
    """Train a teacher with `num_workers` DeepSpeed workers; Ray must be initialised by the caller.

    Args:
        data_spec: a DataSpec or a `load_dataset` name ("ml-100k", "synthetic:300:120:6000:0", a path).
        model_spec: the backbone and init seed.
        train_config: epochs, global batch size, lr, early stopping; as for `train_recommender`.
        num_workers: Ray Train workers (one DeepSpeed rank each).
        zero_stage: ZeRO stage 0-3 (see orchestration.distributed.deepspeed_config).
        storage_path: absolute directory for Ray Train's run folders and checkpoints.
        cpus_per_worker: CPUs reserved per worker (fractions let 2 workers share a 2-core machine).
        out_dir: where the best model directory is copied (default: <storage_path>/<name>/best_model).
        name: Ray Train run name, a new folder under storage_path (default: "teacher-<time>"). An
            existing one is refused: Ray would restore its old checkpoints into this run's ranking.
        use_gpu: one GPU per worker, NCCL, and DeepSpeed's GPU config (bf16, ZeRO-3 options).

    Returns:
        {"model_dir", "checkpoint_dir", "best" (metrics of the best report), "metrics" (last report),
         "history" (per-epoch records), "zero_stage" (what the engine used), "world_size"}.
    """
    if train_config.schedule != "constant" or train_config.warmup or train_config.autocast:
        raise ValueError("a learning-rate schedule, warm-up and autocast are not wired into distributed "
                         "training yet (DeepSpeed runs its own optimizer step); set ray.distributed_training=false")
    data_spec = _data_spec(data_spec)
    data = data_spec.load()  # driver-side: warms the cache once and fails early on a bad spec
    ds = _ds_args(zero_stage, train_config.lr, train_config.batch_size, num_workers, train_config.grad_clip,
                  train_config.weight_decay, use_gpu)
    loop = {"data": asdict(data_spec), "model": asdict(model_spec), "train": asdict(train_config), "ds": ds,
            "fingerprint": data.fingerprint}
    return _run_trainer(teacher_loop, loop, name or _stamp("teacher"), num_workers, cpus_per_worker,
                        storage_path, out_dir, use_gpu)


def heal_distributed(data_spec: DataSpec | str, teacher_dir: str, keep: list[int], bridge_rank: int,
                     heal_config: HealConfig, num_workers: int = 2, zero_stage: int = 2,
                     storage_path: str = "", cpus_per_worker: float = 0.5, out_dir: str | None = None,
                     name: str | None = None, use_gpu: bool = False) -> dict[str, Any]:
    """Heal the compact model `build_compact(teacher, keep, bridge_rank)` against its frozen teacher.

    Every worker loads the teacher from `teacher_dir` (shared storage on a cluster), builds the same
    student, pre-fits its bridges on the teacher's states and distils with `layerwise.compression.distill.heal_loss`.
    The pre-healing student is evaluated and checkpointed first, so healing never returns something
    worse on validation than plain removal. Arguments and return value as `train_teacher_distributed`,
    plus `keep` (sorted teacher layer indices) and `bridge_rank` (0 = no bridges). Each rank runs the
    teacher on its own batches, so `heal_config.cache_teacher` (a single-process saving) does not apply.
    """
    if heal_config.autocast:
        raise ValueError("autocast is not wired into distributed healing yet (DeepSpeed's own bf16 is a GPU "
                         "option); set heal.autocast to null or heal in one process")
    data_spec = _data_spec(data_spec)
    data = data_spec.load()
    ds = _ds_args(zero_stage, heal_config.lr, heal_config.batch_size, num_workers, 1.0, 0.0, use_gpu)
    loop = {"data": asdict(data_spec), "teacher_dir": str(Path(teacher_dir).resolve()), "keep": list(keep),
            "bridge_rank": bridge_rank, "heal": asdict(heal_config), "ds": ds,
            "fingerprint": data.fingerprint}
    return _run_trainer(heal_loop, loop, name or _stamp("heal"), num_workers, cpus_per_worker,
                        storage_path, out_dir, use_gpu)


# --- driver side ---------------------------------------------------------------------------------
def _data_spec(spec: DataSpec | str) -> DataSpec:
    return spec if isinstance(spec, DataSpec) else DataSpec(str(spec))


def _stamp(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _ds_args(stage: int, lr: float, batch_size: int, num_workers: int, grad_clip: float,
             weight_decay: float, use_gpu: bool) -> dict[str, Any]:
    """Arguments of `deepspeed_config`, checked here; each worker builds the config where its GPU is."""
    if num_workers < 1 or batch_size % num_workers:
        raise ValueError(f"batch_size {batch_size} must split evenly over {num_workers} workers")
    args = {"stage": stage, "lr": lr, "batch_size": batch_size // num_workers, "grad_clip": grad_clip,
            "weight_decay": weight_decay}
    deepspeed_config(**args)  # fails early, in the driver, on a bad stage, lr or batch size
    return {**args, "device": "cuda" if use_gpu else "cpu"}


def _run_trainer(loop_fn, loop: dict, name: str, num_workers: int, cpus_per_worker: float,
                 storage_path: str, out_dir: str | None, use_gpu: bool) -> dict[str, Any]:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not storage_path or not os.path.isabs(storage_path):
        raise ValueError(f"storage_path must be an absolute directory, got {storage_path!r}")
    if (Path(storage_path) / name).exists():
        raise ValueError(f"run {name!r} already exists in {storage_path}; choose a new name")
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        loop_fn, train_loop_config=loop, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, checkpoint_config=CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order="max")))
    result = trainer.fit()  # raises ray.train.TrainingFailedError with the worker's traceback
    best = result.get_best_checkpoint(METRIC, "max") or result.checkpoint
    if best is None:
        raise RuntimeError(f"run {name!r} reported no checkpoint")
    best_metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), {})
    target = Path(out_dir or Path(storage_path) / name / "best_model")
    _copy_dir(Path(best.path), target)
    return {"model_dir": str(target), "checkpoint_dir": best.path, "best": best_metrics,
            "metrics": result.metrics, **(result.return_value or {})}


def _copy_dir(source: Path, target: Path) -> None:
    """Copy next to the target, then rename into place: no half-copied model directory is ever seen."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)  # creates the parents too
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
