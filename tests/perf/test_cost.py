"""Tests of layerwise.perf.cost: FLOPs counted by hand on tiny models, parameter bytes, seeded histories."""

from __future__ import annotations

import torch

from layerwise.compression.bridges import set_bridges
from layerwise.compression.compact import build_compact
from layerwise.perf.cost import forward_flops, make_histories, parameter_bytes
from tests.helpers.tiny_models import tiny_model

N_ITEMS = 20


def tiny(family: str = "llama", layers: int = 2):
    return tiny_model(family, n_layers=layers, n_items=N_ITEMS, max_len=8).eval()


def test_flops_match_a_hand_count_for_tiny_llama():
    model = tiny("llama")  # 2 layers, H = 32, 2 heads x 16, FFN 64, no bias, no bridges
    b, t = 3, 8
    per_token = 4 * 2 * 32 * 32 + 3 * 2 * 32 * 64  # q, k, v, o projections + gate, up, down
    attention = 4 * t * t * 32 * b
    flops = forward_flops(model, b, t)
    assert flops["per_layer"] == [per_token * b * t + attention] * 2
    assert flops["layers"] == 2 * (20480 * 24 + 24576)
    assert flops["head"] == 2 * 32 * (N_ITEMS + 1) * b
    assert flops["bridges"] == 0 and flops["item_text"] == 0
    assert flops["total"] == flops["layers"] + flops["head"]


def test_bridges_add_flops_outside_the_layers():
    model = build_compact(tiny("llama", layers=4), [0, 3])
    set_bridges(model, [1], rank=4)
    flops = forward_flops(model, 2, 8)
    assert flops["bridges"] == (2 * 32 * 4 + 2 * 4 * 32) * 2 * 8


def test_gpt2_conv1d_projections_are_counted():
    # GPT-2 uses transformers' Conv1D, not nn.Linear: c_attn 32->96, attn c_proj 32->32, c_fc 32->64, 64->32.
    flops = forward_flops(tiny("gpt2"), 1, 8)
    assert flops["per_layer"][0] == 2 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32) * 8 + 4 * 8 * 8 * 32


def test_fewer_layers_mean_fewer_bytes_and_proportionally_fewer_layer_flops():
    teacher = tiny("llama", layers=4)
    small = build_compact(teacher, [0, 3])
    assert parameter_bytes(small) < parameter_bytes(teacher)
    assert parameter_bytes(small.layers) * 2 == parameter_bytes(teacher.layers)
    assert parameter_bytes(teacher) - parameter_bytes(small) == parameter_bytes(teacher.layers[1:3])
    assert forward_flops(small, 4, 8)["layers"] * 2 == forward_flops(teacher, 4, 8)["layers"]
    assert forward_flops(small, 4, 8)["head"] == forward_flops(teacher, 4, 8)["head"]


def test_histories_are_seeded_full_length_valid_items():
    a, b = make_histories(4, 8, N_ITEMS, seed=1), make_histories(4, 8, N_ITEMS, seed=1)
    assert torch.equal(a, b) and a.shape == (4, 8)
    assert a.min() >= 1 and a.max() <= N_ITEMS
