"""Length-bucketed batches and padding trimming: every window once, and the same numbers as the full window
for every family (scores, the training loss and its gradients, the evaluation's per-user results)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from layerwise.data.batching import length_batches, trim_left, window_lengths
from layerwise.evaluate import evaluate
from layerwise.models.families import FAMILIES
from layerwise.train import TrainConfig, cloze_mask, next_item_loss
from tests.helpers.fake_data import random_data
from tests.helpers.tiny_models import tiny_model

T = 12
N_ITEMS = 20


def _histories(lengths, seed=0) -> torch.Tensor:
    """(B, T) left-padded random items with the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n:
            out[row, T - n:] = torch.randint(1, N_ITEMS + 1, (n,), generator=generator)
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


def test_length_batches_cover_every_window_once_with_similar_lengths():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 51, (1000,), generator=generator)
    batches = length_batches(lengths, 32, generator)
    flat = torch.cat(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    # About as many steps as batches of 32 windows, each about 32 windows' worth of cells.
    assert abs(len(batches) - 1000 / 32) <= 2
    budget = 32 * float(lengths.float().mean())
    cells = [float(lengths[b].sum()) for b in batches]
    assert max(cells) <= budget + 50 + budget / 2 and sorted(cells)[1] >= budget - 50
    # Similar lengths inside a batch: the spread within batches is a small part of the overall spread.
    spread = np.mean([float(lengths[b].max() - lengths[b].min()) for b in batches])
    assert spread < 5, spread


def test_length_batches_are_seeded_and_differ_per_epoch():
    lengths = torch.randint(1, 51, (500,), generator=torch.Generator().manual_seed(1))
    first = length_batches(lengths, 16, torch.Generator().manual_seed(3))
    again = length_batches(lengths, 16, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    generator = torch.Generator().manual_seed(3)
    epoch1, epoch2 = length_batches(lengths, 16, generator), length_batches(lengths, 16, generator)
    assert [b.tolist() for b in epoch1] != [b.tolist() for b in epoch2]


def test_length_batches_give_every_rank_a_window():
    lengths = torch.tensor([50] * 3 + [1] * 5)
    batches = length_batches(lengths, 1, torch.Generator().manual_seed(0), min_windows=3)
    assert min(len(b) for b in batches) >= 3 and sorted(torch.cat(batches).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="cannot fill"):
        length_batches(torch.tensor([1, 2]), 4, torch.Generator(), min_windows=3)


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_training_step_matches_the_full_window(family):
    model = tiny_model(family, n_layers=2, n_items=N_ITEMS, max_len=T).train()  # no dropout in tiny models
    twin = copy.deepcopy(model)
    x = _histories([2, 5, 3, 1], seed=1)
    y = torch.roll(x, -1, dims=1) * (x != 0)
    if not model.causal:
        x, y = cloze_mask(x, model.mask_index, 0.5, torch.Generator().manual_seed(0))
    config = TrainConfig()
    full_loss = next_item_loss(model, model.encode(x), y, config, torch.Generator())
    start, tx, ty = trim_left(x, y)
    trim_loss = next_item_loss(twin, twin.encode(tx, start=start), ty, config, torch.Generator())
    assert start == T - 5 and torch.allclose(full_loss, trim_loss, atol=1e-5), (full_loss, trim_loss)
    full_loss.backward()
    trim_loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-3), name


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
