"""The recommender's two heads: dot product, and cosine times a learned temperature (kept through saving,
compaction and the stock reload of a compact model)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel

from layerwise.compression.compact import build_compact, load_compact, save_compact
from layerwise.models.checkpoint import load_recommender, read_manifest, save_recommender
from layerwise.training.train import TrainConfig, next_item_loss, training_windows
from tests.helpers.tiny_models import cyclic_data, tiny_model


def test_cos_head_is_a_scaled_cosine_plus_bias_and_bounded():
    model = tiny_model("llama", n_layers=2, head="cos").eval()
    with torch.no_grad():
        model.item_bias.copy_(torch.linspace(-1, 1, model.n_items + 1))
        model.log_temperature.fill_(math.log(5.0))
    hidden = torch.randn(3, model.hidden_size) * 100.0  # large states, as a pretrained LLM's
    scores = model.head(hidden)
    items = model.item_vectors()[1: model.n_items + 1]
    cosine = torch.nn.functional.cosine_similarity(hidden[:, None], items[None], dim=-1)
    assert torch.allclose(scores[:, 1:], 5.0 * cosine + model.item_bias[1:], atol=1e-5)
    assert torch.all(scores[:, 0] == float("-inf")) and scores[:, 1:].abs().max() <= 6.0
    assert model.log_temperature.requires_grad and model.log_temperature.item() == pytest.approx(math.log(5))
    dot = tiny_model("llama", n_layers=2).eval()
    assert not hasattr(dot, "log_temperature")
    assert torch.allclose(dot.head(hidden)[:, 1:], hidden @ dot.item_vectors()[1: dot.n_items + 1].T)
    with pytest.raises(ValueError, match="unknown head 'l2'"):
        tiny_model("llama", n_layers=2, head="l2")


def test_sampled_loss_scores_positives_and_negatives_with_the_head():
    model = tiny_model("llama", n_layers=2, head="cos").eval()
    data = cyclic_data(n_users=8)
    inputs, targets = training_windows(data, 12, causal=True)
    hidden = model.encode(inputs[:4])
    config = TrainConfig(loss="sampled", n_negatives=model.n_items * 50)  # every item drawn as a negative
    sampled = next_item_loss(model, hidden, targets[:4], config, torch.Generator().manual_seed(0))
    full = next_item_loss(model, hidden, targets[:4], TrainConfig(), torch.Generator())
    # With every item among the negatives (each many times), sampled softmax has a larger denominator
    # but the same positive logit; it can only be larger than the full softmax loss, never smaller.
    assert sampled > full
    where = targets[:4] != 0
    h, t = hidden[where], targets[:4][where]
    paired = model.item_scores(h, model.item_vectors()[t], model.item_bias[t], paired=True)
    assert torch.allclose(paired, model.head(h).gather(1, t[:, None]).squeeze(1), atol=1e-5)


def test_head_runs_in_float32_under_bf16_autocast():
    model = tiny_model("llama", n_layers=2, head="cos").eval()
    hidden = torch.randn(4, model.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model.head(hidden.bfloat16())
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, model.head(hidden.bfloat16().float()), atol=1e-6)


def test_cos_head_survives_save_compaction_and_the_stock_reload(tmp_path):
    teacher = tiny_model("llama", n_layers=4, head="cos").eval()
    with torch.no_grad():
        teacher.log_temperature.fill_(1.7)
    histories = cyclic_data(n_users=6).padded_histories(range(6), "test", 12)
    save_recommender(teacher, tmp_path / "t", {"kind": "teacher"})
    assert read_manifest(tmp_path / "t")["head"] == "cos"
    reloaded = load_recommender(tmp_path / "t")
    assert reloaded.head_kind == "cos" and reloaded.log_temperature.item() == pytest.approx(1.7)
    compact = build_compact(teacher, [0, 3])
    assert compact.head_kind == "cos" and compact.log_temperature.item() == pytest.approx(1.7)
    save_compact(compact, tmp_path / "c", {})
    assert len(AutoModel.from_pretrained(tmp_path / "c" / "backbone").layers) == 2  # stock transformers
    again = load_compact(tmp_path / "c")
    with torch.inference_mode():
        assert torch.allclose(again.score(histories), compact.score(histories), atol=1e-5)
        assert torch.allclose(reloaded.score(histories), teacher.score(histories), atol=1e-5)
    assert load_recommender(tmp_path / "t").head_kind == "cos"


def test_a_model_saved_before_heads_existed_loads_with_the_dot_head(tmp_path):
    import json

    save_recommender(tiny_model("llama", n_layers=2), tmp_path / "old", {})
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["head"]
    path.write_text(json.dumps(manifest))
    assert load_recommender(tmp_path / "old").head_kind == "dot"


def test_temperature_is_one_element_and_older_scalar_checkpoints_load():
    model = tiny_model("llama", n_layers=2, head="cos")
    assert model.log_temperature.shape == (1,)  # DeepSpeed cannot broadcast a 0-dim parameter
    state = {**model.state_dict(), "log_temperature": torch.tensor(1.7)}  # as saved before
    model.load_state_dict(state)
    assert model.log_temperature.shape == (1,) and model.log_temperature.item() == pytest.approx(1.7)
