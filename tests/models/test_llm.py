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
from layerwise.training.train import TrainConfig, next_item_loss, training_windows
from tests.helpers.tiny_models import make_identity, tiny_model

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic:60:40:600:0")  # 40 items with titles and genres


def build(data, smollm2, head="dot", **setup):
    options = {"n_layers": 2, "item_init": "title_hidden", "lora_rank": 4, **setup}
    return build_recommender(data, "llama", pretrained=str(smollm2.path), dropout=0.0, head=head,
                             llm=LLMSetup(**options))


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


# --- compression of the SmolLM2 recommender: 3 real layers, 8-item windows, 20 validation users --------
SHORT, USERS = 8, 20


@pytest.fixture(scope="module")
def teacher_dir(data, smollm2, tmp_path_factory):
    """A 3-layer SmolLM2 teacher with the cosine head, saved as training leaves it (LoRA merged)."""
    path = tmp_path_factory.mktemp("llm") / "teacher"
    save_recommender(build(data, smollm2, n_layers=3, head="cos").eval(), path, {"kind": "teacher"})
    return path


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from layerwise.compression.compact import load_compact

    return load_compact(teacher_dir).eval().requires_grad_(False)


def test_every_estimator_matches_physical_removal_of_real_llm_layers(teacher, data):
    from layerwise.compression.compact import build_compact
    from layerwise.compression.compress import calibration_batches
    from layerwise.compression.dependency import dependency_matrix
    from layerwise.compression.importance import IMPORTANCE, LOCAL_METHODS
    from layerwise.compression.tracing import _validation_loss, sample_users

    batches = calibration_batches(teacher, data, n_batches=1, batch_size=8, max_len=SHORT)
    context = {"data": data, "k": 2, "max_users": USERS, "max_len": SHORT}
    scores = {method: estimator(teacher, batches, **context) for method, estimator in IMPORTANCE.items()}
    for method, values in scores.items():
        assert values.shape == (3,) and torch.isfinite(values).all(), method
    assert all(torch.all(scores[m] >= 0) and scores[m].sum() > 0 for m in LOCAL_METHODS)
    assert torch.all(scores["angular"] <= 1) and torch.all(scores["block_influence"] <= 2)
    choice = scores["combined"].combination  # weighted normalised ranks, weights chosen on validation
    assert torch.all((0 <= scores["combined"]) & (scores["combined"] <= 1)) and len(choice.kept) == 2
    assert choice.valid_ndcg == max(ndcg for _, ndcg in choice.tried)
    assert sum(choice.weights.values()) == pytest.approx(1)
    # Gating a layer off (how ablation and dependency remove it) is its physical removal: the validation
    # loss of the k-layer model from build_compact, with its renumbered layers and rotary positions.
    users = sample_users(data, USERS)

    def loss(keep: list[int]) -> float:
        return _validation_loss(build_compact(teacher, keep).eval(), data, users, SHORT)

    full = loss([0, 1, 2])
    alone = [loss([m for m in range(3) if m != l]) - full for l in range(3)]
    assert torch.allclose(scores["ablation_loss"], torch.tensor(alone, dtype=torch.float64), atol=1e-4)
    deps = dependency_matrix(teacher, batches, data=data, max_users=USERS, max_len=SHORT)
    assert torch.equal(deps, deps.T) and torch.all(deps.diagonal() == 0)
    assert deps[0, 2].item() == pytest.approx(loss([1]) - full - alone[0] - alone[2], abs=1e-4)


def test_every_selector_keeps_what_its_scores_say(teacher, data):
    from layerwise.compression.compress import SELECTOR_METHOD, calibration_batches, select_layers
    from layerwise.compression.select import SELECTORS

    batches = calibration_batches(teacher, data, n_batches=1, batch_size=8, max_len=SHORT)
    fixed = {"uniform": [1, 2], "first": [0, 1], "last": [1, 2],
             "random": SELECTORS["random"](torch.zeros(3), 2)}  # seed 0, whatever the scores
    for selector in SELECTORS:
        kept, used = select_layers(teacher, data, 2, selector, None, batches, ablation_users=USERS)
        method = SELECTOR_METHOD[selector]
        assert (method is None) == (not used) and (method is None or method in used), selector
        # Removing one of three layers, each ranking selector drops the layer its scores rank lowest:
        # block_influence (topk, greedy), ablation_loss (beam), the 1-layer angular blocks (contiguous).
        ranked_by = used.get("angular_blocks") if selector == "contiguous" else used.get(method)
        expected = fixed[selector] if selector in fixed else [l for l in range(3) if l != _last_min(ranked_by)]
        assert kept == expected, (selector, kept, used)


def _last_min(values) -> int:
    values = torch.as_tensor(values)
    return int((values == values.min()).nonzero()[-1])


def test_compact_build_reloads_as_a_stock_automodel(teacher, data, tmp_path):
    from layerwise.compression.compact import build_compact, load_compact, save_compact

    compact = build_compact(teacher, [0, 2])
    save_compact(compact, tmp_path / "c", {"selector": "manual"})
    backbone = AutoModel.from_pretrained(tmp_path / "c" / "backbone")  # stock transformers, no project code
    assert type(backbone).__name__ == "LlamaModel" and len(backbone.layers) == 2
    assert [l.self_attn.layer_idx for l in backbone.layers] == [0, 1] and backbone.config.vocab_size == 2
    assert torch.equal(backbone.layers[1].mlp.up_proj.weight, teacher.layers[2].mlp.up_proj.weight)
    reloaded = load_compact(tmp_path / "c")
    histories = data.padded_histories(list(range(6)), "test", SHORT)
    with torch.inference_mode():
        assert torch.allclose(reloaded.score(histories), compact.score(histories), atol=1e-4)
        assert not torch.allclose(reloaded.score(histories), teacher.score(histories), atol=1e-2)
    assert reloaded.kept == [0, 2] and reloaded.teacher_layers == 3 and reloaded.head_kind == "cos"


def test_healing_with_lora_and_the_teacher_cache_merges_into_a_stock_model(teacher, data, lora_model, tmp_path):
    from layerwise.compression.compact import build_compact, load_compact, save_compact
    from layerwise.compression.distill import HealConfig, heal

    assert has_lora(lora_model) and not has_lora(build_compact(lora_model, [1]))  # in-memory teachers too
    student = build_compact(teacher, [0, 2])
    config = HealConfig(epochs=1, batch_size=16, max_len=SHORT, lr=1e-2, trainable="lora", lora_rank=4,
                        prefit_steps=0, cache_teacher=True, autocast="bf16")
    before = student.layers[1].mlp.down_proj.weight.detach().clone()
    result = heal(student, teacher, data, config, progress=False)
    # Measured: valid NDCG@10 0.166 before, 0.185 after the epoch, so the healed weights are the ones kept.
    assert result.cache_seconds > 0 and result.best_epoch == 1
    assert not has_lora(student) and not torch.equal(student.layers[1].mlp.down_proj.weight, before)
    assert torch.equal(teacher.layers[2].mlp.down_proj.weight, before)  # the teacher stays frozen
    save_compact(student, tmp_path / "healed", {})
    stock = AutoModel.from_pretrained(tmp_path / "healed" / "backbone")
    assert not any("lora" in k for k in stock.state_dict())
    assert torch.equal(stock.layers[1].mlp.down_proj.weight, student.layers[1].mlp.down_proj.weight)
    reloaded = load_compact(tmp_path / "healed")
    histories = data.padded_histories(list(range(6)), "test", SHORT)
    with torch.inference_mode():
        assert torch.allclose(reloaded.score(histories), student.eval().score(histories), atol=1e-4)
    assert reloaded.head_kind == "cos"


def test_bench_times_the_teacher_and_its_compact_model(teacher_dir, teacher, tmp_path):
    from layerwise.perf.bench import bench_dirs
    from layerwise.perf.table import format_table
    from layerwise.compression.compact import build_compact, save_compact

    save_compact(build_compact(teacher, [1]), tmp_path / "compact", {})
    result = bench_dirs([str(teacher_dir), str(tmp_path / "compact")], batch_sizes=(2,), runs=3, warmup=1,
                        max_len=SHORT)
    big, small = result["models"]["teacher"], result["models"]["compact"]
    assert (big["n_layers"], small["n_layers"]) == (3, 1)
    assert small["layer_param_bytes"] * 3 == big["layer_param_bytes"]  # SmolLM2's layers are all alike
    assert big["param_bytes"] - small["param_bytes"] == big["layer_param_bytes"] - small["layer_param_bytes"]
    entry = small["batches"]["2"]
    assert entry["flops"]["total"] < big["batches"]["2"]["flops"]["total"]
    assert entry["speedup"] > 0 and 1 < entry["bound"] < 3  # Amdahl: 1 of 3 layers, f > 0
    assert entry["memory"]["status"] == "measured" and 0 < result["nonlayer"]["2"]["f"]
    assert "compact" in format_table(result)


def test_llm_baselines_start_again_from_the_pretrained_weights(teacher, data, smollm2):
    """`truncated` keeps the LLM's first k pretrained layers, `scratch` gives the same shape fresh layers; both
    start their items from the titles exactly as the teacher did, and train without a teacher."""
    from layerwise.baselines import BASELINES, Budget
    from layerwise.baselines.students import LLM_FULL_LR, llm_student
    from layerwise.evaluation.evaluate import evaluate

    setup = dataclasses.asdict(LLMSetup(n_layers=3, item_init="title_hidden", lora_rank=4))
    build_info = {"pretrained": str(smollm2.path), "llm": {"setup": setup}, "head": "cos", "dropout": 0.0}
    prefix = llm_student(data, build_info, 2, max_len=SHORT)
    fresh = llm_student(data, build_info, 2, max_len=SHORT, layer_init="random", finetune="full")
    assert prefix.n_layers == fresh.n_layers == 2 and prefix.head_kind == "cos"
    items = slice(1, data.n_items + 1)
    assert torch.equal(prefix.item_embedding.weight[items], fresh.item_embedding.weight[items])  # one start
    pretrained_q = teacher.layers[1].self_attn.q_proj.weight  # the fixture's teacher is untrained
    assert torch.allclose(prefix.layers[1].self_attn.q_proj.base_layer.weight, pretrained_q)
    assert not torch.allclose(fresh.layers[1].self_attn.q_proj.weight, pretrained_q, atol=1e-2)
    train = TrainConfig(epochs=1, batch_size=16, max_len=SHORT, lr=1e-3)
    budget = Budget(k=2, train=train, build=build_info, seeds=(0,))
    (cut,) = BASELINES["truncated"](data, teacher=teacher, budget=budget)
    (scratch,) = BASELINES["scratch"](data, teacher=teacher, budget=budget)
    assert cut.info["kept"] == [0, 1] and cut.training["config"]["lr"] == 1e-3
    assert scratch.training["config"]["lr"] == LLM_FULL_LR and scratch.info["item_init"] == "title_hidden"
    for variant in (cut, scratch):
        assert variant.model.n_layers == 2 and variant.training["kind"] == "train"
        assert 0 < evaluate(variant.model.score, data, stage="test", max_len=SHORT).means["ndcg@10"] <= 1
    with pytest.raises(ValueError, match="teacher.pretrained"):
        BASELINES["truncated"](data, teacher=teacher, budget=Budget(k=2))
