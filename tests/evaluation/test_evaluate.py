import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from layerwise.data.split import SequenceData
from layerwise.evaluation.evaluate import (EvalResult, NegativeSampler, SampledRanking, evaluate, item_popularity, recommend,
                                sample_negatives)
from tests.helpers.fake_data import FakeSequenceData, random_data

# Padding scores highest: if column 0 were ranked, every rank below would be one larger.
ITEM_SCORES = torch.tensor([100.0, 0.9, 0.8, 0.7, 0.6, 0.5])
HAND = FakeSequenceData([[1, 2, 3, 4], [4, 2, 5, 2], [5, 1, 3]], n_items=5)


def fixed_scorer(histories):
    return ITEM_SCORES.expand(histories.shape[0], -1)


def tie_scorer(histories):
    """Deterministic per row, many ties, independent of the batch it comes in (data with 30 items)."""
    items = torch.arange(31)
    return ((histories.sum(1, keepdim=True) * 7 + items * 13) % 17).float()


@pytest.mark.parametrize(
    "stage, exclude_seen, expected_mrr",
    [
        ("test", False, [1 / 4, 1 / 2, 1 / 3]),
        # u0: 1,2,3 masked -> first. u1: 4,5 masked but its repeated target 2 is not -> item 1 still
        # beats it. u2: 5,1 masked -> only item 2 beats 3.
        ("test", True, [1, 1 / 2, 1 / 2]),
        ("valid", True, [1, 1 / 3, 1]),
        ("valid", False, [1 / 3, 1 / 5, 1]),
    ],
)
def test_exclude_seen_hand_case(stage, exclude_seen, expected_mrr):
    r = evaluate(fixed_scorer, HAND, stage=stage, exclude_seen=exclude_seen, ks=(1, 2))
    np.testing.assert_allclose(r.per_user["mrr"], expected_mrr)
    np.testing.assert_allclose(r.per_user["hr@1"], [m == 1 for m in expected_mrr])
    assert r.means["mrr"] == pytest.approx(np.mean(expected_mrr))
    assert r.protocol["exclude_seen"] is exclude_seen and r.protocol["stage"] == stage
    assert r.users.tolist() == [0, 1, 2]


def test_padding_column_never_ranked():
    def pad_only(histories):
        scores = torch.zeros(histories.shape[0], 6)
        scores[:, 0] = 1e9
        return scores

    r = evaluate(pad_only, HAND, exclude_seen=False, ks=(5,))
    # The target ties with the other 4 real items: rank 4 of 5, not 5 of 6.
    np.testing.assert_allclose(r.per_user["mrr"], [0.2, 0.2, 0.2])
    np.testing.assert_allclose(r.per_user["hr@5"], [1, 1, 1])


def test_batching_gives_identical_results_and_bounded_batches():
    data = random_data(37, 30, 3, 12, seed=1)
    rows_seen = []

    def recording(histories):
        rows_seen.append(histories.shape[0])
        return tie_scorer(histories)

    full = evaluate(recording, data, batch_size=1000)
    for bs in (1, 5):
        rows_seen.clear()
        r = evaluate(recording, data, batch_size=bs)
        assert max(rows_seen) == bs and sum(rows_seen) == 37
        for name, values in full.per_user.items():
            np.testing.assert_array_equal(r.per_user[name], values, err_msg=name)
    assert full.means["ndcg@10"] > 0


def test_perfect_scorer_scores_one():
    n = 20
    data = FakeSequenceData([[(u + j) % n + 1 for j in range(5 + u % 4)] for u in range(40)], n_items=n)

    def perfect(histories):
        scores = torch.zeros(histories.shape[0], n + 1)
        scores[torch.arange(histories.shape[0]), histories[:, -1] % n + 1] = 1.0
        return scores

    for stage in ("valid", "test"):
        r = evaluate(perfect, data, stage=stage)
        assert r.means["ndcg@10"] == 1.0 and r.means["mrr"] == 1.0 and r.means["hr@5"] == 1.0
        assert r.means["precision@5"] == pytest.approx(0.2)


def _random_scorer(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda h: torch.rand(h.shape[0], 51, generator=gen)


def test_random_scorer_matches_analytic_expectation():
    n_items, n_users = 50, 3000
    data = random_data(n_users, n_items, 3, 8, seed=2)
    r = evaluate(_random_scorer(0), data, exclude_seen=False, batch_size=512)
    ndcg10 = sum(1 / math.log2(i + 2) for i in range(10)) / n_items
    assert r.means["hr@10"] == pytest.approx(10 / n_items, abs=0.03)
    assert r.means["ndcg@10"] == pytest.approx(ndcg10, abs=0.02)
    assert r.means["mrr"] == pytest.approx(sum(1 / i for i in range(1, n_items + 1)) / n_items, abs=0.02)

    # With seen items excluded each user ranks among m = n_items - |seen minus target| candidates.
    r = evaluate(_random_scorer(1), data, exclude_seen=True, batch_size=512)
    expected = []
    for u in range(n_users):
        seen = set(data.history(u, "test").tolist()) - {data.target(u, "test")}
        m = n_items - len(seen)
        expected.append(sum(1 / math.log2(i + 2) for i in range(min(10, m))) / m)
    assert r.means["ndcg@10"] == pytest.approx(np.mean(expected), abs=0.02)
    assert np.mean(expected) > ndcg10


def test_sample_negatives_excludes_target_seen_and_padding():
    data = random_data(200, 40, 3, 20, seed=3)
    for strategy in ("uniform", "popularity"):
        spec = SampledRanking(n_negatives=15, strategy=strategy, seed=7)
        weights = item_popularity(data)
        for u in range(data.n_users):
            seen, target = data.history(u, "test"), data.target(u, "test")
            neg = sample_negatives(u, seen, target, 40, spec, weights)
            assert len(neg) == 15 and len(set(neg.tolist())) == 15
            assert target not in neg and not set(neg.tolist()) & set(seen.tolist())
            assert neg.min() >= 1 and neg.max() <= 40
            assert weights[neg].min() > 0
            np.testing.assert_array_equal(neg, sample_negatives(u, seen, target, 40, spec, weights))


def test_popularity_sampling_follows_weights_and_too_many_raises():
    weights = np.array([0, 1000, 1, 0, 1, 1], dtype=float)
    spec = SampledRanking(n_negatives=1, strategy="popularity")
    picks = [int(sample_negatives(u, np.array([], np.int64), 5, 5, spec, weights)[0]) for u in range(300)]
    assert picks.count(1) > 290 and 3 not in picks
    with pytest.raises(ValueError, match="user 4: only 2 items"):
        sample_negatives(4, np.array([1]), 5, 5, SampledRanking(3, "popularity"), weights)
    with pytest.raises(ValueError, match="user 9: only 3 items"):
        sample_negatives(9, np.array([1]), 5, 5, SampledRanking(4, "uniform"), None)


def test_sampling_frequencies_and_skewed_fallback():
    uniform = NegativeSampler(10, SampledRanking(n_negatives=2, strategy="uniform"))
    counts = np.zeros(11, int)
    for u in range(4000):
        counts[uniform(u, np.array([1]), 10)] += 1
    # Items 2..9 are allowed, each in a user's pair with probability 2/8.
    assert counts[[0, 1, 10]].sum() == 0 and counts[2:10].min() > 880 and counts[2:10].max() < 1120
    by_pop = NegativeSampler(3, SampledRanking(n_negatives=1, strategy="popularity"), np.array([0, 3.0, 1, 0]))
    picks = [int(by_pop(u, np.array([], np.int64), 3)[0]) for u in range(2000)]
    assert 1400 < picks.count(1) < 1600 and picks.count(1) + picks.count(2) == 2000
    # So skewed that the stream almost never reaches items 2 and 4: the exact fallback still returns them.
    skewed = np.array([0, 1e9, 1, 0, 1, 1])
    for u in range(20):
        neg = sample_negatives(u, np.array([], np.int64), 5, 5, SampledRanking(3, "popularity"), skewed)
        assert sorted(neg.tolist()) == [1, 2, 4]


def test_sampled_ranking_hand_checked_and_reproducible():
    data = random_data(60, 40, 3, 10, seed=4)

    def by_id(histories):  # higher item id is better, no ties
        return torch.arange(41, dtype=torch.float32).expand(histories.shape[0], -1)

    spec = SampledRanking(n_negatives=10, strategy="uniform", seed=5)
    r = evaluate(by_id, data, sampled=spec, batch_size=7, ks=(5,))
    expected = []
    for u in range(data.n_users):
        neg = sample_negatives(u, data.history(u, "test"), data.target(u, "test"), 40, spec)
        expected.append(1 / (1 + (neg > data.target(u, "test")).sum()))
    np.testing.assert_allclose(r.per_user["mrr"], expected)
    again = evaluate(by_id, data, sampled=spec, batch_size=60, ks=(5,), users=np.arange(59, -1, -1))
    np.testing.assert_allclose(again.per_user["mrr"], expected[::-1])
    other = evaluate(by_id, data, sampled=SampledRanking(10, "uniform", seed=6), ks=(5,))
    assert not np.array_equal(other.per_user["mrr"], r.per_user["mrr"])
    assert r.protocol["ranking"] == "sampled" and r.protocol["n_negatives"] == 10
    assert r.protocol["strategy"] == "uniform" and r.protocol["n_users"] == 60


def test_parquet_round_trip_and_to_dict(tmp_path):
    data = random_data(25, 30, 3, 9, seed=5)
    r = evaluate(tie_scorer, data, users=[3, 1, 4, 15, 9])
    path = r.to_parquet(tmp_path / "sub" / "eval.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.parquet"]
    table = pq.read_table(path)
    assert table.column("user").to_pylist() == [3, 1, 4, 15, 9]
    np.testing.assert_array_equal(table.column("ndcg@10").to_numpy(), r.per_user["ndcg@10"])
    back = EvalResult.from_parquet(path)
    assert back.protocol == json.loads(json.dumps(r.to_dict()["protocol"]))
    assert back.means == pytest.approx(r.means)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["protocol"]["data_fingerprint"] == "fake-fingerprint" and d["protocol"]["ks"] == [5, 10, 20]
    assert d["protocol"]["ranking"] == "full" and d["means"]["mrr"] == pytest.approx(r.means["mrr"])


def test_parquet_write_failure_leaves_nothing(tmp_path, monkeypatch):
    r = evaluate(fixed_scorer, HAND)

    def broken(table, where):
        open(where, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)  # the pyarrow.parquet that evaluate writes with
    with pytest.raises(OSError, match="disk full"):
        r.to_parquet(tmp_path / "eval.parquet")
    assert list(tmp_path.iterdir()) == []


def test_bad_scorer_output_and_arguments():
    with pytest.raises(ValueError, match=r"shape \(3, 6\)"):
        evaluate(lambda h: torch.zeros(h.shape[0], 5), HAND)

    def nan_for_user_two(histories):  # user 2's test history [5, 1] is the only one ending in item 1
        scores = fixed_scorer(histories).clone()
        scores[histories[:, -1] == 1, 3] = float("nan")
        return scores

    with pytest.raises(ValueError, match="user 2"):
        evaluate(nan_for_user_two, HAND)
    with pytest.raises(ValueError, match="stage"):
        evaluate(fixed_scorer, HAND, stage="train")
    with pytest.raises(ValueError, match="user index 7"):
        evaluate(fixed_scorer, HAND, users=[0, 7])
    with pytest.raises(ValueError, match="strategy"):
        SampledRanking(strategy="zipf")


def test_scorer_runs_in_inference_mode():
    modes = []
    evaluate(lambda h: (modes.append(torch.is_inference_mode_enabled()), fixed_scorer(h))[1], HAND)
    assert modes == [True]


def test_recommend_excludes_seen_and_never_padding():
    histories = torch.tensor([[0, 1, 2], [0, 0, 3]])
    idx, scores = recommend(fixed_scorer, histories, k=2)
    assert idx.tolist() == [[3, 4], [1, 2]]
    assert torch.allclose(scores, torch.tensor([[0.7, 0.6], [0.9, 0.8]]))
    idx, _ = recommend(fixed_scorer, histories, k=2, exclude_seen=False)
    assert idx.tolist() == [[1, 2], [1, 2]]
    idx, scores = recommend(fixed_scorer, torch.tensor([[1, 2, 3, 4]]), k=5)
    assert 0 not in idx.tolist()[0] and idx[0, 0] == 5 and torch.isinf(scores[0, 1:]).all()
    with pytest.raises(ValueError, match="k must be"):
        recommend(fixed_scorer, histories, k=6)


def test_stand_in_agrees_with_real_sequence_data():
    fake = random_data(30, 25, 3, 15, seed=8)
    lengths = [len(s) for s in fake.sequences]
    real = SequenceData(
        name="t",
        user_ids=[str(u) for u in range(30)],
        item_ids=["[PAD]"] + [str(i) for i in range(1, 26)],
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=np.concatenate(fake.sequences).astype(np.int32),
        fingerprint="fake-fingerprint",
    )
    np.testing.assert_array_equal(item_popularity(real), item_popularity(fake))

    def scorer(histories):
        return ((histories.sum(1, keepdim=True) * 5 + torch.arange(26) * 11) % 13).float()

    for sampled in (None, SampledRanking(5, "popularity", seed=1)):
        a = evaluate(scorer, fake, max_len=6, sampled=sampled)
        b = evaluate(scorer, real, max_len=6, sampled=sampled)
        assert a.protocol == b.protocol
        for name in a.per_user:
            np.testing.assert_array_equal(a.per_user[name], b.per_user[name])
