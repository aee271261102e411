"""NoisyData: identity at level 0, the right fraction of changed positions, targets untouched, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerwise.evaluation.evaluate import evaluate, item_popularity
from layerwise.evaluation.noise import KINDS, NoisyData
from tests.helpers.fake_data import FakeSequenceData


def _data(n_users: int = 200, n_items: int = 300, seed: int = 0) -> FakeSequenceData:
    """Distinct items per user (no repeats, so every moved item is a changed position) and a skewed
    popularity: low item indices are far more frequent."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1)
    seqs = [(rng.choice(n_items, size=int(rng.integers(30, 90)), replace=False, p=p / p.sum()) + 1).tolist()
            for _ in range(n_users)]
    return FakeSequenceData(seqs, n_items)


DATA = _data()


def _changed_fraction(data, noisy, kind: str) -> float:
    changed = total = 0
    for u in range(data.n_users):
        clean, new = data.history(u, "test"), noisy.history(u, "test")
        changed += len(clean) - len(new) if kind == "drop" else int((clean != new).sum())
        total += len(clean)
    return changed / total


@pytest.mark.parametrize("kind", KINDS)
def test_level_zero_is_the_identity(kind):
    noisy = NoisyData(DATA, kind, 0.0, seed=3)
    users = np.arange(DATA.n_users)
    assert torch.equal(noisy.padded_histories(users, "test", 50), DATA.padded_histories(users, "test", 50))
    assert all(np.array_equal(noisy.history(u, "test"), DATA.history(u, "test")) for u in range(20))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", [0.1, 0.2, 0.4])
def test_fraction_of_changed_positions_matches_the_level(kind, level):
    noisy = NoisyData(DATA, kind, level, seed=1)
    # ~12k positions: sd of the fraction is ~0.005; reorder loses a little at the ragged block edges.
    assert _changed_fraction(DATA, noisy, kind) == pytest.approx(level, abs=0.03 if kind == "reorder" else 0.015)


@pytest.mark.parametrize("kind", KINDS)
def test_targets_and_other_stages_never_change(kind):
    noisy = NoisyData(DATA, kind, 0.4, seed=2)
    np.testing.assert_array_equal(noisy.targets("test"), DATA.targets("test"))
    assert [noisy.target(u, "test") for u in range(10)] == [DATA.target(u, "test") for u in range(10)]
    users = np.arange(30)
    assert torch.equal(noisy.padded_histories(users, "valid", 40), DATA.padded_histories(users, "valid", 40))
    assert np.array_equal(noisy.train_sequence(5), DATA.train_sequence(5))
    assert noisy.n_items == DATA.n_items and noisy.fingerprint == DATA.fingerprint
    assert noisy.protocol["noise"] == {"kind": kind, "level": 0.4, "seed": 2, "block": 4, "seen": "noisy",
                                       "stage": "test"}


@pytest.mark.parametrize("kind", KINDS)
def test_reproducible_and_independent_of_user_order(kind):
    users = np.arange(DATA.n_users)
    first = NoisyData(DATA, kind, 0.2, seed=5).padded_histories(users, "test", 50)
    again = NoisyData(DATA, kind, 0.2, seed=5)
    backwards = again.padded_histories(users[::-1].copy(), "test", 50)
    assert torch.equal(first, backwards.flip(0))
    other = NoisyData(DATA, kind, 0.2, seed=6).padded_histories(users, "test", 50)
    assert not torch.equal(first, other)


def test_padded_histories_agree_with_history():
    noisy = NoisyData(DATA, "drop", 0.4, seed=0)
    padded = noisy.padded_histories([0, 1, 2], "test", 100)
    for row, u in enumerate([0, 1, 2]):
        hist = noisy.history(u, "test")
        assert padded[row, -len(hist):].tolist() == hist.tolist()
        assert (padded[row, : 100 - len(hist)] == 0).all()


def test_replacements_differ_from_the_original_and_follow_popularity():
    uniform = NoisyData(DATA, "replace_uniform", 0.4, seed=0)
    popular = NoisyData(DATA, "replace_popularity", 0.4, seed=0)
    pop = item_popularity(DATA)
    means = {}
    for name, noisy in (("uniform", uniform), ("popular", popular)):
        new_items = []
        for u in range(DATA.n_users):
            clean, new = DATA.history(u, "test"), noisy.history(u, "test")
            assert len(new) == len(clean)
            new_items.append(new[clean != new])
        new_items = np.concatenate(new_items)
        assert ((new_items >= 1) & (new_items <= DATA.n_items)).all()
        means[name] = pop[new_items].mean()
    assert means["popular"] > 1.5 * means["uniform"]  # here about 2x


def test_drop_keeps_one_item_and_reorder_stays_local():
    short = FakeSequenceData([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]], n_items=13)
    dropped = NoisyData(short, "drop", 0.99, seed=0)
    assert all(len(dropped.history(u, "test")) >= 1 for u in range(2))
    assert len(dropped.history(1, "test")) < 9  # something was dropped
    reordered = NoisyData(DATA, "reorder", 0.4, seed=0, block=3)
    for u in range(50):
        clean, new = DATA.history(u, "test"), reordered.history(u, "test")
        assert sorted(clean.tolist()) == sorted(new.tolist())
        position = {item: i for i, item in enumerate(new.tolist())}
        assert max(abs(i - position[item]) for i, item in enumerate(clean.tolist())) <= 2  # block - 1


def test_evaluate_reads_a_noisy_view():
    bias = torch.linspace(1.0, 0.0, DATA.n_items + 1, dtype=torch.float64)

    def scorer(histories):  # prefers items that co-occur by index with the last item: input-dependent
        last = histories[:, -1:].to(torch.float64)
        return bias - ((torch.arange(DATA.n_items + 1) - last).abs() / DATA.n_items)

    clean = evaluate(scorer, DATA, ks=(10,))
    same = evaluate(scorer, NoisyData(DATA, "replace_uniform", 0.0), ks=(10,))
    noisy = evaluate(scorer, NoisyData(DATA, "replace_uniform", 0.4, seen="clean"), ks=(10,))
    np.testing.assert_array_equal(same.per_user["ndcg@10"], clean.per_user["ndcg@10"])
    assert not np.array_equal(noisy.per_user["ndcg@10"], clean.per_user["ndcg@10"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        NoisyData(DATA, "swap", 0.1)
    with pytest.raises(ValueError, match="level"):
        NoisyData(DATA, "drop", 1.0)
