"""TinyBERT/MiniLM-style student: distils hidden states and attention maps, not only the outputs.

Student layer j is initialised from, and imitates, teacher layer keep[j] (keep = every (L/k)-th layer,
as the DistilBERT student, so the two differ only in what they distil). The loss is our healing loss with
all three terms on (KD, CE, hidden-state MSE at the kept layers' inputs) plus the KL divergence between
the teacher's and the student's attention probabilities at each mapped layer (TinyBERT's attention
transfer, MiniLM's self-attention distribution transfer).

Attention probabilities exist only in eager attention: in transformers 5 every family's attention module
returns (output, weights, ...) and SDPA returns no weights, so both models run eager while distilling and
go back to their own implementation afterwards. Forward hooks on the attention modules read the weights.

    variants = BASELINES["tinybert"](data, teacher=teacher, budget=Budget(k=2))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from layerwise.baselines.budget import Budget, Variant, heal_config_for, require, training_record
from layerwise.baselines.students import every_nth, student_config
from layerwise.compression.compact import build_compact
from layerwise.data.batching import trim_left
from layerwise.compression.distill import HealConfig, HealResult, heal, heal_loss
from layerwise.models.recommender import SequentialRecommender
from layerwise.training.train import cloze_mask

# Attention module inside a layer, and the index of the probabilities in its output tuple (T5 returns
# (output, position_bias, weights)).
ATTENTION = {"llama": ("self_attn", 1), "qwen3": ("self_attn", 1), "gpt2": ("attn", 1),
             "bert": ("attention.self", 1), "t5": ("layer.0.SelfAttention", -1)}


@contextlib.contextmanager
def eager_attention(*models: SequentialRecommender) -> Iterator[None]:
    """Run `models` with eager attention (which returns probabilities), then restore each one's own."""
    previous = [m.backbone.config._attn_implementation for m in models]
    try:
        for model in models:
            model.backbone.set_attn_implementation("eager")
        yield
    finally:
        for model, implementation in zip(models, previous):
            model.backbone.set_attn_implementation(implementation)


@contextlib.contextmanager
def recorded_attention(model: SequentialRecommender, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, maps[l] is layer l's latest attention probabilities (B, heads, T, T)."""
    path, index = ATTENTION[model.family.name]
    maps: dict[int, torch.Tensor] = {}

    def hook(module, args, output, layer):
        maps[layer] = output[index]

    handles = [model.layers[l].get_submodule(path).register_forward_hook(
        lambda m, a, o, l=l: hook(m, a, o, l)) for l in layers]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention rows, mean over heads and real query positions.

    student, teacher: (B, heads, T, T) probabilities; mask: (B, T) True at non-padding queries.
    Masked keys carry probability 0 in both; the clamp keeps 0 * log 0 at 0 instead of NaN.
    """
    eps = 1e-12
    kl = (teacher * (teacher.clamp_min(eps).log() - student.clamp_min(eps).log())).sum(-1)  # (B, heads, T)
    return kl.mean(1)[mask].mean()


def _epoch(student, teacher, windows, optimizer, params, config, weight, generator) -> dict:
    """One pass over the training windows; returns the mean total loss and mean attention KL."""
    student.train()
    (inputs, targets), keep = windows, list(student.kept)
    order = torch.randperm(len(inputs), generator=generator)
    totals = {"loss": 0.0, "attention_kl": 0.0}
    batches = 0
    with recorded_attention(teacher, keep) as t_maps, recorded_attention(student, range(len(keep))) as s_maps:
        for start in range(0, len(order), config.batch_size):
            x, y = inputs[order[start:start + config.batch_size]], targets[order[start:start + config.batch_size]]
            if not student.causal:
                x, y = cloze_mask(x, student.mask_index, 0.2, generator)
            # One group: the hooks keep only the latest call's maps, so the KL needs the whole batch in one
            # call. Only the padding shared by all its rows is cut (exact, but less than groups would cut).
            group = trim_left(x, y)
            loss = heal_loss(student, teacher, x, y, config, groups=[group])
            kl = sum(attention_kl(s_maps[j], t_maps[t], group[1] != 0) for j, t in enumerate(keep)) / len(keep)
            loss = loss + weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            totals["loss"], totals["attention_kl"] = totals["loss"] + loss.item(), totals["attention_kl"] + kl.item()
            batches += 1
    return {k: v / max(batches, 1) for k, v in totals.items()}


def distil_attention(student: SequentialRecommender, teacher: SequentialRecommender, data,
                     config: HealConfig, attention_weight: float = 1.0, progress: bool = False) -> HealResult:
    """Our healing loop (`heal`: epochs, patience, best-epoch weights, LoRA merge) with the attention-map
    KL added to the loss. student.kept maps student layer j to teacher layer kept[j]."""

    def epoch(student, teacher, inputs, targets, optimizer, params, config, generator) -> dict:
        with eager_attention(student, teacher):
            return _epoch(student, teacher, (inputs, targets), optimizer, params, config, attention_weight,
                          generator)

    return heal(student, teacher, data, config, progress=progress, epoch_fn=epoch)


def tinybert(data, teacher=None, budget: Budget | None = None, progress: bool = False,
             **context) -> list[Variant]:
    """Registry `tinybert`: every (L/k)-th layer, distilled with KD + CE + hidden states + attention maps."""
    budget = require("tinybert", teacher, budget)
    keep = every_nth(teacher.n_layers, budget.k)
    student = build_compact(teacher, keep, bridge_rank=0)
    config, note = heal_config_for(student, student_config(replace(budget.heal, seed=budget.seeds[0]), True))
    result = distil_attention(student, teacher, data, config, progress=progress)
    info = {"kept": keep, "loss": "KD + CE + hidden MSE + attention KL",
            "attention_kl_last_epoch": result.history[-1]["attention_kl"] if result.history else None,
            **({"heal_note": note} if note else {})}
    return [Variant("tinybert", student.eval(), "tinybert", training_record(result), info)]
