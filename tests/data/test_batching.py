"""Batches run in length groups with their padding cut: every row once, the cheapest groups, and the same
numbers as the whole padded batch for every family (scores, the training and healing losses and their
gradients, the evaluation's per-user results)."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from layerwise.compression.compact import build_compact
from layerwise.data.batching import mean_over_groups, split_by_length, trim_left, window_lengths
from layerwise.compression.distill import HealConfig, distillation_loss, heal_loss, teacher_targets
from layerwise.evaluation.evaluate import evaluate
from layerwise.compression.hidden import capture_layer_inputs
from layerwise.models.families import FAMILIES
from layerwise.training.train import TrainConfig, batch_loss, cloze_mask, next_item_loss
from tests.helpers.fake_data import random_data
from tests.helpers.tiny_models import tiny_model

T = 12
N_ITEMS = 20


def _histories(lengths, seed=0, width=T) -> torch.Tensor:
    """(B, width) left-padded random items with the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n:
            out[row, width - n:] = torch.randint(1, N_ITEMS + 1, (n,), generator=generator)
    return out


def _full_scores(model, histories) -> torch.Tensor:
    """The reference: the model on the whole left-padded window, nothing cut."""
    return model.head(model.encode(model.prepare(histories))[:, -1])


def test_window_lengths_and_trim_left():
    x = _histories([3, 1, 5, 0])
    assert window_lengths(x).tolist() == [3, 1, 5, 0]
    y = x * 2
    start, tx, ty = trim_left(x, y)
    assert start == T - 5 and tx.shape == (4, 5) and torch.equal(tx, x[:, -5:]) and torch.equal(ty, y[:, -5:])
    start, tx = trim_left(torch.zeros(2, T, dtype=torch.long))
    assert start == T - 1 and tx.shape == (2, 1)  # all padding: one column stays


def test_split_by_length_keeps_every_row_once_in_trimmed_groups_of_similar_length():
    x = _histories([1, 9, 2, 10, 1, 3, 8, 2])
    y = x * 3
    groups = split_by_length(x, y, overhead=8)
    rows = torch.cat([gx[:, -1] for _, gx, _ in groups])
    assert sorted(rows.tolist()) == sorted(x[:, -1].tolist())  # each row once (last items are all real)
    assert all(torch.equal(gy, gx * 3) for _, gx, gy in groups)  # targets cut with their inputs
    lengths = [window_lengths(gx).tolist() for _, gx, _ in groups]
    assert [max(g) for g in lengths] == sorted(max(g) for g in lengths)  # shortest first
    assert all(start == T - gx.shape[1] and gx.shape[1] == max(window_lengths(gx)) for start, gx, _ in groups)
    assert len(groups) > 1 and len(split_by_length(x, y, overhead=math.inf)) == 1
    assert len(split_by_length(x, y, overhead=0)) == len(set(window_lengths(x).tolist()))


def test_the_groups_cost_the_fewest_cells():
    """Against every split of the sorted rows into contiguous groups (2^(n-1) of them), by brute force."""
    lengths = sorted(np.random.default_rng(0).integers(1, T + 1, 9).tolist())
    overhead = 10.0

    def cost(bounds):
        return sum((b - a) * lengths[b - 1] + overhead for a, b in zip(bounds, bounds[1:]))

    best = min(cost([0, *inner, 9]) for r in range(9) for inner in itertools.combinations(range(1, 9), r))
    x = _histories(lengths)
    groups = split_by_length(x, x, overhead=overhead)
    assert sum(gx.numel() for _, gx, _ in groups) + overhead * len(groups) == best


def test_mean_over_groups_is_the_mean_over_the_batch_targets():
    x = _histories([1, 9, 2, 10, 1, 3])
    y = torch.roll(x, -1, dims=1) * (x != 0)
    whole = y[y != 0].float().mean()
    grouped = mean_over_groups(split_by_length(x, y), lambda start, gx, gy: gy[gy != 0].float().mean())
    assert torch.allclose(whole, grouped)
    with pytest.raises(ValueError, match="no targets"):
        mean_over_groups(split_by_length(x, torch.zeros_like(y)), lambda *_: torch.tensor(0.0))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trimmed_scores_equal_the_full_window(family):
    model = tiny_model(family, n_layers=2, n_items=N_ITEMS, max_len=T).eval()
    histories = _histories([1, 4, 2, 3])  # 8 leading columns are padding in every row
    with torch.no_grad():
        full, trimmed = _full_scores(model, histories), model.score(histories)
    assert torch.allclose(trimmed[:, 1:], full[:, 1:], atol=1e-5, rtol=1e-4), (trimmed - full).abs().max()


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_absolute_position_families_need_the_original_positions(family):
    """Cutting without the offset moves a learned absolute position: the scores change. (The check above
    therefore tests the offset, not an accident of these weights.)"""
    model = tiny_model(family, n_layers=2, n_items=N_ITEMS, max_len=T).eval()
    start, inputs = trim_left(model.prepare(_histories([1, 4, 2, 3])))
    with torch.no_grad():
        right = model.head(model.encode(inputs, start=start)[:, -1])
        shifted = model.head(model.encode(inputs)[:, -1])
    assert (right[:, 1:] - shifted[:, 1:]).abs().max() > 1e-3


def _windows(model, seed=1):
    """A batch of 6 windows of lengths 1 to 50 (two length groups), cloze-masked for encoders: (x, y) (6, 50)."""
    x = _histories([2, 40, 3, 1, 50, 4], seed=seed, width=50)
    y = torch.roll(x, -1, dims=1) * (x != 0)
    if not model.causal:
        x, y = cloze_mask(x, model.mask_index, 0.5, torch.Generator().manual_seed(0))
    return x, y


def _same_gradients(a, b) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-3), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_training_step_in_groups_matches_the_whole_padded_batch(family):
    model = tiny_model(family, n_layers=2, n_items=N_ITEMS, max_len=50).train()  # no dropout in tiny models
    twin = copy.deepcopy(model)
    x, y = _windows(model)
    config = TrainConfig()
    full = next_item_loss(model, model.encode(x), y, config, torch.Generator())  # no cut, one call
    grouped = batch_loss(twin, x, y, config, torch.Generator())
    assert len(split_by_length(x, y)) > 1 and torch.allclose(full, grouped, atol=1e-5), (full, grouped)
    full.backward()
    grouped.backward()
    _same_gradients(model, twin)


def test_sampled_negatives_are_drawn_once_for_all_groups():
    """The sampled loss's candidates are one draw for the whole batch, so the groups' loss is the padded
    batch's with the same generator state (a draw per group would give another loss)."""
    model = tiny_model("llama", n_layers=2, n_items=N_ITEMS, max_len=50).train()
    x, y = _windows(model)
    config = TrainConfig(loss="sampled", n_negatives=8)
    full = next_item_loss(model, model.encode(x), y, config, torch.Generator().manual_seed(3))
    grouped = batch_loss(model, x, y, config, torch.Generator().manual_seed(3))
    assert len(split_by_length(x, y)) > 1 and torch.allclose(full, grouped, atol=1e-5), (full, grouped)


def _whole_batch_heal_loss(student, teacher, x, y, config) -> torch.Tensor:
    """The reference, written out: the healing loss of the padded batch in one call, each hidden MSE
    divided by the teacher's variance over the batch's targets."""
    where = y != 0
    with torch.no_grad():
        t_states, _ = capture_layer_inputs(teacher, x)
    s_states, _ = capture_layer_inputs(student, x)
    loss = distillation_loss(student.head(s_states["final"][where]), teacher.head(t_states["final"][where]),
                             y[where], config.temperature, config.kd_weight, config.ce_weight)
    pairs = list(enumerate(teacher_targets(teacher, student)))
    mse = sum(F.mse_loss(s_states[j][where], t_states[t][where]) / t_states[t][where].var() for j, t in pairs)
    return loss + config.hidden_weight * mse / len(pairs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_healing_step_in_groups_matches_the_whole_padded_batch(family):
    teacher = tiny_model(family, n_layers=4, n_items=N_ITEMS, max_len=50).eval().requires_grad_(False)
    student = build_compact(teacher, [0, 3], bridge_rank=4)
    twin = copy.deepcopy(student)
    x, y = _windows(teacher)
    config = HealConfig(max_len=50, hidden_weight=1.0, kd_weight=1.0, ce_weight=1.0)
    full = _whole_batch_heal_loss(student, teacher, x, y, config)  # no cut, one call
    grouped = heal_loss(twin, teacher, x, y, config)
    assert len(split_by_length(x, y)) > 1 and torch.allclose(full, grouped, atol=1e-5), (full, grouped)
    full.backward()
    grouped.backward()
    _same_gradients(student, twin)


def test_evaluation_in_length_order_returns_each_users_own_result():
    """Users are scored in batches sorted by history length; the per-user results are the ones each user
    gets alone, in the order asked for."""
    data = random_data(n_users=30, n_items=N_ITEMS, min_len=3, max_len=15, seed=0)
    model = tiny_model("gpt2", n_layers=2, n_items=N_ITEMS, max_len=T).eval()
    users = np.random.default_rng(0).permutation(30)
    together = evaluate(model.score, data, users=users, max_len=T, batch_size=8)
    alone = evaluate(model.score, data, users=users, max_len=T, batch_size=1)
    assert together.users.tolist() == users.tolist()
    for metric in ("ndcg@10", "hr@5", "mrr"):
        assert np.allclose(together.per_user[metric], alone.per_user[metric]), metric
    # The result is not order-blind: another user order permutes the per-user values with it.
    identity = evaluate(model.score, data, max_len=T, batch_size=8)
    assert np.allclose(identity.per_user["mrr"][users], together.per_user["mrr"])
