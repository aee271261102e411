"""The LLM recommender on the real SmolLM2-135M weights, cut to 2 layers to keep each test small."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModel

from layerwise.data import load_dataset
from layerwise.models.lora import has_lora
from layerwise.models.checkpoint import load_recommender, read_manifest, save_recommender
from layerwise.models.factory import build_recommender
from layerwise.models.llm import LLMSetup, layer_state_norms, set_checkpointing
from layerwise.train import TrainConfig, next_item_loss, training_windows
from tests.helpers.tiny_models import make_identity, tiny_model


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic:60:40:600:0")  # 40 items with titles and genres


def build(data, smollm2, **setup):
    options = {"n_layers": 2, "item_init": "title_hidden", "lora_rank": 4, **setup}
    return build_recommender(data, "llama", pretrained=str(smollm2.path), dropout=0.0, llm=LLMSetup(**options))


@pytest.fixture(scope="module")
def lora_model(data, smollm2):
    return build(data, smollm2)


def batch(data, n=8, max_len=12):
    inputs, targets = training_windows(data, max_len, causal=True)
    return inputs[:n], targets[:n]


def test_title_init_is_at_token_scale_and_knows_genres(lora_model, data):
    info = lora_model.llm_info
    assert 0.13 < info["token_std"] < 0.14  # SmolLM2's token embeddings (row norm about 3.2)
    items = lora_model.item_embedding.weight[1: data.n_items + 1].detach()
    assert items.std().item() == pytest.approx(info["token_std"], rel=1e-4)
    assert torch.all(lora_model.item_embedding.weight[0] == 0)
    assert lora_model.n_layers == 2 and [l.self_attn.layer_idx for l in lora_model.layers] == [0, 1]
    assert lora_model.backbone.get_input_embeddings().weight.shape[0] == 2  # the token table is gone
    # Titles sharing a genre start closer together: the LLM's knowledge reached the items.
    unit = torch.nn.functional.normalize(items, dim=-1)
    genre = [t.rsplit("(", 1)[-1] for t in data.item_text[1:]]
    same = torch.tensor([[a == b for b in genre] for a in genre]) & ~torch.eye(len(genre), dtype=torch.bool)
    cosine = unit @ unit.T
    assert cosine[same].mean() > cosine[~same & ~torch.eye(len(genre), dtype=torch.bool)].mean() + 0.2


def test_lora_step_trains_adapters_and_items_only_and_round_trips(lora_model, data, tmp_path):
    model = copy.deepcopy(lora_model).train()
    assert has_lora(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or not n.startswith("backbone.") for n in names)
    assert {n.split(".")[-4] for n in names if "lora_A" in n} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"}
    base = model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    lora_b = model.layers[0].self_attn.q_proj.lora_B["default"].weight.clone()
    items = model.item_embedding.weight.clone()
    x, y = batch(data)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = next_item_loss(model, model.encode(x), y, TrainConfig(), torch.Generator())
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert torch.equal(model.layers[0].self_attn.q_proj.base_layer.weight, base)
    assert not torch.equal(model.layers[0].self_attn.q_proj.lora_B["default"].weight, lora_b)
    assert not torch.equal(model.item_embedding.weight, items)

    save_recommender(model.eval(), tmp_path / "m", {"kind": "teacher"})
    assert has_lora(model)  # saving merged a copy, not the model being trained
    backbone = AutoModel.from_pretrained(tmp_path / "m" / "backbone")
    assert len(backbone.layers) == 2 and not any("lora" in k for k in backbone.state_dict())
    reloaded = load_recommender(tmp_path / "m")
    histories = data.padded_histories(list(range(6)), "test", 12)
    with torch.inference_mode():
        assert torch.allclose(reloaded.score(histories), model.score(histories), atol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora_model, data):
    x, y = batch(data, n=4)
    model = copy.deepcopy(lora_model).train()
    calls, mlp = [], model.layers[0].mlp
    forward = mlp.forward  # counted by wrapping: module hooks do not fire in the recomputation
    mlp.forward = lambda *args, **kwargs: (calls.append(1), forward(*args, **kwargs))[1]
    grads = []
    for checkpointing in (False, True, False):  # off, on, and off again
        set_checkpointing(model.backbone, checkpointing)
        assert model.backbone.is_activation_checkpointing == checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = next_item_loss(model, model.encode(x), y, TrainConfig(), torch.Generator())
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        # B starts at zero, so A's gradient is zero at the first step; B's is not.
        lora_b = model.layers[0].mlp.down_proj.lora_B["default"].weight.grad
        grads.append((loss.detach(), model.item_embedding.weight.grad.clone(), lora_b.clone()))
    (l0, e0, b0) = grads[0]
    for l1, e1, b1 in grads[1:]:
        assert torch.allclose(l0, l1) and torch.allclose(e0, e1, atol=1e-6) and torch.allclose(b0, b1, atol=1e-6)
    assert b0.abs().sum() > 0


def test_full_and_frozen_finetuning_and_token_input_norm(data, smollm2, tmp_path):
    full = build(data, smollm2, finetune="full", item_init="title_tokens", input_norm="token")
    assert not has_lora(full) and all(p.requires_grad for p in full.layers.parameters())
    embeds, _ = full.embed(data.padded_histories([0, 1], "test", 12))
    real = embeds.norm(dim=-1) > 0
    assert torch.allclose(embeds.norm(dim=-1)[real], torch.tensor(full.llm_info["token_row_norm"]), rtol=1e-4)
    save_recommender(full, tmp_path / "full", {})
    assert read_manifest(tmp_path / "full")["input_norm"] == pytest.approx(full.input_norm)
    assert load_recommender(tmp_path / "full").input_norm == pytest.approx(full.input_norm)
    frozen = build(data, smollm2, finetune="frozen", item_init="random", item_std=0.02)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"item_embedding.weight", "item_bias"}
    assert frozen.item_embedding.weight[1:].std().item() == pytest.approx(0.02, rel=0.05)


def test_title_tokens_at_the_token_row_norm_and_random_layers(data, smollm2):
    rows = build(data, smollm2, item_init="title_tokens", item_scale="row_norm")
    items = rows.item_embedding.weight[1: data.n_items + 1].detach()
    norm = rows.llm_info["token_row_norm"]
    assert torch.allclose(items.norm(dim=-1), torch.full((data.n_items,), norm), rtol=1e-5)
    # Not centred: what every title shares stays (mean cosine between items far above 0), unlike "std".
    unit = torch.nn.functional.normalize(items, dim=-1)
    assert (unit @ unit.T).mean() > 0.3
    centred = build(data, smollm2, item_init="title_tokens").item_embedding.weight[1: data.n_items + 1]
    assert torch.nn.functional.normalize(centred.detach(), dim=-1).sum(0).norm() < unit.sum(0).norm() / 5
    fresh = build(data, smollm2, item_init="title_tokens", item_scale="row_norm", layer_init="random",
                  finetune="full")
    real = slice(0, data.n_items + 1)  # the mask slot after them is drawn at random
    assert torch.equal(fresh.item_embedding.weight[real], rows.item_embedding.weight[real])  # from the LLM
    weight = fresh.layers[0].mlp.up_proj.weight
    pretrained = rows.layers[0].mlp.up_proj.base_layer.weight
    assert not torch.allclose(weight, pretrained)
    assert weight.std().item() == pytest.approx(fresh.backbone.config.initializer_range, rel=0.05)
    assert torch.all(fresh.layers[0].input_layernorm.weight == 1.0)  # a fresh RMSNorm


def test_clear_errors_for_bad_setups(data, smollm2):
    with pytest.raises(ValueError, match="unknown item_init 'titles'"):
        LLMSetup(item_init="titles")
    untitled = dataclasses.replace(data, item_text=None)
    with pytest.raises(ValueError, match="needs item titles"):
        build(untitled, smollm2)
    with pytest.raises(ValueError, match="needs a pretrained backbone"):
        build_recommender(data, "llama", "tiny", llm=LLMSetup())


def test_layer_state_norms_see_an_identity_layer_and_the_input():
    model = tiny_model("llama", n_layers=3).eval()
    make_identity(model, 1)  # layer 1 adds nothing to the residual stream
    embeds, mask = model.embed(torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]]))
    norms = layer_state_norms(model, embeds, mask)
    assert len(norms["mean_norm"]) == 4
    assert norms["mean_norm"][0] == pytest.approx(embeds[mask.bool()].norm(dim=-1).mean().item())
    assert norms["mean_norm"][2] == pytest.approx(norms["mean_norm"][1])
    assert norms["median_norm"][2] == pytest.approx(norms["median_norm"][1])
    assert norms["max_abs"][2] == pytest.approx(norms["max_abs"][1])
    assert norms["mean_norm"][1] != pytest.approx(norms["mean_norm"][0])


def test_llm_recommender_scores_compresses_and_reloads_stock(lora_model, data, tmp_path):
    from layerwise.compact import build_compact, load_compact, save_compact
    from layerwise.compress import calibration_batches
    from layerwise.importance import compute_importance

    teacher = copy.deepcopy(lora_model).eval()
    batches = calibration_batches(teacher, data, n_batches=1, batch_size=8, max_len=12)
    scores = compute_importance(teacher, batches, ["block_influence", "fisher"])
    assert all(s.shape == (2,) and torch.all(s > 0) for s in scores.values())
    compact = build_compact(teacher, [1])
    save_compact(compact, tmp_path / "c", {"selector": "manual"})
    backbone = AutoModel.from_pretrained(tmp_path / "c" / "backbone")
    assert type(backbone).__name__ == "LlamaModel" and len(backbone.layers) == 1
    assert backbone.layers[0].self_attn.layer_idx == 0 and backbone.config.vocab_size == 2
    reloaded = load_compact(tmp_path / "c")
    histories = data.padded_histories(list(range(6)), "test", 12)
    with torch.inference_mode():
        assert torch.allclose(reloaded.score(histories), compact.score(histories), atol=1e-4)
    assert reloaded.kept == [1] and reloaded.teacher_layers == 2
