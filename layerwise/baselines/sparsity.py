"""Unstructured magnitude pruning at the parameter reduction of our compact model.

The smallest-|w| weights of every Linear (GPT-2: Conv1D) weight in the backbone layers are zeroed, ranked
globally across layers (`torch.nn.utils.prune.global_unstructured`, L1), as many as our compact model
removes parameters. `prune.remove` makes the zeros permanent: the result is a plain dense model.

Dense kernels multiply zeros like any other number, so this model is exactly as slow as the teacher and
its weights take exactly as many bytes; the benchmark shows that (~1x), and the table reports it as is.

    variants = BASELINES["magnitude"](data, teacher=teacher, budget=Budget(k=2, removed=n))
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn
from torch.nn.utils import prune

from layerwise.baselines.budget import Budget, Variant, full_depth, heal_config_for, require, training_record
from layerwise.compression.distill import HealConfig, heal
from layerwise.models.recommender import SequentialRecommender


def prunable_weights(model: SequentialRecommender) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Linear and GPT-2 Conv1D inside the backbone layers."""
    return [(m, "weight") for m in model.layers.modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


def magnitude_prune(teacher: SequentialRecommender, n_removed: int
                    ) -> tuple[SequentialRecommender, list[tuple[nn.Parameter, torch.Tensor]]]:
    """A copy of `teacher` with its `n_removed` smallest-magnitude layer weights set to zero for good.

    Returns (model, masks): masks pairs each pruned weight with its 0/1 mask (same shape), for healing.
    """
    targets = prunable_weights(teacher)
    available = sum(m.weight.numel() for m, _ in targets)
    if not 0 <= n_removed <= available:
        raise ValueError(f"cannot prune {n_removed} weights: the layers' Linear weights hold {available}")
    model = copy.deepcopy(teacher)
    targets = prunable_weights(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=int(n_removed))
    masks = [(m, m.weight_mask.detach().clone()) for m, _ in targets]
    for module, name in targets:
        prune.remove(module, name)  # weight = weight_orig * mask, stored as a plain parameter
    return full_depth(model), [(m.weight, mask) for m, mask in masks]


def zero_fraction(model: SequentialRecommender) -> float:
    """Fraction of the backbone layers' parameters (norms and biases included) that are exactly zero."""
    params = list(model.layers.parameters())
    return sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)


def heal_sparse(model: SequentialRecommender, teacher: SequentialRecommender, data, config: HealConfig,
                masks: list[tuple[nn.Parameter, torch.Tensor]], progress: bool = False):
    """Heal with our recipe while pruned weights stay zero; returns the HealResult.

    Masking the gradient keeps a zero weight exactly zero under AdamW without weight decay (its moment
    estimates stay 0, so its update is 0), which is what healing uses. LoRA deltas are dense: after they
    are merged, the mask is applied once more, so the sparsity holds whatever trains.
    """
    handles = []
    for weight, mask in masks:
        # A hook needs a tensor that requires grad; `heal` then sets the flags its trainable set asks for.
        weight.requires_grad_(True)
        handles.append(weight.register_hook(lambda grad, mask=mask: grad * mask))
    try:
        result = heal(model, teacher, data, config, progress=progress)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for weight, mask in masks:
            weight.mul_(mask)
    return result


def magnitude(data, teacher=None, budget: Budget | None = None, progress: bool = False,
              **context) -> list[Variant]:
    """Registry `magnitude`: [pruned, pruned +heal] at budget.removed zeroed layer weights."""
    budget = require("magnitude", teacher, budget)
    if budget.removed is None:
        raise ValueError("magnitude pruning removes as many parameters as our compact model: set budget.removed")
    model, masks = magnitude_prune(teacher, budget.removed)
    layer_params = sum(p.numel() for p in teacher.layers.parameters())
    info = {"requested_zero_fraction": budget.removed / layer_params, "zero_fraction": zero_fraction(model),
            "scheme": "global L1 unstructured over the layers' Linear weights; dense kernels"}
    unhealed = Variant("magnitude", copy.deepcopy(model).eval(), "magnitude", None, dict(info))
    config, note = heal_config_for(model, replace(budget.heal, seed=budget.seeds[0]))
    result = heal_sparse(model, teacher, data, config, masks, progress)
    info.update(zero_fraction_after_heal=zero_fraction(model), **({"heal_note": note} if note else {}))
    return [unhealed, Variant("magnitude +heal", model.eval(), "magnitude", training_record(result), info)]
