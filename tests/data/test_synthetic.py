"""The synthetic generator: exact sizes, constraints, reproducibility, and structure worth learning."""

import numpy as np
import pytest

from layerwise.data import build_sequences, generate_synthetic, read_atomic, write_atomic

SIZE = dict(n_users=1500, n_items=300, n_interactions=30_000)


@pytest.fixture(scope="module")
def log():
    return generate_synthetic(**SIZE, seed=3)


@pytest.fixture(scope="module")
def data(log):
    return build_sequences(log, "syn")


def test_sizes_and_constraints(log, data):
    assert len(log) == SIZE["n_interactions"]
    assert data.n_users == SIZE["n_users"] and data.n_items <= SIZE["n_items"]
    assert data.lengths.min() >= 5 and data.lengths.sum() == SIZE["n_interactions"]
    assert data.protocol["dropped"]["interactions"] == 0
    for u in range(data.n_users):  # no user sees an item twice
        seq = data.sequence(u)
        assert len(np.unique(seq)) == len(seq)


def test_dense_catalogue_still_has_exact_lengths_and_no_repeats():
    # 18 of at most 20 items per user on average: some walks cannot find enough new items on their own
    # and are topped up with unseen items; the invariants must hold all the same.
    data = build_sequences(generate_synthetic(300, 40, 5400, seed=0), "dense")
    assert data.lengths.sum() == 5400 and data.lengths.max() <= 20 and data.lengths.min() >= 5
    assert all(len(np.unique(data.sequence(u))) == len(data.sequence(u)) for u in range(data.n_users))


def test_log_is_in_time_order_with_distinct_times_per_user(log):
    assert np.all(np.diff(log.timestamp) >= 0)
    pairs = np.unique(np.char.add(np.char.add(log.user, "@"), log.timestamp.astype(str)))
    assert len(pairs) == len(log)  # no ties within a user: the chronological order is unambiguous


def test_activity_and_popularity_are_skewed(data):
    lengths = np.sort(data.lengths)
    assert lengths[-1] > 5 * np.median(lengths)  # log-normal activity: a long tail of heavy users
    counts = np.sort(np.bincount(data.items)[1:])[::-1]
    share_top10 = counts[: len(counts) // 10].sum() / counts.sum()
    assert 0.2 < share_top10 < 0.8  # a popularity head (MovieLens: 0.43), far from uniform (0.1)


def test_reproducible_by_seed():
    a = generate_synthetic(200, 100, 3000, seed=7)
    b = generate_synthetic(200, 100, 3000, seed=7)
    c = generate_synthetic(200, 100, 3000, seed=8)
    assert a.user.tolist() == b.user.tolist() and a.item.tolist() == b.item.tolist()
    assert a.timestamp.tolist() == b.timestamp.tolist() and a.item_meta == b.item_meta
    assert build_sequences(a, "a").fingerprint == build_sequences(b, "b").fingerprint
    assert build_sequences(a, "a").fingerprint != build_sequences(c, "c").fingerprint


def test_items_have_titles_and_topic_genres(data):
    assert all(text for text in data.item_text[1:])
    assert all(1 <= len(g) <= 2 for g in data.item_genres[1:])
    assert len({g[0] for g in data.item_genres[1:]}) == 20  # one genre per topic


def _hit_rate(scores: np.ndarray, targets: np.ndarray, seen: list[np.ndarray], k: int = 10) -> float:
    """HR@k of (n_users, n_items+1) scores with padding and already-seen items excluded."""
    scores = scores.astype(np.float64).copy()
    scores[:, 0] = -np.inf
    for row, items in enumerate(seen):
        scores[row, items] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def test_previous_item_predicts_the_next_better_than_popularity(data):
    """A first-order Markov model fit on training histories beats popularity on the test targets."""
    n = data.n_items + 1
    counts, pop = np.zeros((n, n)), np.zeros(n)
    for u in range(data.n_users):
        train = data.train_sequence(u)
        np.add.at(counts, (train[:-1], train[1:]), 1.0)
        np.add.at(pop, train, 1.0)
    histories = [data.history(u, "test") for u in range(data.n_users)]
    last = np.array([h[-1] for h in histories])
    targets = data.targets("test")
    popularity = _hit_rate(np.tile(pop, (data.n_users, 1)), targets, histories)
    markov = _hit_rate(counts[last] + 1e-6 * pop, targets, histories)  # popularity only breaks ties
    assert popularity > 0.02  # popularity itself carries signal ...
    assert markov > 1.5 * popularity, (markov, popularity)  # ... and the sequence carries much more


def test_write_atomic_round_trip(tmp_path):
    log = generate_synthetic(100, 60, 1200, seed=1)
    write_atomic(log, tmp_path, "syn")
    back = read_atomic(tmp_path, "syn")
    assert back.user.tolist() == log.user.tolist() and back.item.tolist() == log.item.tolist()
    assert np.array_equal(back.timestamp, log.timestamp) and back.item_meta == log.item_meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.inter", "syn.item"]  # no temp files left


def test_impossible_sizes_are_refused():
    with pytest.raises(ValueError, match="5 \\* n_users <= n_interactions"):
        generate_synthetic(100, 50, 400)  # fewer than 5 per user
    with pytest.raises(ValueError, match="n_users \\* \\(n_items // 2\\)"):
        generate_synthetic(10, 40, 201)  # more than half the catalogue per user
