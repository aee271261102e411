"""What one `score` call costs, counted rather than timed: parameter bytes and analytic FLOPs, and the
seeded histories that both measurements score (the interleaved timing in `layerwise.perf.bench`, the
fresh-subprocess peak memory in `layerwise.perf.memory`).

    flops = forward_flops(model, batch_size=64, max_len=50)   # {"layers", "per_layer", "bridges", "head", ...}
"""

from __future__ import annotations

import torch
import torch.nn as nn

from layerwise.models.recommender import SequentialRecommender

# Attention products are counted over the full T x T grid for causal and bidirectional models alike: with
# an explicit padding mask SDPA computes every entry, and teacher and compact share the choice, so ratios
# do not depend on it (a causal kernel could skip about half).
FLOPS_NOTE = ("2*in*out per token per nn.Linear/Conv1D in each layer and bridge; attention 4*T*T*heads*head_dim "
              "per sequence per layer, dense T x T (causal too); head 2*H*(n_items+1) per user; text projection "
              "2*2*(n_items+1)*text_dim*H per call; norms, activations and softmax not counted")


def make_histories(batch_size: int, max_len: int, n_items: int, seed: int) -> torch.Tensor:
    """Seeded full-length histories of valid items: (batch_size, max_len) in 1..n_items, no padding."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, n_items + 1, (batch_size, max_len), generator=generator)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (persistent or not: both occupy memory), tied tensors once."""
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _linear_flops_per_token(module: nn.Module) -> int:
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += 2 * sub.in_features * sub.out_features
        elif type(sub).__name__ == "Conv1D":  # GPT-2's transposed linear: weight (in, out)
            total += 2 * sub.weight.shape[0] * sub.weight.shape[1]
    return total


def _attention_width(config) -> int:
    heads = next(getattr(config, k) for k in ("num_attention_heads", "n_head", "num_heads") if hasattr(config, k))
    hidden = getattr(config, "hidden_size", None) or config.d_model
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    return heads * head_dim


def forward_flops(model: SequentialRecommender, batch_size: int, max_len: int) -> dict[str, int]:
    """Analytic FLOPs of one `score` call on (batch_size, max_len) histories, by part (see FLOPS_NOTE).

    Returns {"layers", "per_layer" (list), "bridges", "head", "item_text", "total"}.
    """
    tokens, hidden, rows = batch_size * max_len, model.hidden_size, model.n_items + 1
    attention = 4 * max_len * max_len * _attention_width(model.backbone.config) * batch_size
    per_layer = [_linear_flops_per_token(layer) * tokens + attention for layer in model.layers]
    bridges = getattr(model, "bridges", None)
    out = {
        "layers": sum(per_layer), "per_layer": per_layer,
        "bridges": _linear_flops_per_token(bridges) * tokens if bridges else 0,
        "head": 2 * hidden * rows * batch_size,
        # item_vectors() projects every item's text features, once in embed() and once in head().
        "item_text": 2 * _linear_flops_per_token(model.text_projection) * rows if model.text_projection else 0,
    }
    out["total"] = out["layers"] + out["bridges"] + out["head"] + out["item_text"]
    return out
