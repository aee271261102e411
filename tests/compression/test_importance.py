import copy

import pytest
import torch

from layerwise.compression.importance import (
    IMPORTANCE, LOCAL_METHODS, ablation, angular_blocks, combined, compute_importance, local_scores,
    make_rescorer, shard_inputs,
)
from layerwise.compression.select import greedy, topk
from layerwise.compression.tracing import metric_with_removed, remove_layers, sample_losses, trace_layers
from tests.helpers.tiny_models import (
    calibration_batches, cyclic_data, make_identity, shared_trained, tiny_model,
)

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3", "gpt2", "bert", "t5"]


def _batches(model, seed=0, batch_size=6):
    return calibration_batches(model, cyclic_data(n_users=12, seed=seed), batch_size=batch_size, n_batches=2)


def _rel_err(a, b):
    return ((a - b).abs() / b.abs().clamp(min=1e-30)).max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_shards_equal_single_process(family):
    model = tiny_model(family, n_layers=4)
    batches = _batches(model)
    single = compute_importance(model, batches)
    traces = trace_layers(model, batches)
    # Each worker gets only its own modules (start=0), as a Ray task holding one shard would.
    shards = [local_scores(list(model.layers[s:e]), 0, **shard_inputs(traces, s, e)) for s, e in [(0, 2), (2, 4)]]
    for method in LOCAL_METHODS:
        sharded = torch.cat([part[method] for part in shards])
        assert sharded.shape == (4,)
        assert (single[method] > 0).all(), method
        assert _rel_err(sharded, single[method]) < 1e-5, method


def test_uneven_shards_by_start_index():
    model = tiny_model("llama", n_layers=4)
    batches = _batches(model)
    traces = trace_layers(model, batches)
    parts = [local_scores(model.layers, s, **shard_inputs(traces, s, e)) for s, e in [(0, 1), (1, 4)]]
    single = compute_importance(model, batches)
    for method in LOCAL_METHODS:
        assert _rel_err(torch.cat([p[method] for p in parts]), single[method]) < 1e-5


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_param_fisher_is_the_full_model_gradient(family):
    # T5's block 0 owns the position-bias table every block uses: its gradient must reach block 0.
    model = tiny_model(family, n_layers=4)
    (x, y), = _batches(model)[:1]
    model.eval()
    model.zero_grad()
    sample_losses(model, model.encode(x), y).sum().backward()
    expected = torch.tensor([sum(p.grad.double().pow(2).sum().item() for p in layer.parameters())
                             for layer in model.layers], dtype=torch.float64)
    got = compute_importance(model, [(x, y)], ("param_fisher",))["param_fisher"]
    assert _rel_err(got, expected) < 1e-4


def test_param_fisher_accumulates_over_batches():
    model = tiny_model("llama", n_layers=2)
    b1, b2 = _batches(model)
    one = compute_importance(model, [b1], ("param_fisher",))["param_fisher"]
    two = compute_importance(model, [b2], ("param_fisher",))["param_fisher"]
    both = compute_importance(model, [b1, b2], ("param_fisher",))["param_fisher"]
    assert _rel_err(both, one + two) < 1e-6
    assert (both > two * 1.01).all()  # the old project's overwrite would give `two`


def _gated_losses(model, x, y, layer, gate):
    """Per-sample losses with layer `layer`'s update scaled by gate (B, 1, 1)."""
    def hook(module, args, output):
        return output + (gate - 1) * (output - args[0])
    handle = model.layers[layer].register_forward_hook(hook)
    try:
        return sample_losses(model, model.encode(x), y)
    finally:
        handle.remove()


def test_gate_gradients_match_finite_differences():
    # GPT-2 computes wholly in float64 after .double(); LLaMA's RMSNorm casts to float32 inside, which
    # would leave float32 noise in the loss and ruin a finite difference.
    model = tiny_model("gpt2", n_layers=3).double().eval()
    (x, y), = _batches(model, batch_size=4)[:1]
    got = compute_importance(model, [(x, y)], ("fisher", "taylor"))
    eps = 1e-5
    for layer in range(3):
        per_sample = []
        for b in range(len(x)):
            bump = torch.zeros(len(x), 1, 1, dtype=torch.float64)
            bump[b] = eps
            with torch.no_grad():
                up = _gated_losses(model, x, y, layer, 1 + bump).sum()
                down = _gated_losses(model, x, y, layer, 1 - bump).sum()
            per_sample.append((up - down).item() / (2 * eps))  # dL/dg_b = dL_b/dg_b
        d = torch.tensor(per_sample, dtype=torch.float64)
        assert got["fisher"][layer].item() == pytest.approx(d.pow(2).mean().item(), rel=1e-6)
        assert got["taylor"][layer].item() == pytest.approx(d.mean().abs().item(), rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3", "gpt2", "t5"])
def test_identity_layer_scores_lowest_local(family):
    model = tiny_model(family, n_layers=4)
    make_identity(model, 2)
    scores = compute_importance(model, _batches(model))
    for method in ("fisher", "taylor", "block_influence", "angular", "activation"):
        s = scores[method]
        assert s[2].item() == 0.0, method
        assert (s[[0, 1, 3]] > 0).all(), method


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_identity_layer_scores_lowest_ablation(family):
    model, data = shared_trained(family)  # 3 layers, layer 1 is the identity
    batches = calibration_batches(model, data)
    for name, context in [("ablation", {"data": data}), ("ablation_loss", {"data": data}), ("ablation_loss", {})]:
        s = IMPORTANCE[name](model, batches, **context, k=2)  # unrelated context is ignored
        assert s.shape == (3,)
        assert s[1].item() == 0.0, name
        assert (s[[0, 2]] > 0).all(), (name, s)


@pytest.mark.parametrize("family, layer", [("llama", 1), ("t5", 0), ("t5", 2), ("bert", 1), ("qwen3", 3), ("qwen2", 0),
                                          ("gemma3", 1), ("gemma3", 2)])
def test_removal_gate_equals_physical_removal(family, layer):
    model = tiny_model(family, n_layers=4).eval()
    histories = cyclic_data(n_users=6).padded_histories(range(6), "valid", 12)
    short = copy.deepcopy(model)
    short.family.keep_layers(short.backbone, [l for l in range(4) if l != layer])
    assert short.n_layers == 3
    with torch.no_grad(), remove_layers(model, [layer]):
        gated = model.score(histories)
    with torch.no_grad():
        physical = short.score(histories)
    real = gated[:, 1:]
    assert torch.allclose(real, physical[:, 1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(real, model.score(histories)[:, 1:].detach(), atol=1e-4)


def test_angular_blocks():
    model = tiny_model("llama", n_layers=4)
    make_identity(model, 1)
    make_identity(model, 2)
    batches = _batches(model)
    one = angular_blocks(model, batches, 1)
    assert _rel_err(one, compute_importance(model, batches, ("angular",))["angular"]) < 1e-9
    two = angular_blocks(model, batches, 2)
    assert two.shape == (3,)
    assert two[1].item() == 0.0 and (two[[0, 2]] > 0).all()  # layers 1..2 do nothing together
    assert angular_blocks(model, batches, 4).shape == (1,)
    with pytest.raises(ValueError, match="block size"):
        angular_blocks(model, batches, 5)


def test_flags_and_hooks_restored_and_deterministic():
    model = tiny_model("llama", n_layers=2)
    model.dropout.p = 0.5  # dropout would make two runs differ if the estimators ran in train mode
    model.train()
    frozen = model.layers[0].mlp.down_proj.weight
    frozen.requires_grad_(False)
    batches = _batches(model)
    first = compute_importance(model, batches)
    second = compute_importance(model, batches)
    for method in LOCAL_METHODS:
        assert torch.equal(first[method], second[method])
    assert model.training and all(m.training for m in model.modules())
    assert not frozen.requires_grad and all(p.requires_grad for n, p in model.named_parameters()
                                            if p is not frozen)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad, never .backward()
    x, y = batches[0]
    with pytest.raises((IndexError, RuntimeError)):
        compute_importance(model, [(x, y.masked_fill(y != 0, 1000))])  # target outside the catalogue
    for layer in model.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert model.training and not frozen.requires_grad


def test_no_target_rejected():
    model = tiny_model("llama", n_layers=2)
    x, y = _batches(model)[0]
    with pytest.raises(ValueError, match="no calibration batch has a target"):
        compute_importance(model, [(x, torch.zeros_like(y))])


def test_rescorer_with_identity_removed_is_unchanged():
    model = tiny_model("llama", n_layers=4)
    make_identity(model, 2)
    batches = _batches(model)
    full = compute_importance(model, batches, ("block_influence", "fisher"))
    for method in ("block_influence", "fisher"):
        rescored = make_rescorer(model, batches, method)([0, 1, 3])
        assert _rel_err(rescored, full[method][[0, 1, 3]]) < 1e-6
    without_first = make_rescorer(model, batches, "block_influence")([1, 2, 3])
    assert without_first.shape == (3,) and not torch.allclose(without_first, full["block_influence"][1:])
    with pytest.raises(ValueError, match="no rescorer"):
        make_rescorer(model, batches, "combined")


def test_greedy_with_ablation_rescorer_drops_identity_first():
    model, data = shared_trained("llama")
    batches = calibration_batches(model, data)
    scores = ablation(model, batches, data, metric="loss")
    rescore = make_rescorer(model, batches, "ablation_loss", data=data)
    kept = greedy(scores, 1, rescore=rescore)
    assert len(kept) == 1 and kept[0] != 1
    assert greedy(scores, 2, rescore=rescore) == [0, 2]


def test_combined_chooses_weights_on_validation():
    model, data = shared_trained("llama")
    batches = calibration_batches(model, data)
    good = ablation(model, batches, data, metric="loss")  # identity layer 1 scores 0
    scores = {"good": good, "bad": -good}
    result = combined(model, batches, data, k=2, scores=scores, max_users=None)
    choice = result.combination
    assert choice.weights == {"bad": 0.0, "good": 1.0}
    assert choice.kept == [0, 2] == topk(result, 2)
    full_ndcg = metric_with_removed(model, [], "ndcg@10", data=data)
    assert choice.valid_ndcg == pytest.approx(full_ndcg)  # removing the identity layer costs nothing
    assert choice.valid_ndcg == max(ndcg for _, ndcg in choice.tried)
    assert result.shape == (3,) and result.min() >= 0 and result.max() <= 1
    assert len(choice.tried) == 3  # uniform, bad alone, good alone (the grid adds nothing new for 2)


def test_registry_contract():
    assert sorted(IMPORTANCE) == sorted([*LOCAL_METHODS, "ablation", "ablation_loss", "combined"])
    model = tiny_model("llama", n_layers=2)
    batches = _batches(model)
    for name in LOCAL_METHODS:
        s = IMPORTANCE[name](model, iter(batches), data=None, k=1)  # a one-shot iterator is enough
        assert s.shape == (2,) and torch.isfinite(s).all() and (s > 0).all(), name
    loss = IMPORTANCE["ablation_loss"](model, iter(batches))  # re-used per layer: copied to a list
    assert loss.shape == (2,) and (loss != 0).all()
    with pytest.raises(ValueError, match="pass k="):
        IMPORTANCE["combined"](model, batches, data=cyclic_data())
    with pytest.raises(ValueError, match="needs validation data"):
        IMPORTANCE["ablation"](model, batches)
    with pytest.raises(ValueError, match="unknown local methods"):
        compute_importance(model, batches, ("fisher", "hessian"))
