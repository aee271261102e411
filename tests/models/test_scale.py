"""Published shapes on the meta device: counts match the published figures and closed-form formulas."""

from __future__ import annotations

import pytest

from layerwise.compression.compact import build_compact
from layerwise.models import FAMILIES
from layerwise.models.scale import (
    SCALES,
    count_parameters,
    meta_backbone,
    meta_recommender,
    scale_config,
)

ALL = [(family, size) for family, sizes in SCALES.items() for size in sizes]


@pytest.mark.parametrize("family,size", ALL)
def test_released_counts_match_published_figures(family, size):
    # Like with like: "total" is the whole released model with tied tables counted once (the model
    # cards' figure; e.g. Qwen3-1.7B's 1.7B, not the hub's 2.03B that counts the tied head twice);
    # "non_embedding" drops the input table and an untied LM head, as the Qwen3 cards do.
    released = count_parameters(family, size)["released"]
    assert released["references"], f"{family} {size} has no published figure to check"
    for what, published in released["references"].items():
        counted = released["total"] if what == "total" else released["non_embedding"]
        assert abs(counted / published - 1) < 0.02, (family, size, what, counted, published)


@pytest.mark.parametrize("family,size", ALL)
def test_breakdown_adds_up_and_recommender_drops_the_vocabulary(family, size):
    c = count_parameters(family, size, n_items=5000)
    assert c["total"] == c["embedding"] + c["layers"] + c["other"]
    assert c["layers"] == c["per_layer"] * c["n_layers"]
    rec, h = c["recommender"], c["hidden"]
    assert rec["per_layer"] == c["per_layer"]
    items = (5000 + 2) * h + (5000 + 1)  # item table (padding and mask rows) + item bias
    assert rec["embedding"] == items + 2 * h  # + the 2-row stub token table
    assert rec["total"] == c["total"] - c["embedding"] + rec["embedding"]


def test_llama_layer_matches_closed_form():
    # Llama-2-13B: no GQA (40 KV heads), SwiGLU 13824; Llama-3.2-1B: GQA 8 of 32 heads, head_dim 64.
    for size, (h, f, heads, kv, d) in {"13b": (5120, 13824, 40, 40, 128), "1b": (2048, 8192, 32, 8, 64)}.items():
        q, k = heads * d, kv * d
        assert count_parameters("llama", size)["per_layer"] == h * q + 2 * h * k + q * h + 3 * h * f + 2 * h


def test_t5_encoder_is_the_encoder_half_in_closed_form():
    # T5 v1.0 3B: d_model 1024, 32 heads x d_kv 128, ReLU d_ff 16384, 24 layers, vocab 32128.
    d, inner, ff, layers, vocab, buckets, heads = 1024, 32 * 128, 16384, 24, 32128, 32, 32
    encoder = vocab * d + layers * (4 * d * inner + 2 * d * ff + 2 * d) + d + buckets * heads
    c = count_parameters("t5", "3b")
    assert c["total"] == encoder
    assert c["released"]["class"] == "T5ForConditionalGeneration"
    assert 0.40 < encoder / c["released"]["total"] < 0.45  # the decoder adds cross-attention: > half


def test_published_hyperparameters():
    llama1b, qwen14 = scale_config("llama", "1b"), scale_config("qwen3", "14b")
    assert llama1b.tie_word_embeddings and llama1b.rope_parameters["rope_type"] == "llama3"
    assert (qwen14.head_dim, qwen14.num_key_value_heads, len(qwen14.layer_types)) == (128, 8, 40)
    assert not qwen14.tie_word_embeddings
    t5 = scale_config("t5", "11b")
    assert (t5.d_ff, t5.num_heads, t5.d_kv, t5.is_gated_act) == (65536, 128, 128, False)
    assert scale_config("llama", "13b", recommender=True).vocab_size == 2


def test_meta_models_hold_no_memory():
    backbone = meta_backbone("qwen3", "14b")
    assert all(p.is_meta for p in backbone.parameters())
    model = meta_recommender("llama", "8b", n_items=1000)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("family,size", [("llama", "1b"), ("qwen3", "1.7b"), ("bert", "base"), ("t5", "3b")])
def test_meta_recommender_compacts(family, size):
    teacher = meta_recommender(family, size, n_items=100)
    n_teacher = teacher.n_layers
    student = build_compact(teacher, [1, n_teacher - 1], bridge_rank=8)
    assert student.n_layers == 2 and getattr(student.backbone.config, FAMILIES[family].count_key) == 2
    assert sorted(int(s) for s in student.bridges) == [0, 1]  # a gap before layer 1 and before the last
    assert teacher.n_layers == n_teacher  # the teacher itself is untouched
    if family == "qwen3":
        assert len(student.backbone.config.layer_types) == 2


def test_unknown_family_or_size_is_a_clear_error():
    with pytest.raises(ValueError, match="choose from"):
        scale_config("gpt2", "13b")
    with pytest.raises(ValueError, match="'1b', '3b', '8b', '13b'"):
        scale_config("llama", "70b")
