"""Layer selection: one registry, `SELECTORS[name](scores, k, **context) -> list[int]`.

`scores` is (n_layers,) importance, higher = more important; the result is the sorted teacher indices of
the k KEPT layers. Every selector accepts (and ignores) context it does not use, so a caller can pass one
context to all of them:

    keep = SELECTORS["beam"](scores, 4, dependency=D, width=8)
    keep = SELECTORS["contiguous"](scores, 4, block_scores=angular_blocks(model, batches, n=L - 4))

Ties are broken towards keeping the lower layer index wherever a choice is made, so results are
deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor


def _check(scores: Tensor, k: int, need_finite: bool = True) -> int:
    if scores.dim() != 1:
        raise ValueError(f"scores must be one value per layer, shape (n_layers,), got {tuple(scores.shape)}")
    n = len(scores)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer from 1 to {n} (the number of layers), got {k!r}")
    if need_finite and not torch.isfinite(scores).all():
        raise ValueError(f"scores must be finite, got {scores.tolist()}")
    return n


def _last_min(values: Tensor) -> int:
    """Index of the last minimum: removing it keeps the lower of tied layers."""
    values = torch.as_tensor(values)
    return int((values == values.min()).nonzero()[-1])


def _complement(removed: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(l for l in range(n) if l not in removed)


def topk(scores: Tensor, k: int, **context) -> list[int]:
    """Keep the k highest-scoring layers."""
    _check(scores, k)
    order = torch.sort(scores, descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def greedy(scores: Tensor, k: int, rescore: Callable[[list[int]], Tensor] | None = None,
           **context) -> list[int]:
    """Remove the least important layer, re-score the remaining model, repeat until k are left.

    Args:
        scores: (n_layers,) scores of the full model (used for the first removal).
        rescore: kept layers (sorted) -> their scores (len(kept),) in the model without the others,
            e.g. `layerwise.compression.importance.make_rescorer(model, batches, "fisher")`.
    """
    n = _check(scores, k)
    if rescore is None:
        raise ValueError("greedy re-scores after each removal: pass rescore=make_rescorer(model, batches, method)")
    kept, current = list(range(n)), scores
    while len(kept) > k:
        del kept[_last_min(current)]
        if len(kept) > k:
            current = torch.as_tensor(rescore(list(kept)))
            if current.shape != (len(kept),) or not torch.isfinite(current).all():
                raise ValueError(f"rescore must return {len(kept)} finite scores, got {current.tolist()}")
    return kept


def beam(scores: Tensor, k: int, dependency: Tensor | None = None, width: int = 8, **context) -> list[int]:
    """Dependency-aware search for the removed set R (|R| = n - k) of least cost.

    cost(R) = sum_{i in R} scores[i] + sum_{i < j in R} dependency[i, j]: the removal costs plus their
    pairwise interactions (`layerwise.compression.dependency.dependency_matrix`). For the sum to mean anything the
    scores must be removal costs in the same units, e.g. `ablation_loss` with a "loss" matrix. Beam
    search adds one layer at a time and keeps the `width` cheapest partial sets.

    Args:
        dependency: (n_layers, n_layers) symmetric interaction matrix.
        width: beam width.
    """
    n = _check(scores, k)
    if dependency is None:
        raise ValueError("beam is dependency-aware: pass dependency=dependency_matrix(...) (or use topk)")
    dep = torch.as_tensor(dependency, dtype=torch.float64)
    if dep.shape != (n, n) or not torch.isfinite(dep).all():
        raise ValueError(f"dependency must be a finite ({n}, {n}) matrix, got shape {tuple(dep.shape)}")
    if width < 1:
        raise ValueError(f"beam width must be at least 1, got {width}")
    cost = scores.double().tolist()
    frontier: list[tuple[float, tuple[int, ...]]] = [(0.0, ())]
    for _ in range(n - k):
        grown: dict[tuple[int, ...], float] = {}
        for total, removed in frontier:
            for l in range(n):
                if l not in removed:
                    key = tuple(sorted(removed + (l,)))
                    grown[key] = total + cost[l] + sum(float(dep[l, r]) for r in removed)
        # Equal costs: prefer the set whose kept layers come first (keep the lower index).
        frontier = sorted(grown.items(), key=lambda item: (item[1], _complement(item[0], n)))[:width]
        frontier = [(c, r) for r, c in frontier]
    gone = set(frontier[0][1])
    return [l for l in range(n) if l not in gone]


def contiguous(scores: Tensor, k: int, block_scores: Tensor | None = None, **context) -> list[int]:
    """Remove the contiguous block of n - k layers whose input and output are closest (Gromov et al.,
    LLM-Streamline).

    Args:
        block_scores: (n_layers - (n_layers - k) + 1,) = (k + 1,) distance of each candidate block,
            `layerwise.compression.importance.angular_blocks(model, batches, n=n_layers - k)`; entry b is the block
            starting at layer b.
    """
    n = _check(scores, k, need_finite=False)
    if k == n:
        return list(range(n))
    if block_scores is None:
        raise ValueError(f"contiguous needs block_scores=angular_blocks(model, batches, n={n - k})")
    blocks = torch.as_tensor(block_scores)
    if blocks.shape != (k + 1,):
        raise ValueError(f"block_scores for removing {n - k} of {n} layers must have {k + 1} entries, "
                         f"got shape {tuple(blocks.shape)}")
    start = _last_min(blocks)
    return [l for l in range(n) if not start <= l < start + n - k]


def uniform(scores: Tensor, k: int, **context) -> list[int]:
    """Evenly spaced layers, counted back from the last one, which is always kept.

    The last layer's output is what the head scores items with, so a student without it must relearn
    the output space; the spacing steps back from it by n/k (floored): n=8, k=3 keeps [2, 5, 7].
    """
    n = _check(scores, k, need_finite=False)
    return sorted(n - 1 - (i * n) // k for i in range(k))


def random(scores: Tensor, k: int, seed: int = 0, **context) -> list[int]:
    """k layers drawn uniformly without replacement (numpy generator seeded with `seed`)."""
    n = _check(scores, k, need_finite=False)
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def first(scores: Tensor, k: int, **context) -> list[int]:
    """The first k layers."""
    _check(scores, k, need_finite=False)
    return list(range(k))


def last(scores: Tensor, k: int, **context) -> list[int]:
    """The last k layers."""
    n = _check(scores, k, need_finite=False)
    return list(range(n - k, n))


SELECTORS: dict[str, Callable[..., list[int]]] = {
    "topk": topk, "greedy": greedy, "beam": beam, "contiguous": contiguous,
    "uniform": uniform, "random": random, "first": first, "last": last,
}
