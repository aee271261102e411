"""From a trained teacher to a healed compact model: calibrate, score, select, build, heal.

Smallest run (tiny synthetic data, CPU, seconds):
    layerwise compress --teacher /tmp/teacher --dataset synthetic:300:60:6000:0 --keep 0.5 --out /tmp/c

This is the single-process path. `orchestration/` runs the same steps with importance sharded over Ray
tasks and healing under Ray Train + DeepSpeed; the library functions here are what they call.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from layerwise.compression.compact import build_compact
from layerwise.compression.dependency import dependency_matrix
from layerwise.compression.distill import HealConfig, HealResult, heal
from layerwise.compression.importance import IMPORTANCE, angular_blocks, make_rescorer
from layerwise.models.recommender import SequentialRecommender
from layerwise.compression.select import SELECTORS
from layerwise.training.train import _validate, cloze_mask, training_windows

# Bridges off by default: on ml-100k (small LLaMA, k = 2 of 8, beam, 3 healing seeds) rank 0 healed to
# NDCG@10 0.1180 vs 0.1161 at rank 16 (paired t p = 0.32), and a model without bridges runs faster
# (benchmarks/selector_table.py --heal-seeds 3, with --bridge-rank 0 and 16). Bridges stay one flag away.
DEFAULT_BRIDGE_RANK = 0

# What each selector needs besides `scores`; the default method is the score it ranks by.
SELECTOR_METHOD = {
    "topk": "block_influence", "greedy": "block_influence", "beam": "ablation_loss",
    "contiguous": "angular", "uniform": None, "random": None, "first": None, "last": None,
}

# Deeper than this, a compression that names no selector uses one that needs no dependency matrix: `beam`
# searches over it, and it costs 1 + L + L(L-1)/2 evaluations of the model on the validation users (466 for
# a 30-layer LLM: hours on 2 CPU cores). `combined` ranks by the local estimators, weighted on validation.
BEAM_MAX_LAYERS = 12


def default_selection(n_layers: int) -> dict[str, str | None]:
    """{"selector", "method"} for a teacher of `n_layers` when none is named: `beam` on the loss ablation up
    to BEAM_MAX_LAYERS layers, `topk` on `combined` scores beyond."""
    if n_layers <= BEAM_MAX_LAYERS:
        return {"selector": "beam", "method": None}
    return {"selector": "topk", "method": "combined"}


@dataclass(frozen=True)
class CompressConfig:
    """How to compress. keep: a fraction of the teacher's layers (0 < keep <= 1) or a count (>= 1)."""

    keep: float = 0.25
    selector: str = "beam"
    method: str | None = None  # importance estimator; None = the selector's default
    bridge_rank: int = DEFAULT_BRIDGE_RANK
    calib_batches: int = 8
    calib_batch_size: int = 64
    ablation_users: int | None = None  # validation users for ablation/dependency (None = all)
    seed: int = 0
    heal: HealConfig = field(default_factory=HealConfig)
    do_heal: bool = True


@dataclass
class CompressResult:
    model: SequentialRecommender
    kept: list[int]
    scores: dict[str, list[float]]
    unhealed_valid: dict[str, float]
    heal: HealResult | None
    seconds: dict[str, float]

    def manifest(self, config: CompressConfig) -> dict[str, Any]:
        """What goes into the compact model's manifest: the recipe and its measured outcome."""
        return {
            "selector": config.selector, "method": config.method or SELECTOR_METHOD[config.selector],
            "bridge_rank": config.bridge_rank, "importance": self.scores,
            "unhealed_valid": self.unhealed_valid,
            "valid": self.heal.best_valid if self.heal else self.unhealed_valid,
            "heal": {"best_epoch": self.heal.best_epoch, "config": self.heal.config,
                     "prefit_mse": self.heal.prefit_mse} if self.heal else None,
            "seconds": self.seconds,
        }


def n_kept(keep: float, n_layers: int) -> int:
    """Layers to keep: a fraction (0, 1] rounds to the nearest count (at least 1), a number >= 1 is a count."""
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep}")
    k = max(1, round(keep * n_layers)) if keep <= 1 else int(keep)
    if k > n_layers or (keep > 1 and keep != math.floor(keep)):
        raise ValueError(f"cannot keep {keep} of {n_layers} layers")
    return k


def calibration_batches(model: SequentialRecommender, data, n_batches: int, batch_size: int,
                        max_len: int = 50, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random training windows as (inputs (B, T), targets (B, T)) batches; encoders get cloze masks."""
    inputs, targets = training_windows(data, max_len, model.causal)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)[: n_batches * batch_size]
    batches = []
    for start in range(0, len(order), batch_size):
        x, y = inputs[order[start:start + batch_size]], targets[order[start:start + batch_size]]
        if not model.causal:
            x, y = cloze_mask(x, model.mask_index, 0.2, generator)
        batches.append((x, y))
    return batches


def select_layers(teacher: SequentialRecommender, data, k: int, selector: str,
                  method: str | None, batches, ablation_users: int | None = None, seed: int = 0,
                  precomputed: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[list[int], dict[str, list[float]]]:
    """Run `selector` with the scores it needs; returns (kept teacher indices, scores used).

    precomputed: scores already computed elsewhere (e.g. sharded over Ray tasks), keyed by method name
    and "dependency"; whatever is missing is computed here.
    """
    precomputed = precomputed or {}
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose from {sorted(SELECTORS)}")
    method = method or SELECTOR_METHOD[selector]
    context: dict[str, Any] = {"data": data, "k": k, "seed": seed, "max_users": ablation_users}
    scores = torch.zeros(teacher.n_layers, dtype=torch.float64)
    used: dict[str, list[float]] = {}
    if method is not None:
        if method not in IMPORTANCE:
            raise ValueError(f"unknown importance method {method!r}; choose from {sorted(IMPORTANCE)}")
        scores = precomputed.get(method)
        if scores is None:
            scores = IMPORTANCE[method](teacher, batches, **context)
        used[method] = scores.tolist()
    if selector == "greedy":
        context["rescore"] = make_rescorer(teacher, batches, method, **context)
    if selector == "beam":
        metric = "loss" if method == "ablation_loss" else "ndcg@10"
        dependency = precomputed.get("dependency")
        if dependency is None:
            dependency = dependency_matrix(teacher, batches, data=data, metric=metric,
                                           max_users=ablation_users, seed=seed)
        context["dependency"] = dependency
        used["dependency"] = dependency.tolist()
    if selector == "contiguous":
        context["block_scores"] = angular_blocks(teacher, batches, teacher.n_layers - k)
        used["angular_blocks"] = context["block_scores"].tolist()
    context.pop("k")  # selectors take k positionally
    return SELECTORS[selector](scores, k, **context), used


def compress(teacher: SequentialRecommender, data, config: CompressConfig = CompressConfig(),
             progress: bool = True, precomputed: dict[str, torch.Tensor] | None = None,
             ) -> CompressResult:
    """Select k layers of `teacher`, build the physically smaller model with bridges, and heal it.

    precomputed: importance scores (and "dependency") computed elsewhere, e.g. sharded on Ray.
    """
    teacher.eval()
    k = n_kept(config.keep, teacher.n_layers)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    batches = calibration_batches(teacher, data, config.calib_batches, config.calib_batch_size,
                                  config.heal.max_len, config.seed)
    kept, scores = select_layers(teacher, data, k, config.selector, config.method, batches,
                                 config.ablation_users, config.seed, precomputed)
    seconds["select"] = time.perf_counter() - started
    student = build_compact(teacher, kept, config.bridge_rank, seed=config.seed)
    unhealed = _validate(student, data, config.heal.max_len)
    result = CompressResult(student, kept, scores, unhealed, None, seconds)
    if config.do_heal:
        started = time.perf_counter()
        heal_config = replace(config.heal, seed=config.seed)
        result.heal = heal(student, teacher, data, heal_config, progress=progress)
        seconds["heal"] = time.perf_counter() - started
    student.eval()
    return result


def config_dict(config: CompressConfig) -> dict[str, Any]:
    """JSON-able form of a CompressConfig (for manifests and MLflow params)."""
    return asdict(config)
