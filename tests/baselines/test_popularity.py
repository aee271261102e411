import numpy as np
import pytest
import torch

from layerwise.baselines import BASELINES, mostpop_scorer
from layerwise.evaluation.evaluate import evaluate, item_popularity
from tests.helpers.fake_data import FakeSequenceData

# Valid targets are all item 4 and test targets all item 5; neither appears in a train portion.
DATA = FakeSequenceData([[1, 2, 3, 4, 5], [1, 1, 2, 4, 5], [3, 1, 4, 5]], n_items=6)


def test_counts_use_train_portions_only():
    assert item_popularity(DATA).tolist() == [0, 4, 2, 2, 0, 0, 0]


def test_scorer_rows_identical_and_padding_minus_inf():
    scorer = mostpop_scorer(DATA)
    scores = scorer(torch.tensor([[0, 1, 2], [3, 3, 6]]))
    assert scores.shape == (2, 7)
    assert scores[0, 1:].tolist() == [4, 2, 2, 0, 0, 0]
    assert torch.equal(scores[0], scores[1]) and scores[0, 0] == float("-inf")


@pytest.mark.parametrize(
    "exclude_seen, expected_mrr",
    [
        # Target 5 has count 0 and ties with items 4 and 6, so it ranks last of 6 for everyone.
        (False, [1 / 6] * 3),
        # u0 sees 1-4 (left: 5, 6); u1 sees 1, 2, 4 (left: 3, 5, 6); u2 sees 3, 1, 4 (left: 2, 5, 6).
        (True, [1 / 2, 1 / 3, 1 / 3]),
    ],
)
def test_mostpop_evaluated_by_evaluate(exclude_seen, expected_mrr):
    r = evaluate(BASELINES["mostpop"](DATA), DATA, exclude_seen=exclude_seen)
    np.testing.assert_allclose(r.per_user["mrr"], expected_mrr)


def test_registry():
    assert BASELINES["mostpop"] is mostpop_scorer
