"""MostPop: every user gets the same scores, each item's count in the users' train sequences.

    result = evaluate(mostpop_scorer(data), data, stage="test")
"""

from __future__ import annotations

import torch
from torch import Tensor

from layerwise.evaluation.evaluate import Scorer, item_popularity


def mostpop_scorer(data) -> Scorer:
    """A scorer that ignores the history and scores item i by its TRAIN-portion frequency.

    Counts come from `data.train_sequence(u)` (all but each user's last two items), so neither validation
    nor test targets leak into the scores. Column 0 (padding) scores -inf.

    Args:
        data: a `layerwise.data.SequenceData`.

    Returns:
        histories (B, T) long -> scores (B, n_items + 1) float32, identical rows.
    """
    scores = torch.as_tensor(item_popularity(data), dtype=torch.float32)
    scores[0] = float("-inf")

    def score(histories: Tensor) -> Tensor:
        return scores.to(histories.device).expand(histories.shape[0], -1)

    return score
