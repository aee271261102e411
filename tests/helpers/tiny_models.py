"""Tiny recommenders and calibration data for the importance, dependency and selection tests."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn as nn

from layerwise.models import SequentialRecommender, build_backbone, preset_config
from layerwise.training.train import TrainConfig, cloze_mask, train_recommender, training_windows
from tests.helpers.fake_data import FakeSequenceData

_DEPTH_KEY = {"t5": "num_layers", "gpt2": "n_layer"}
# The weights that write into the residual stream: zero them and the layer's update is exactly 0.
_WRITERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
    # Gemma 3 normalises each sublayer's output before adding it; RMSNorm maps a zero update to zero.
    "gemma3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "t5": ("layer.0.SelfAttention.o", "layer.1.DenseReluDense.wo"),
}


def tiny_model(family: str = "llama", n_layers: int = 4, n_items: int = 20, max_len: int = 12,
               seed: int = 0, head: str = "dot") -> SequentialRecommender:
    """A randomly initialised 32-wide recommender with `n_layers` layers and no dropout."""
    torch.manual_seed(seed)
    overrides = {_DEPTH_KEY.get(family, "num_hidden_layers"): n_layers}
    if family == "qwen3":
        overrides["layer_types"] = ["full_attention"] * n_layers  # the preset sizes it for 2 layers
    backbone = build_backbone(preset_config(family, "tiny", max_len=max_len, dropout=0.0, **overrides))
    return SequentialRecommender(backbone, n_items, dropout=0.0, head=head)


def make_identity(model: SequentialRecommender, layer: int) -> None:
    """Zero (and freeze) the weights through which `layer` writes into the residual stream."""
    module = model.layers[layer]
    for path in _WRITERS[model.family.name]:
        sub = module.get_submodule(path)
        for p in sub.parameters():
            with torch.no_grad():
                p.zero_()
            p.requires_grad_(False)


def cyclic_data(n_users: int = 40, n_items: int = 20, seed: int = 0) -> FakeSequenceData:
    """Each user walks the catalogue with a personal step of 1 or 2 (next = current + step, wrapping)."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(n_users):
        start, step, length = rng.integers(n_items), rng.integers(1, 3), rng.integers(8, 14)
        sequences.append([int((start + step * t) % n_items) + 1 for t in range(length)])
    return FakeSequenceData(sequences, n_items)


def calibration_batches(model: SequentialRecommender, data, max_len: int = 12, batch_size: int = 16,
                        n_batches: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(inputs, targets)` training windows; cloze-masked for encoder families."""
    inputs, targets = training_windows(data, max_len, model.causal)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(inputs), generator=generator)[: batch_size * n_batches]
    batches = []
    for chunk in order.split(batch_size):
        x, y = inputs[chunk], targets[chunk]
        if not model.causal:
            x, y = cloze_mask(x, model.mask_index, 0.2, generator)
        batches.append((x, y))
    return batches


def trained_model(family: str = "llama", identity: int | None = None, n_layers: int = 4,
                  epochs: int = 25, data=None) -> SequentialRecommender:
    """A tiny model trained on `cyclic_data`; layer `identity` (if any) stays exactly the identity."""
    data = data or cyclic_data()
    model = tiny_model(family, n_layers)
    if identity is not None:
        make_identity(model, identity)
    config = TrainConfig(epochs=epochs, batch_size=32, lr=1e-2, max_len=12, patience=epochs,
                         eval_every=epochs, mask_prob=0.3)
    train_recommender(model, data, config, progress=False)
    return model.eval()


class Shift(nn.Module):
    """A stand-in layer that adds a fixed vector to the state (accepts any call the backbone makes)."""

    def __init__(self, vector: torch.Tensor):
        super().__init__()
        self.vector = nn.Parameter(vector.clone())

    def forward(self, hidden, *args, **kwargs):
        return hidden + self.vector


@functools.lru_cache(maxsize=None)
def shared_trained(family: str = "llama") -> tuple[SequentialRecommender, FakeSequenceData]:
    """One 3-layer model per family, trained once per test session; layer 1 is exactly the identity.

    Shared between test files: never modify it in place (deep-copy first).
    """
    data = cyclic_data(n_users=60)
    return trained_model(family, identity=1, n_layers=3, epochs=15, data=data), data
