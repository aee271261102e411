"""The inter-layer dependency matrix: how much two layers' removals interact.

D[i, j] = Δ(remove i and j) − Δ(remove i) − Δ(remove j), where Δ is the damage a removal does (increase
in loss, or drop in validation NDCG@10). D = 0: the two removals add up. D > 0: they hurt more together
than apart (redundant layers that stand in for each other). D < 0: together they hurt less (layers whose
updates cancel). `layerwise.select.beam` uses D to search for the cheapest set to remove.

    D = dependency_matrix(model, batches)                          # calibration loss
    D = dependency_matrix(model, batches, data, metric="ndcg@10")  # validation NDCG@10
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from layerwise.tracing import metric_with_removed, sample_users


def dependency_matrix(model, batches: Iterable | None, data=None, metric: str = "loss",
                      max_users: int | None = None, max_len: int = 50, seed: int = 0) -> Tensor:
    """Pairwise interaction of layer removals (layers gated off, exactly physical removal).

    Costs 1 + L + L(L-1)/2 evaluations of the model.

    Args:
        batches: calibration `(inputs, targets)` pairs; used by metric "loss" without data.
        data: validation data; with it, "loss" is the validation loss (see `metric_with_removed`).
        metric: "loss" (Δ = increase) or "ndcg@10" (Δ = drop; needs data).
        max_users: evaluate a seeded subsample of this many validation users (None: all).

    Returns:
        (n_layers, n_layers) float64, symmetric, zero diagonal.
    """
    batches = None if batches is None else list(batches)  # evaluated 1 + L + L(L-1)/2 times
    users = sample_users(data, max_users, seed) if data is not None else None
    sign = -1.0 if metric == "ndcg@10" else 1.0

    def value(removed: set[int]) -> float:
        return metric_with_removed(model, removed, metric, batches, data, users, max_len)

    base = value(set())

    def damage(removed: set[int]) -> float:
        return sign * (value(removed) - base)

    n = model.n_layers
    single = [damage({i}) for i in range(n)]
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = damage({i, j}) - single[i] - single[j]
    return matrix
