"""Summary statistics of a split data set, for logs, reports and sanity checks."""

from __future__ import annotations

import numpy as np

from layerwise.data.split import SequenceData


def dataset_stats(data: SequenceData) -> dict:
    """Sizes, density, history lengths and popularity concentration of `data`.

    Returns:
        A JSON-able dict: name, users, items, interactions, density, history length mean/median/min/max,
        train interactions (all but the two held-out items per user), the share of interactions on the
        top 10% of items, the item popularity Gini coefficient, cold items (never in any training
        history), fingerprint and protocol.
    """
    lengths = data.lengths
    counts = np.bincount(data.items, minlength=data.n_items + 1)[1:]
    train_counts = np.bincount(_train_items(data), minlength=data.n_items + 1)[1:]
    top = np.sort(counts)[::-1][: max(1, data.n_items // 10)]
    return {
        "name": data.name,
        "users": data.n_users,
        "items": data.n_items,
        "interactions": int(len(data.items)),
        "train_interactions": int(train_counts.sum()),
        "density": float(len(data.items) / (data.n_users * data.n_items)),
        "history_mean": float(lengths.mean()),
        "history_median": float(np.median(lengths)),
        "history_min": int(lengths.min()),
        "history_max": int(lengths.max()),
        "top10pct_item_share": float(top.sum() / counts.sum()),
        "item_gini": _gini(counts),
        "cold_items": int((train_counts == 0).sum()),
        "fingerprint": data.fingerprint,
        "protocol": data.protocol,
    }


def _train_items(data: SequenceData) -> np.ndarray:
    """Every item of every training history (each user's history minus its last two items)."""
    rank_from_end = np.repeat(data.offsets[1:], data.lengths) - np.arange(len(data.items))
    return data.items[rank_from_end > 2]


def _gini(counts: np.ndarray) -> float:
    """Gini coefficient of (n,) non-negative counts: 0 = all equal, -> 1 = all on one item."""
    x = np.sort(counts.astype(np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))
