"""Structured width pruning: fewer FFN neurons and attention heads, a smaller dense model that really runs.

Every layer keeps the same number of key/value head groups (a KV head with the query heads that share it)
and the same number of FFN neurons, chosen per layer by the L2 norm of their weights (the rows that write
them and the columns that read them). The Linear layers are rebuilt with fewer features, and the config's
`num_attention_heads`, `num_key_value_heads` and `intermediate_size` follow: because the width is uniform
across layers, the config expresses it exactly and `save_pretrained` writes a model that stock
`AutoModel.from_pretrained` loads back. The parameter count is matched to our compact model's: heads are
kept in proportion, then the FFN width is solved for the rest.

Supported: llama and qwen3 (gated MLP, GQA attention). Other families raise NotImplementedError.

    model = prune_width(teacher, n_removed=removed_parameters(teacher, keep))
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn

from layerwise.baselines.budget import Budget, Variant, full_depth, healed_pair, n_parameters, require
from layerwise.models.recommender import SequentialRecommender

SUPPORTED = ("llama", "qwen3")


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the weight rows (output features) and columns (input features) given."""
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    has_bias = linear.bias is not None
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            out.bias.copy_(linear.bias[rows] if rows is not None else linear.bias)
    return out


def _group_rows(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of `groups` (sorted group ids), each `width` consecutive rows: (len(groups) * width,)."""
    return (groups[:, None] * width + torch.arange(width)).reshape(-1)


def _shape(config) -> tuple[int, int, int, int]:
    """(KV groups G, query heads per group, head_dim, FFN width F) of a llama/qwen3 config."""
    groups = config.num_key_value_heads
    return groups, config.num_attention_heads // groups, config.head_dim, config.intermediate_size


def group_scores(attention: nn.Module, per_group: int, head_dim: int) -> torch.Tensor:
    """L2 norm of everything one KV group owns: its q, k, v rows and its o_proj columns. -> (G,)"""
    def norms(weight: torch.Tensor, width: int) -> torch.Tensor:  # weight (G * width, H) -> (G,)
        return weight.detach().reshape(-1, width * weight.shape[1]).pow(2).sum(1)

    q = norms(attention.q_proj.weight, per_group * head_dim)
    kv = norms(attention.k_proj.weight, head_dim) + norms(attention.v_proj.weight, head_dim)
    o = norms(attention.o_proj.weight.T, per_group * head_dim)
    return (q + kv + o).sqrt()


def neuron_scores(mlp: nn.Module) -> torch.Tensor:
    """L2 norm of each FFN neuron's gate and up rows and down_proj column. -> (F,)"""
    return (mlp.gate_proj.weight.detach().pow(2).sum(1) + mlp.up_proj.weight.detach().pow(2).sum(1)
            + mlp.down_proj.weight.detach().pow(2).sum(0)).sqrt()


def _per_unit(layer: nn.Module, shape: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """(parameters per KV group, per FFN neuron, fixed) of one layer: its count is fixed + a*g + b*f."""
    groups, _, _, ffn = shape
    attn, mlp = layer.self_attn, layer.mlp
    a = sum(p.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj) for p in m.parameters())
    a = (a + attn.o_proj.weight.numel()) // groups
    b = (sum(p.numel() for m in (mlp.gate_proj, mlp.up_proj) for p in m.parameters())
         + mlp.down_proj.weight.numel()) // ffn
    total = sum(p.numel() for p in layer.parameters())
    return a, b, total - a * groups - b * ffn


def plan_width(teacher: SequentialRecommender, n_removed: int) -> tuple[int, int]:
    """(KV groups kept, FFN neurons kept) per layer so that the layers lose about `n_removed` parameters."""
    shape = _shape(teacher.backbone.config)
    groups, _, _, ffn = shape
    a, b, fixed = _per_unit(teacher.layers[0], shape)
    per_layer = fixed + a * groups + b * ffn
    target = per_layer - n_removed / teacher.n_layers
    if target < fixed + a + b:
        raise ValueError(f"cannot remove {n_removed} parameters by width: one head group and one neuron per "
                         f"layer already need {(fixed + a + b) * teacher.n_layers}")
    # Heads are few and coarse, so they are kept in proportion and the many FFN neurons absorb the rest.
    kept_groups = min(groups, max(1, round(groups * target / per_layer)))
    kept_ffn = min(ffn, max(1, round((target - fixed - a * kept_groups) / b)))
    return kept_groups, kept_ffn


def _prune_layer(layer: nn.Module, groups: torch.Tensor, neurons: torch.Tensor, per_group: int,
                 head_dim: int) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    q_rows, kv_rows = _group_rows(groups, per_group * head_dim), _group_rows(groups, head_dim)
    attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=neurons)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=neurons)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=neurons)
    mlp.intermediate_size = len(neurons)


def prune_width(teacher: SequentialRecommender, n_removed: int) -> SequentialRecommender:
    """A copy of `teacher` whose layers have fewer heads and FFN neurons, about `n_removed` parameters fewer.

    Hidden size, depth and everything outside the layers are unchanged, so the teacher's hidden states
    can still supervise healing. Raises NotImplementedError for families other than llama and qwen3.
    """
    if teacher.family.name not in SUPPORTED:
        raise NotImplementedError(f"width pruning supports {SUPPORTED}; family {teacher.family.name!r} "
                                  "(its attention/MLP modules are laid out differently) is not implemented")
    kept_groups, kept_ffn = plan_width(teacher, n_removed)
    model = copy.deepcopy(teacher)
    config = model.backbone.config
    groups, per_group, head_dim, _ = _shape(config)
    for layer in model.layers:
        keep_g = torch.topk(group_scores(layer.self_attn, per_group, head_dim), kept_groups).indices.sort().values
        keep_f = torch.topk(neuron_scores(layer.mlp), kept_ffn).indices.sort().values
        _prune_layer(layer, keep_g, keep_f, per_group, head_dim)
    # Uniform widths: the shared config states them exactly (head_dim is stored explicitly, so it stays).
    config.num_key_value_heads, config.num_attention_heads = kept_groups, kept_groups * per_group
    config.intermediate_size = kept_ffn
    return full_depth(model)


def width(data, teacher=None, budget: Budget | None = None, progress: bool = False,
          **context) -> list[Variant]:
    """Registry `width`: [pruned, pruned +heal], heads and FFN neurons pruned to our compact model's size."""
    budget = require("width", teacher, budget)
    if budget.removed is None:
        raise ValueError("width pruning matches our compact model's size: set budget.removed")
    model = prune_width(teacher, budget.removed)
    config = model.backbone.config
    info = {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size, "parameters": n_parameters(model),
            "target_parameters": n_parameters(teacher) - budget.removed,
            "saved_format": "uniform width per layer; config states it; stock from_pretrained loads it"}
    return healed_pair(model, teacher, data, replace(budget.heal, seed=budget.seeds[0]), "width", "width",
                       info, progress)
