"""Ranking metrics for next-item recommendation with one held-out item per user.

Everything is computed from the 0-based rank of the target among the candidates. Ties count against the
target (pessimistic): rank = number of OTHER candidates whose score is >= the target's score. A scorer that
gives every item the same score therefore ranks the target last, never first.

    >>> scores = torch.tensor([[0.1, 0.9, 0.5]]); targets = torch.tensor([2])
    >>> ranking_metrics(scores, targets, ks=(1,))["hr@1"]    # item 1 beats the target
    tensor([0.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

METRIC_NAMES = ("ndcg", "hr", "recall", "precision", "map", "mrr")


def target_ranks(scores: Tensor, targets: Tensor, validate: bool = True) -> Tensor:
    """Pessimistic 0-based rank of each row's target.

    Args:
        scores: (n_users, n_items) float scores, higher is better. -inf marks an item that can never beat
            the target (unless the target is -inf too: then it ties with everything and ranks last).
        targets: (n_users,) long column index of the relevant item in each row.
        validate: check shapes, dtypes, target range and NaN; only a caller that already did may skip it.

    Returns:
        (n_users,) long: the number of other items scoring >= the target's score.

    Raises:
        ValueError: on a wrong shape or dtype, a target out of range, or a NaN score (naming the row).
    """
    if validate:
        _validate(scores, targets)
    target_scores = scores.gather(1, targets.unsqueeze(1))
    # The target always ties with itself, hence the -1. An int32 count is exact and faster than int64.
    return (scores >= target_scores).sum(dim=1, dtype=torch.int32).long() - 1


def hr_at_k(ranks: Tensor, k: int) -> Tensor:
    """Hit rate: 1 if the target is in the top k. ranks: (n,) long -> (n,) float64."""
    _check_k(k)
    return (ranks < k).to(torch.float64)


def recall_at_k(ranks: Tensor, k: int) -> Tensor:
    """Recall@k; with a single relevant item it equals hr@k. ranks: (n,) -> (n,) float64."""
    return hr_at_k(ranks, k)


def precision_at_k(ranks: Tensor, k: int) -> Tensor:
    """Precision@k = hits / k (k, not min(k, n_items), as RecBole). ranks: (n,) -> (n,) float64."""
    return hr_at_k(ranks, k) / k


def ndcg_at_k(ranks: Tensor, k: int) -> Tensor:
    """NDCG@k = 1 / log2(rank + 2) inside the top k, else 0 (the ideal DCG is 1). ranks: (n,) -> (n,)."""
    _check_k(k)
    gain = 1.0 / torch.log2(ranks.to(torch.float64) + 2.0)
    return torch.where(ranks < k, gain, torch.zeros_like(gain))


def mrr_at_k(ranks: Tensor, k: int) -> Tensor:
    """Reciprocal rank 1 / (rank + 1) inside the top k, else 0. ranks: (n,) -> (n,) float64."""
    _check_k(k)
    rr = mrr(ranks)
    return torch.where(ranks < k, rr, torch.zeros_like(rr))


def map_at_k(ranks: Tensor, k: int) -> Tensor:
    """MAP@k. With a single relevant item the average precision is the precision at its position,
    1 / (rank + 1), so MAP@k equals MRR@k here. ranks: (n,) -> (n,) float64."""
    return mrr_at_k(ranks, k)


def mrr(ranks: Tensor) -> Tensor:
    """Full (uncut) reciprocal rank 1 / (rank + 1). ranks: (n,) -> (n,) float64."""
    return 1.0 / (ranks.to(torch.float64) + 1.0)


_AT_K = {
    "ndcg": ndcg_at_k,
    "hr": hr_at_k,
    "recall": recall_at_k,
    "precision": precision_at_k,
    "map": map_at_k,
    "mrr": mrr_at_k,
}


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict[str, Tensor]:
    """Every metric for every k from precomputed ranks: (n,) long -> {"ndcg@10": (n,) float64, ...}."""
    out: dict[str, Tensor] = {}
    for k in ks:
        for name in METRIC_NAMES:
            out[f"{name}@{k}"] = _AT_K[name](ranks, k)
    out["mrr"] = mrr(ranks)
    return out


def ranking_metrics(scores: Tensor, targets: Tensor, ks: Sequence[int] = (5, 10, 20)) -> dict[str, Tensor]:
    """Per-user ranking metrics with one relevant item per user.

    Args:
        scores: (n_users, n_items) float scores, higher is better; -inf for excluded items.
        targets: (n_users,) long column index of each user's relevant item.
        ks: cut-offs; a k larger than n_items is allowed (every target is then a hit).

    Returns:
        Keys `ndcg@K`, `hr@K`, `recall@K`, `precision@K`, `map@K`, `mrr@K` for each K, and `mrr`
        (uncut); each value is a (n_users,) float64 tensor. MAP@K equals MRR@K because each user has a
        single relevant item.
    """
    for k in ks:
        _check_k(k)
    return metrics_from_ranks(target_ranks(scores, targets), ks)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")


def _validate(scores: Tensor, targets: Tensor) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D tensor (n_users, n_items), got {_describe(scores)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor, got dtype {scores.dtype}")
    if not isinstance(targets, Tensor) or targets.dim() != 1:
        raise ValueError(f"targets must be a 1-D tensor (n_users,), got {_describe(targets)}")
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be a long (int64) tensor, got dtype {targets.dtype}")
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows but targets has {targets.shape[0]} entries")
    n_items = scores.shape[1]
    if n_items == 0:
        raise ValueError("scores has no items (0 columns)")
    bad = ((targets < 0) | (targets >= n_items)).nonzero()
    if bad.numel():
        row = int(bad[0, 0])
        raise ValueError(f"target {int(targets[row])} in row {row} is out of range [0, {n_items})")
    if not torch.isnan(scores).any():
        return
    nan_rows = torch.isnan(scores).any(dim=1).nonzero()
    if nan_rows.numel():
        raise ValueError(f"scores contain NaN in row {int(nan_rows[0, 0])} ({nan_rows.numel()} rows in all)")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)}"
    return type(x).__name__
