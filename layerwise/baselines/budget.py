"""What every compression baseline is given (`Budget`) and what it hands back (`Variant`).

A compression baseline turns the teacher into a model that `layerwise.evaluation.evaluate.evaluate(model.score, ...)`
and `layerwise.perf.bench.benchmark` measure unchanged: a `SequentialRecommender` (or a copy of one whose
Linear modules were swapped for quantized ones). The budget is the same for all of them: the k layers our
compact model keeps (depth methods and students), the parameters it removes (width and sparsity methods),
and our healing recipe (`HealConfig`: epochs, data, loss weights, trainable set).

    budget = Budget(k=2, heal=HealConfig(epochs=20), removed=teacher_params - compact_params)
    variants = BASELINES["first"](data, teacher=teacher, budget=budget)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from layerwise.compression.compress import DEFAULT_BRIDGE_RANK
from layerwise.compression.distill import HealConfig, HealResult, heal
from layerwise.models.recommender import SequentialRecommender
from layerwise.training.train import TrainConfig, TrainResult

DRAWS = (0, 1, 2, 3, 4)  # random layer subsets: five draws give a mean and a spread


@dataclass(frozen=True)
class Budget:
    """The resources every baseline gets.

    Attributes:
        k: layers kept by the depth methods, the students and our compact model.
        heal: our healing recipe, used unchanged wherever a baseline is trained after compression.
        bridge_rank: bridge adapters at the gaps of depth-compressed models (as ours).
        removed: parameters our compact model removes, bridges counted (teacher minus compact); the width
            and sparsity baselines remove as many. None when no baseline here needs it.
        seeds: seeds[0] seeds every method; the random-layers baseline draws once per seed.
        train: the teacher's training recipe, for the k-layer model trained from scratch.
        ablation_users: validation users our selection evaluates on; the NAS search uses the same ones.
        build: how the teacher was built, from its manifest (`pretrained`, `llm`, `head`, `dropout`), for
            the baselines that start again from the pretrained weights (`truncated`, and `scratch` on an
            LLM teacher); None for a teacher trained from scratch or a manifest that does not say.
    """

    k: int
    heal: HealConfig = field(default_factory=HealConfig)
    bridge_rank: int = DEFAULT_BRIDGE_RANK
    removed: int | None = None
    seeds: tuple[int, ...] = DRAWS
    train: TrainConfig | None = None
    ablation_users: int | None = None
    build: dict[str, Any] | None = None


@dataclass
class Variant:
    """One model a baseline produced.

    Attributes:
        row: table row; the draws of a randomised method share one row (mean and spread).
        model: has `.score(histories (B, T)) -> (B, n_items + 1)` and everything `benchmark` reads.
        timing: variants with the same key have the same architecture, so only one of them is timed.
        training: {"kind": "heal" | "train", "epochs_run", "best_epoch", "config"}, or None (no training).
        info: method-specific facts (kept layers, draw seed, sparsity, quantization scheme, ...).
    """

    row: str
    model: nn.Module
    timing: str
    training: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def require(name: str, teacher, budget: Budget | None) -> Budget:
    """Fail clearly when a compression baseline is called like a scorer baseline (data only)."""
    if teacher is None or budget is None:
        raise ValueError(f"baseline {name!r} compresses a teacher: call it with teacher=... and budget=... "
                         "(the `layerwise baselines` command does)")
    return budget


def training_record(result: HealResult | TrainResult, kind: str = "heal") -> dict[str, Any]:
    """Epochs actually run (early stopping may end before the budget), the epoch whose weights were kept,
    the recipe used (so a reader can check that it is our healing budget), and the training curve."""
    return {"kind": kind, "epochs_run": len(result.history), "best_epoch": result.best_epoch,
            "config": result.config, **training_curve(result)}


def training_curve(result: HealResult | TrainResult) -> dict[str, Any]:
    """{"curve": [...], "setup_minutes"[, "setup_cpu_minutes"]}: the result's history_curve, and the time spent
    before its first epoch (a healing run's teacher cache), in CPU minutes too where recorded. What a study's
    equal-compute view plots (orchestration.study.compute.equal_compute)."""
    setup, setup_cpu = getattr(result, "cache_seconds", None), getattr(result, "cache_cpu_seconds", None)
    return {"curve": history_curve(result.history), "setup_minutes": (setup or 0.0) / 60,
            **({"setup_cpu_minutes": setup_cpu / 60} if setup_cpu is not None else {})}


def history_curve(history: list[dict]) -> list[dict]:
    """[{"epoch", "minutes", "valid"[, "cpu_minutes"]}] from a training history (a TrainResult's, a HealResult's,
    or a saved model's manifest): after each epoch, the wall minutes so far (its epochs and their validations),
    the CPU minutes so far where every epoch up to it recorded them (runs made before they did have none), and
    the validation NDCG@10 where that epoch was validated (else None)."""
    minutes, cpu, curve = 0.0, 0.0, []
    for record in history:
        minutes += (record["train_seconds"] + record.get("valid_seconds", 0.0)) / 60
        point = {"epoch": record["epoch"], "minutes": minutes, "valid": record.get("valid_ndcg@10")}
        if cpu is not None and "train_cpu_seconds" in record:
            cpu += (record["train_cpu_seconds"] + record.get("valid_cpu_seconds", 0.0)) / 60
            point["cpu_minutes"] = cpu
        else:
            cpu = None  # an epoch without them: no CPU total from here on
        curve.append(point)
    return curve


def heal_config_for(model: SequentialRecommender, config: HealConfig) -> tuple[HealConfig, str | None]:
    """Our healing recipe for a model that may have no bridges.

    "bridges" trains the bridge adapters only; a model without bridges (full depth, or a student built
    without them) would have nothing to train, so it trains every weight instead and says so.
    Returns (config, note or None).
    """
    if config.trainable == "bridges" and not len(getattr(model, "bridges", {})):
        return replace(config, trainable="all"), "trainable 'bridges' -> 'all' (the model has no bridges)"
    return config, None


def full_depth(model: SequentialRecommender) -> SequentialRecommender:
    """Mark a model that keeps every teacher layer, so healing pairs its layer j with teacher layer j."""
    model.kept = list(range(model.n_layers))
    model.teacher_layers = model.n_layers
    return model


def healed_pair(student: SequentialRecommender, teacher: SequentialRecommender, data, config: HealConfig,
                row: str, timing: str, info: dict[str, Any], progress: bool = False) -> list[Variant]:
    """[unhealed, healed]: a copy of `student` as it is, then `student` healed with `config`."""
    config, note = heal_config_for(student, config)
    unhealed = Variant(row, copy.deepcopy(student).eval(), timing, None, dict(info))
    result = heal(student, teacher, data, config, progress=progress)
    info = {**info, "heal_note": note} if note else dict(info)
    return [unhealed, Variant(f"{row} +heal", student.eval(), timing, training_record(result), info)]


def n_parameters(module: nn.Module) -> int:
    """Distinct parameters (tied tensors once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
