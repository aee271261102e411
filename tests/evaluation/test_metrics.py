import math

import pytest
import torch

from layerwise.evaluation.metrics import (
    hr_at_k,
    map_at_k,
    mrr,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    ranking_metrics,
    recall_at_k,
    target_ranks,
)

INF = float("inf")

# Rows: target first; a tie with the target; all tied; -inf items around a finite target;
# a -inf target; a target beyond K.
SCORES = torch.tensor(
    [
        [0.9, 0.5, 0.1, 0.3],
        [0.2, 0.8, 0.8, 0.1],
        [0.5, 0.5, 0.5, 0.5],
        [-INF, 0.1, -INF, -INF],
        [-INF, 0.1, -INF, -INF],
        [0.4, 0.3, 0.2, 0.1],
    ]
)
TARGETS = torch.tensor([0, 1, 3, 1, 0, 3])
RANKS = [0, 1, 3, 0, 3, 3]


def assert_close(t, expected):
    assert t.dtype == torch.float64
    assert torch.allclose(t, torch.tensor(expected, dtype=torch.float64), atol=1e-12), (t, expected)


def test_target_ranks_pessimistic_ties_and_inf():
    assert target_ranks(SCORES, TARGETS).tolist() == RANKS


def test_metrics_at_k2_hand_computed():
    m = ranking_metrics(SCORES, TARGETS, ks=(2,))
    g1 = 1 / math.log2(3)
    assert_close(m["hr@2"], [1, 1, 0, 1, 0, 0])
    assert_close(m["recall@2"], [1, 1, 0, 1, 0, 0])
    assert_close(m["precision@2"], [0.5, 0.5, 0, 0.5, 0, 0])
    assert_close(m["ndcg@2"], [1, g1, 0, 1, 0, 0])
    assert_close(m["mrr@2"], [1, 0.5, 0, 1, 0, 0])
    assert_close(m["map@2"], [1, 0.5, 0, 1, 0, 0])
    assert_close(m["mrr"], [1, 0.5, 0.25, 1, 0.25, 0.25])


def test_k_larger_than_catalogue_is_always_a_hit():
    m = ranking_metrics(SCORES, TARGETS, ks=(10,))
    g1, g3 = 1 / math.log2(3), 1 / math.log2(5)
    assert_close(m["hr@10"], [1] * 6)
    assert_close(m["precision@10"], [0.1] * 6)
    assert_close(m["ndcg@10"], [1, g1, g3, 1, g3, g3])
    assert_close(m["mrr@10"], [1, 0.5, 0.25, 1, 0.25, 0.25])


def test_keys_for_every_k():
    m = ranking_metrics(SCORES, TARGETS)
    names = ("ndcg", "hr", "recall", "precision", "map", "mrr")
    assert set(m) == {f"{n}@{k}" for n in names for k in (5, 10, 20)} | {"mrr"}
    assert all(v.shape == (6,) for v in m.values())


def test_rank_functions_directly():
    ranks = torch.tensor([0, 1, 2, 9, 10, 50])
    assert_close(ndcg_at_k(ranks, 10), [1, 1 / math.log2(3), 0.5, 1 / math.log2(11), 0, 0])
    assert_close(hr_at_k(ranks, 10), [1, 1, 1, 1, 0, 0])
    assert_close(recall_at_k(ranks, 3), [1, 1, 1, 0, 0, 0])
    assert_close(precision_at_k(ranks, 5), [0.2, 0.2, 0.2, 0, 0, 0])
    assert_close(mrr_at_k(ranks, 10), [1, 0.5, 1 / 3, 0.1, 0, 0])
    assert_close(map_at_k(ranks, 2), [1, 0.5, 0, 0, 0, 0])
    assert_close(mrr(ranks), [1, 0.5, 1 / 3, 0.1, 1 / 11, 1 / 51])


def test_single_item_catalogue_and_all_minus_inf_row():
    assert target_ranks(torch.tensor([[3.0]]), torch.tensor([0])).tolist() == [0]
    assert target_ranks(torch.full((1, 5), -INF), torch.tensor([2])).tolist() == [4]


def test_nan_raises_naming_the_row():
    scores = SCORES.clone()
    scores[2, 1] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        ranking_metrics(scores, TARGETS)


@pytest.mark.parametrize(
    "scores, targets, match",
    [
        (torch.zeros(4), torch.tensor([0]), "2-D"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), "float"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "long"),
        (torch.zeros(2, 3), torch.tensor([[0, 1]]), "1-D"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), "2 rows"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), "row 1 is out of range"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), "row 0 is out of range"),
    ],
)
def test_validation_errors(scores, targets, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(scores, targets)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be a positive int"):
        ranking_metrics(SCORES, TARGETS, ks=(k,))
