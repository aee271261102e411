"""The worker side of `orchestration.distributed.training`: the loop each Ray Train worker runs, one
DeepSpeed rank each. `teacher_loop` trains a teacher, `heal_loop` heals a compact model against its frozen
teacher; both share the epoch loop (`_fit`), in which rank 0 evaluates, decides early stopping and reports
each improvement with a checkpoint (a `save_recommender` directory).

Each rank takes every world_size-th window of a permutation shared by all ranks (new each epoch); its loss
is weighted by its share of the global batch's targets, so step i takes the gradient of step i of
single-process `layerwise.training.train.train_recommender` (without dropout the two agree to float rounding).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from layerwise.compression.compact import build_compact, save_compact
from layerwise.compression.distill import HealConfig, heal_loss, merge_lora, prefit_bridges, trainable_parameters
from layerwise.evaluation.evaluate import evaluate
from layerwise.models import SequentialRecommender
from layerwise.models.checkpoint import load_recommender, save_recommender
from layerwise.training.train import TrainConfig, batch_loss, cloze_mask, stop_reason, training_windows
from orchestration.distributed.deepspeed_config import deepspeed_config
from orchestration.distributed.specs import DataSpec, ModelSpec, build_model

METRIC = "valid_ndcg@10"  # what checkpoints are ranked by


class _Objective(nn.Module):
    """The module DeepSpeed wraps: forward(x, y) -> scalar loss, so ZeRO-3 hooks see every use."""

    def __init__(self, model: SequentialRecommender, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn  # a plain callable; a frozen teacher inside it stays out of the engine

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, x, y)


@dataclass(frozen=True)
class _Loop:
    epochs: int
    batch_size: int  # per rank
    eval_every: int
    patience: int
    max_minutes: float | None
    seed: int
    mask_prob: float
    max_len: int


def _worker_start(config: dict) -> tuple[int, Any]:
    """Pick DeepSpeed's CPU accelerator before deepspeed is imported here, load the data set and check
    it is the driver's (a stale cache on one node would silently train on other data); (rank, data)."""
    if config["ds"]["device"] == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    data = DataSpec(**config["data"]).load()
    if data.fingerprint != config["fingerprint"]:
        raise RuntimeError(f"worker loaded {config['data']['name']} with fingerprint {data.fingerprint}, "
                           f"the driver {config['fingerprint']}: the data or its cache differ")
    return torch.distributed.get_rank(), data  # Ray Train set up the process group before calling us


def teacher_loop(config: dict) -> dict:
    rank, data = _worker_start(config)
    spec, train = ModelSpec(**config["model"]), TrainConfig(**config["train"])
    model = build_model(spec, data)
    generator = torch.Generator().manual_seed(train.seed * 1000 + rank + 1)  # negatives differ per rank

    def loss_fn(module, x, y):
        return batch_loss(module, x, y, train, generator)  # by length groups, padding cut; the same loss

    loop = _Loop(train.epochs, config["ds"]["batch_size"], train.eval_every,
                 train.patience, train.max_minutes, train.seed, train.mask_prob, spec.max_len)
    manifest = {"kind": "teacher", "preset": spec.preset, "model_spec": asdict(spec), "dataset": data.name,
                "data_fingerprint": data.fingerprint, "max_len": spec.max_len, "train": asdict(train)}
    trainable = [p for p in model.parameters() if p.requires_grad]  # an LLM with LoRA: adapters and items
    return _fit(model, trainable, loss_fn, config["ds"], data, loop, manifest, save_recommender)


def heal_loop(config: dict) -> dict:
    _, data = _worker_start(config)
    heal = HealConfig(**config["heal"])
    teacher = load_recommender(config["teacher_dir"]).requires_grad_(False)
    student = build_compact(teacher, config["keep"], config["bridge_rank"], seed=heal.seed)
    inputs, _ = training_windows(data, heal.max_len, student.causal)
    prefit = prefit_bridges(student, teacher, inputs, heal.prefit_steps, seed=heal.seed)
    teacher.to("cuda" if config["ds"]["device"] == "cuda" else "cpu")  # where the engine puts the student
    params = trainable_parameters(student, heal)

    def loss_fn(module, x, y):
        return heal_loss(module, teacher, x, y, heal)

    loop = _Loop(heal.epochs, config["ds"]["batch_size"], heal.eval_every,
                 heal.patience, heal.max_minutes, heal.seed, 0.2, heal.max_len)
    manifest = {"teacher_dir": config["teacher_dir"], "dataset": data.name, "max_len": heal.max_len,
                "data_fingerprint": data.fingerprint, "heal": asdict(heal), "prefit_mse": prefit}
    return _fit(student, params, loss_fn, config["ds"], data, loop, manifest, save=_save_compact,
                evaluate_first=True)


def _fit(model, params, loss_fn, ds_args: dict, data, loop: _Loop, manifest: dict, save,
         evaluate_first: bool = False) -> dict:
    """The epoch loop shared by training and healing; returns the history (Ray keeps rank 0's)."""
    import deepspeed

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = deepspeed_config(**ds_args)
    objective = _Objective(model, loss_fn)
    if ds_config["zero_optimization"]["stage"] == 3:
        _register_external(objective, model)
    # At ZeRO-3 rank 0 evaluates and saves a plain copy filled from the gathered partitions.
    snapshot = copy.deepcopy(model) if ds_config["zero_optimization"]["stage"] == 3 and rank == 0 else None
    engine, *_ = deepspeed.initialize(model=objective, model_parameters=params, config=ds_config)
    torch.manual_seed(loop.seed + rank)  # dropout masks differ per rank; weights were built identically
    worker = _Worker(engine, model, snapshot, data, loop, manifest, save)
    if evaluate_first:
        worker.epoch_end({"epoch": 0}, evaluate_now=True)
    for epoch in range(1, loop.epochs + 1):
        record = {"epoch": epoch, "loss": worker.train_epoch()}
        if worker.epoch_end(record, evaluate_now=epoch % loop.eval_every == 0 or epoch == loop.epochs):
            break
    return {"history": worker.history, "zero_stage": engine.zero_optimization_stage(), "world_size": world}


def _register_external(objective: nn.Module, model: SequentialRecommender) -> None:
    """ZeRO-3 gathers a weight only for its owner's forward; the item table and bias are used by
    `embed`/`head` without one, so they are declared on the wrapper whose forward does run."""
    import deepspeed

    for name, param in model.named_parameters():
        if not name.startswith(("backbone.", "bridges.")):
            deepspeed.zero.register_external_parameter(objective, param)


class _Worker:
    """One rank's training state: the engine, the plain model inside it, early stopping, the history."""

    def __init__(self, engine, model: SequentialRecommender, snapshot, data, loop: _Loop,
                 manifest: dict, save):
        self.engine, self.model, self.snapshot, self.data = engine, model, snapshot, data
        self.loop, self.manifest, self.save = loop, manifest, save
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.inputs, self.targets = training_windows(data, loop.max_len, model.causal)
        self.order_rng = torch.Generator().manual_seed(loop.seed)  # the same permutation on every rank
        self.mask_rng = torch.Generator().manual_seed(loop.seed * 1000 + self.rank)
        self.best, self.stale, self.history = -1.0, 0, []
        self.started = time.monotonic()

    def train_epoch(self) -> float:
        """One pass over this rank's share of a fresh global permutation; the mean loss of all ranks."""
        self.engine.train()
        order = torch.randperm(len(self.inputs), generator=self.order_rng)
        order = torch.cat([order, order[: (-len(order)) % self.world]])  # equal shares: equal step counts
        mine, size = order[self.rank::self.world], self.loop.batch_size
        total, steps = 0.0, 0
        for start in range(0, len(mine), size):
            x, y = self.inputs[mine[start:start + size]], self.targets[mine[start:start + size]]
            if not self.model.causal:
                x, y = cloze_mask(x, self.model.mask_index, self.loop.mask_prob, self.mask_rng)
            loss = self.engine(x.to(self.engine.device), y.to(self.engine.device))
            share = self._share(y)
            self.engine.backward(loss * share)
            self.engine.step()
            total, steps = total + loss.item() * share.item(), steps + 1
        mean = torch.tensor([total / max(steps, 1)], dtype=torch.float64, device=self.engine.device)
        torch.distributed.all_reduce(mean)
        value = mean.item() / self.world
        if not math.isfinite(value):
            raise FloatingPointError("training loss is not finite; lower the learning rate")
        return value

    def _share(self, targets: torch.Tensor) -> torch.Tensor:
        """world * (this rank's targets / all ranks' targets): DeepSpeed averages the ranks' gradients of
        per-rank means, and this weight turns that into the gradient of the mean over the whole global
        batch, which is what single-process training takes (ranks' windows hold unequal target counts)."""
        counts = torch.tensor([float((targets != 0).sum())], dtype=torch.float64, device=self.engine.device)
        total = counts.clone()
        torch.distributed.all_reduce(total)
        return (counts * self.world / total.clamp(min=1.0)).squeeze(0).float()

    def epoch_end(self, record: dict, evaluate_now: bool) -> bool:
        """Rank 0 evaluates and decides; every rank reports the same record. Returns whether to stop."""
        import ray.train

        evaluated, improved = None, False
        if evaluate_now:
            evaluated = self.full_weights()  # collective at ZeRO-3
            if self.rank == 0:
                record.update(_validate(evaluated, self.data, self.loop.max_len))
                improved = record[METRIC] > self.best
        minutes = (time.monotonic() - self.started) / 60
        shared = [record, improved, bool(self.loop.max_minutes and minutes > self.loop.max_minutes)]
        torch.distributed.broadcast_object_list(shared, src=0)
        record, improved, out_of_time = shared
        if evaluate_now:
            self.best, self.stale = (record[METRIC], 0) if improved else (self.best, self.stale + 1)
        reason = stop_reason(self.stale, self.loop.patience, out_of_time)
        if reason:
            record["stop_reason"] = reason
        self.history.append(record)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if improved and self.rank == 0:
                valid = {k.removeprefix("valid_"): v for k, v in record.items() if k.startswith("valid_")}
                path = self.save(evaluated, Path(tmp) / "model",
                                 {**self.manifest, "best_epoch": record["epoch"], "valid": valid})
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(record, checkpoint=checkpoint)
        return reason is not None

    def full_weights(self) -> SequentialRecommender | None:
        """The model with all its weights on rank 0: the trained module itself below ZeRO-3 (every rank
        holds full weights there); at ZeRO-3 the snapshot, filled from the gathered partitions."""
        if self.engine.zero_optimization_stage() < 3:
            return self.model
        import deepspeed

        named = dict(self.model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None), torch.no_grad():
            if self.snapshot is not None:
                for name, param in self.snapshot.named_parameters():
                    param.copy_(named[name].detach().to(param.device, param.dtype))
        return self.snapshot


def _validate(model: SequentialRecommender, data, max_len: int) -> dict[str, float]:
    model.eval()  # the next epoch's engine.train() switches dropout back on
    device = next(model.parameters()).device
    result = evaluate(lambda h: model.score(h.to(device)), data, stage="valid", exclude_seen=True,
                      max_len=max_len)
    return {f"valid_{k}": result.means[k] for k in ("ndcg@10", "hr@10", "mrr")}


def _save_compact(model: SequentialRecommender, path: Path, manifest: dict) -> Path:
    plain = copy.deepcopy(model)  # merging LoRA changes the modules; training goes on with the original
    merge_lora(plain)
    return save_compact(plain, path, manifest)
