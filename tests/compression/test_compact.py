"""The compact model: physical removal per family, stock reload with k layers, exact k = L, bridges."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModel, T5EncoderModel

from layerwise.compression.bridges import Bridge, gap_slots
from layerwise.compression.compact import build_compact, load_compact, removed_parameters, save_compact
from layerwise.compression.compress import calibration_batches
from layerwise.compression.importance import compute_importance
from layerwise.models import FAMILIES
from layerwise.models.checkpoint import is_stripped, load_recommender, strip_weights, weight_digests
from layerwise.compression.select import SELECTORS
from tests.helpers.tiny_models import cyclic_data, tiny_model

FAMILY_NAMES = sorted(FAMILIES)


def stock_load(path):
    """Stock transformers classes only. T5's AutoModel is the encoder-decoder T5Model, so its encoder
    loads with the stock T5EncoderModel; BERT's pooler is not part of a recommender backbone."""
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "t5":
        return T5EncoderModel.from_pretrained(path)
    if model_type == "bert":
        return AutoModel.from_pretrained(path, add_pooling_layer=False)
    return AutoModel.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_score_compress_save_stock_reload(family, tmp_path):
    data = cyclic_data()
    teacher = tiny_model(family, n_layers=4, n_items=data.n_items).eval()
    batches = calibration_batches(teacher, data, n_batches=2, batch_size=16, max_len=12)
    scores = compute_importance(teacher, batches, ["block_influence"])["block_influence"]
    kept = SELECTORS["topk"](scores, 2)
    compact = build_compact(teacher, kept, bridge_rank=4)
    save_compact(compact, tmp_path / "c", {"selector": "topk"})

    backbone = stock_load(tmp_path / "c" / "backbone")
    assert FAMILIES[family].n_layers(backbone) == 2
    expected = sum(p.numel() for p in teacher.backbone.parameters()) - removed_parameters(teacher, kept)
    assert sum(p.numel() for p in backbone.parameters()) == expected

    reloaded = load_compact(tmp_path / "c")
    histories = data.padded_histories(list(range(8)), "test", 12)
    with torch.no_grad():
        assert torch.allclose(reloaded.score(histories), compact.eval().score(histories), atol=1e-5)
    assert reloaded.kept == kept and reloaded.teacher_layers == 4
    # The model package knows nothing of bridges: its own loader refuses a bridged model, naming the one
    # that rebuilds them.
    with pytest.raises(ValueError, match="load_compact"):
        load_recommender(tmp_path / "c")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_stripped_model_keeps_digests_and_shapes_not_weights(family, tmp_path):
    """strip_weights leaves the weights out but records their digests and shapes: the architecture loads
    again (fresh values, on request only) with the same modules, shapes and bridges."""
    data = cyclic_data()
    teacher = tiny_model(family, n_layers=4, n_items=data.n_items).eval()
    compact = build_compact(teacher, [0, 3], bridge_rank=4)
    save_compact(compact, tmp_path / "c", {"selector": "topk"})
    strip_weights(tmp_path / "c", tmp_path / "s")
    assert not list((tmp_path / "s").rglob("*.safetensors")) and is_stripped(tmp_path / "s")
    assert weight_digests(tmp_path / "s") == weight_digests(tmp_path / "c") and len(weight_digests(tmp_path / "c")) == 2
    with pytest.raises(ValueError, match="holds the architecture only"):
        load_compact(tmp_path / "s")
    shell = load_compact(tmp_path / "s", architecture_only=True)
    full = load_compact(tmp_path / "c")
    assert {k: v.shape for k, v in shell.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}
    assert shell.kept == [0, 3] and sorted(shell.bridges) == sorted(full.bridges)
    assert not torch.equal(shell.item_embedding.weight, full.item_embedding.weight)  # fresh values
    histories = data.padded_histories(list(range(4)), "test", 12)
    assert shell.score(histories).shape == full.score(histories).shape
    with pytest.raises(ValueError, match="stripped already"):
        strip_weights(tmp_path / "s", tmp_path / "again")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_keeping_every_layer_reproduces_the_teacher_exactly(family):
    data = cyclic_data()
    teacher = tiny_model(family, n_layers=3, n_items=data.n_items).eval()
    compact = build_compact(teacher, [0, 1, 2], bridge_rank=0).eval()
    histories = data.padded_histories(list(range(8)), "test", 12)
    with torch.no_grad():
        assert torch.equal(compact.score(histories), teacher.score(histories))


@pytest.mark.parametrize("family", ["llama", "t5", "qwen3", "qwen2", "gemma3"])
def test_removal_equals_a_fresh_model_of_k_layers_with_the_same_weights(family):
    # Physical removal of layer 0 (T5: its position bias moves) must equal gating the layer off.
    from layerwise.compression.tracing import remove_layers

    data = cyclic_data()
    teacher = tiny_model(family, n_layers=3, n_items=data.n_items).eval()
    histories = data.padded_histories(list(range(8)), "test", 12)
    compact = build_compact(teacher, [1, 2]).eval()
    with torch.no_grad(), remove_layers(teacher, [0]):
        gated = teacher.score(histories)
    with torch.no_grad():
        assert torch.allclose(compact.score(histories), gated, atol=1e-5)
    assert compact.backbone.config.to_dict()[FAMILIES[family].count_key] == 2


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3"])
def test_decoder_layer_indices_and_layer_types_are_renumbered(family, tmp_path):
    teacher = tiny_model(family, n_layers=5)
    types = list(teacher.backbone.config.layer_types)
    keep = [1, 2, 4]
    compact = build_compact(teacher, keep)
    assert [layer.self_attn.layer_idx for layer in compact.layers] == [0, 1, 2]
    assert compact.backbone.config.layer_types == [types[i] for i in keep]
    assert [layer.self_attn.layer_idx for layer in teacher.layers] == [0, 1, 2, 3, 4]
    if family == "gemma3":
        # The tiny preset alternates window and full attention; each kept layer keeps its own type.
        assert types == ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
        assert [layer.self_attn.is_sliding for layer in compact.layers] == [False, True, True]
    if family == "qwen2":
        assert compact.backbone.config.max_window_layers == 3  # every kept layer stays below it
    save_compact(compact, tmp_path / "c", {})
    reloaded = stock_load(tmp_path / "c" / "backbone")
    assert reloaded.config.layer_types == [types[i] for i in keep]
    if family == "gemma3":
        assert [layer.self_attn.is_sliding for layer in reloaded.layers] == [False, True, True]


def test_gap_slots_cover_every_gap():
    assert gap_slots([0, 1, 2, 3], 4) == []
    assert gap_slots([0, 3], 4) == [1]
    assert gap_slots([1, 2], 4) == [0, 2]
    assert gap_slots([2], 4) == [0, 1]


def test_bridges_start_as_identity_and_deep_copies_use_their_own():
    data = cyclic_data()
    teacher = tiny_model("llama", n_layers=4, n_items=data.n_items).eval()
    plain = build_compact(teacher, [0, 3], bridge_rank=0).eval()
    bridged = build_compact(teacher, [0, 3], bridge_rank=4).eval()
    assert list(bridged.bridges) == ["1"]
    histories = data.padded_histories(list(range(8)), "test", 12)
    with torch.no_grad():
        assert torch.equal(plain.score(histories), bridged.score(histories))
        twin = copy.deepcopy(bridged)
        twin.bridges["1"].up.bias.fill_(0.5)
        assert not torch.allclose(twin.score(histories), bridged.score(histories))
        assert torch.equal(plain.score(histories), bridged.score(histories))


def test_bridge_rejects_bad_rank_and_bad_keep():
    with pytest.raises(ValueError, match="rank"):
        Bridge(8, 0)
    teacher = tiny_model("llama", n_layers=4)
    with pytest.raises(ValueError, match="sorted and unique"):
        build_compact(teacher, [2, 1])
    with pytest.raises(ValueError, match="out of range"):
        build_compact(teacher, [0, 4])
    with pytest.raises(ValueError, match="at least one"):
        build_compact(teacher, [])


def test_seeded_bridges_are_reproducible_and_leave_the_global_rng_alone():
    teacher = tiny_model("llama", n_layers=4)

    def bridge_weights(seed):
        student = build_compact(teacher, [0, 3], bridge_rank=4, seed=seed)
        return torch.cat([p.detach().flatten() for p in student.bridges.parameters()])

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = bridge_weights(7)
    assert torch.equal(torch.rand(1), expected_next)  # the global stream did not move
    torch.manual_seed(999)
    assert torch.equal(bridge_weights(7), first)  # same seed, same bridges, whatever the global state
    assert not torch.equal(bridge_weights(8), first)
