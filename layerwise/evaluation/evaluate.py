"""Full and sampled ranking evaluation of a scorer on leave-one-out splits, with per-user outputs.

A scorer is any `Callable[[LongTensor (B, T)], FloatTensor (B, n_items + 1)]` (left-padded item histories
in, one score per item index out, higher is better; column 0 is padding and is never ranked).

    data = load_dataset("ml-100k")
    result = evaluate(mostpop_scorer(data), data, stage="test")
    result.means["ndcg@10"]; result.to_parquet("runs/mostpop_test.parquet")
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from layerwise.evaluation.metrics import metrics_from_ranks, target_ranks

Scorer = Callable[[Tensor], Tensor]
STAGES = ("valid", "test")
STRATEGIES = ("uniform", "popularity")
_PROTOCOL_KEY = b"layerwise.protocol"


@dataclass(frozen=True)
class SampledRanking:
    """Rank the target among `n_negatives` items drawn per user without replacement from the items that
    are neither the target nor in the user's history; "popularity" draws in proportion to train counts."""

    n_negatives: int = 100
    strategy: str = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_negatives, bool) or not isinstance(self.n_negatives, int) or self.n_negatives < 1:
            raise ValueError(f"n_negatives must be a positive int, got {self.n_negatives!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass
class EvalResult:
    """means: metric -> mean over users; per_user: metric -> (n_users,) float64; users: (n_users,) int64
    user indices in the order of the per-user arrays; protocol: how the numbers were produced."""

    means: dict[str, float]
    per_user: dict[str, np.ndarray]
    users: np.ndarray
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Means and protocol only, as plain JSON-able Python values."""
        return {"means": {k: float(v) for k, v in self.means.items()}, "protocol": _jsonable(self.protocol)}

    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the per-user table (column `user` + one float64 column per metric), with the protocol in
        the schema metadata. Atomic: written to a temp file beside `path`, then renamed over it."""
        path = Path(path)
        columns = {"user": pa.array(self.users, pa.int64())}
        columns.update({k: pa.array(np.asarray(v, np.float64)) for k, v in self.per_user.items()})
        table = pa.table(columns).replace_schema_metadata(
            {_PROTOCOL_KEY: json.dumps(_jsonable(self.protocol)).encode()}
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def from_parquet(cls, path: str | os.PathLike) -> EvalResult:
        """Read a table written by `to_parquet`; means are recomputed from the per-user columns."""
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        protocol = json.loads(meta[_PROTOCOL_KEY]) if _PROTOCOL_KEY in meta else {}
        per_user = {n: table.column(n).to_numpy() for n in table.column_names if n != "user"}
        means = {n: float(v.mean()) for n, v in per_user.items()}
        return cls(means, per_user, table.column("user").to_numpy(), protocol)


def evaluate(
    scorer: Scorer,
    data,
    stage: str = "test",
    exclude_seen: bool = True,
    ks: Sequence[int] = (5, 10, 20),
    max_len: int = 50,
    batch_size: int = 256,
    sampled: SampledRanking | None = None,
    users: Sequence[int] | np.ndarray | None = None,
    progress: bool = False,
) -> EvalResult:
    """Rank every user's held-out item and return per-user metrics.

    Works in batches of `batch_size` users, so only a (batch_size, n_items + 1) score matrix exists at a
    time. Users go through in order of history length, so that a batch holds histories of similar length
    and a scorer that cuts shared padding (`SequentialRecommender.score`) does little padded work; the
    per-user results come back in the order of `users`. Ties count against the target. Full ranking
    ranks the target against every item (minus the user's history when `exclude_seen`); sampled ranking
    against `sampled.n_negatives` drawn items.

    Args:
        scorer: histories (B, max_len) long, left-padded -> scores (B, n_items + 1) float.
        data: a `layerwise.data.SequenceData` (or anything with its methods).
        stage: "valid" (second-to-last item) or "test" (last item).
        exclude_seen: in full ranking, mask the items of the user's whole history (not the target
            itself). Sampled ranking always draws its negatives outside the history.
        ks: metric cut-offs.
        max_len: history length given to the scorer (the most recent items).
        batch_size: users per scorer call.
        sampled: None for full ranking, or a `SampledRanking`.
        users: user indices to evaluate (default: all).
        progress: write a progress line to stderr after each batch.
    """
    _check_ks(ks)
    users = _user_index(data, users)
    ranks = rank_targets(lambda histories: {None: scorer(histories)}, data, stage, exclude_seen, max_len,
                         batch_size, sampled, users, progress)[None]
    per_user = {k: v.numpy() for k, v in metrics_from_ranks(ranks, ks).items()}
    means = {k: float(v.mean()) for k, v in per_user.items()}
    return EvalResult(means, per_user, users, _protocol(data, stage, exclude_seen, ks, max_len, sampled, users))


def rank_targets(score_all: Callable[[Tensor], dict[Any, Tensor]], data, stage: str = "test",
                 exclude_seen: bool = True, max_len: int = 50, batch_size: int = 256,
                 sampled: SampledRanking | None = None, users: Sequence[int] | np.ndarray | None = None,
                 progress: bool = False) -> dict[Any, Tensor]:
    """The rank of every user's held-out item under several scorings of the same batches: `evaluate`'s
    ranking, for a caller that scores a batch many ways at once (`layerwise.compression.dependency.removal_ndcg`: the
    model without each of its layers, sharing the unchanged states).

    Args:
        score_all: histories (B, max_len) -> {key: scores (B, n_items + 1)}, the same keys for every batch.
        The rest: as `evaluate`.

    Returns:
        {key: (n_users,) long pessimistic 0-based ranks, in the order of `users`}.
    """
    _check_args(stage, max_len, batch_size)
    users = _user_index(data, users)
    targets = np.asarray(data.targets(stage), dtype=np.int64)[users]
    _check_targets(targets, users, data.n_items)
    sampler = _sampler(data, sampled)
    seen = [np.asarray(data.history(int(u), stage), dtype=np.int64) for u in users]
    # Stable: users of equal length keep their given order. Negatives depend on the user alone, not the order.
    order = np.argsort(np.minimum([len(s) for s in seen], max_len), kind="stable")
    ranks: dict[Any, Tensor] = {}
    with torch.inference_mode():
        for start in range(0, len(users), batch_size):
            rows = order[start : start + batch_size]
            batch = users[rows]
            scorings = score_all(data.padded_histories(batch, stage, max_len))
            batch_seen, tgt = [seen[r] for r in rows], targets[rows]
            for key, raw in scorings.items():
                scores = _check_scores(raw, data.n_items, batch)
                if sampled is None:
                    matrix, cols = _full_matrix(scores, batch_seen, tgt, exclude_seen)
                else:
                    matrix, cols = _sampled_matrix(scores, batch_seen, tgt, batch, sampler)
                # Scores and targets were checked above (NaN named by user), so skip the second pass.
                # Ranks stay where the scores are (a GPU's) and come to the host once, at the end.
                ranks.setdefault(key, torch.empty(len(users), dtype=torch.long, device=scores.device))
                ranks[key][torch.from_numpy(rows).to(scores.device)] = target_ranks(matrix, cols, validate=False)
            if progress:
                print(f"evaluate[{stage}]: {start + len(batch)}/{len(users)} users", file=sys.stderr)
    return {key: value.cpu() for key, value in ranks.items()}


def recommend(scorer: Scorer, histories: Tensor, k: int = 10, exclude_seen: bool = True) -> tuple[Tensor, Tensor]:
    """Top-k items for each history, for serving; the scorer runs under `torch.inference_mode()`.

    Args:
        scorer: histories (B, T) long -> scores (B, n_items + 1) float.
        histories: (B, T) long, left-padded with 0.
        k: number of items, at most n_items.
        exclude_seen: never recommend an item present in the row's history.

    Returns:
        indices (B, k) long item indices in 1..n_items (never padding), best first; scores (B, k). A row
        with fewer than k unseen items gets -inf scores for its last entries.
    """
    with torch.inference_mode():
        raw = scorer(histories)
        if raw.dim() != 2 or raw.shape[0] != histories.shape[0] or raw.shape[1] < 2:
            raise ValueError(f"scorer returned shape {tuple(raw.shape)} for histories {tuple(histories.shape)}")
        n_items = raw.shape[1] - 1
        if not 1 <= k <= n_items:
            raise ValueError(f"k must be in [1, {n_items}], got {k}")
        scores = raw.to(_float_dtype(raw), copy=True)
        if exclude_seen:
            scores.scatter_(1, histories.to(scores.device), float("-inf"))
        values, indices = scores[:, 1:].topk(k, dim=1)
    return indices + 1, values


def item_popularity(data) -> np.ndarray:
    """(n_items + 1,) int64 count of each item in the users' TRAIN sequences only (all but the last two
    items), so no valid or test target leaks into a popularity score. Entry 0 (padding) is 0."""
    parts = [np.asarray(data.train_sequence(u), dtype=np.int64) for u in range(data.n_users)]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    counts = np.bincount(flat, minlength=data.n_items + 1)[: data.n_items + 1].astype(np.int64)
    counts[0] = 0
    return counts


def sample_negatives(
    user: int,
    seen: np.ndarray,
    target: int,
    n_items: int,
    sampled: SampledRanking,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(n_negatives,) int64 distinct item indices, none of them padding, the target or in `seen`.

    The draw depends only on (sampled.seed, user), so it does not change with batching or user order.
    "popularity" needs `weights` (n_items + 1,) and draws without replacement in proportion to them;
    items of weight 0 are never drawn. To draw for many users, build a `NegativeSampler` once.
    """
    return NegativeSampler(n_items, sampled, weights)(user, seen, target)


class NegativeSampler:
    """Per-user negative sampling for sampled ranking; holds the cumulative weights so that one user's
    draw costs O(n_negatives log n_items + len(seen)) rather than O(n_items)."""

    def __init__(self, n_items: int, sampled: SampledRanking, weights: np.ndarray | None = None):
        if sampled.strategy == "popularity" and weights is None:
            raise ValueError("popularity sampling needs item weights (n_items + 1,)")
        w = np.ones(n_items + 1) if sampled.strategy == "uniform" else np.asarray(weights, np.float64)
        if w.shape != (n_items + 1,):
            raise ValueError(f"weights must have shape ({n_items + 1},), got {w.shape}")
        self.weights = w.copy()
        self.weights[0] = 0.0
        self.cdf = np.cumsum(self.weights)
        self.spec = sampled

    def __call__(self, user: int, seen: np.ndarray, target: int) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, int(user)])
        excluded = self.weights <= 0
        seen = np.asarray(seen, dtype=np.int64)
        excluded[seen[(seen > 0) & (seen < len(excluded))]] = True
        excluded[target] = True
        n = self.spec.n_negatives
        available = len(excluded) - int(excluded.sum())
        if available < n:
            raise ValueError(f"user {int(user)}: only {available} items can be negatives, {n} requested")
        # First occurrences of allowed items in a with-replacement stream are distributed exactly like
        # successive draws without replacement from the allowed items.
        stream = np.zeros(0, dtype=np.int64)
        for _ in range(8):
            if self.spec.strategy == "uniform":
                draws = rng.integers(1, len(excluded), size=2 * n)
            else:
                draws = np.searchsorted(self.cdf, rng.random(2 * n) * self.cdf[-1], side="right")
            stream = np.concatenate([stream, draws[~excluded[draws]]])
            _, first = np.unique(stream, return_index=True)
            if len(first) >= n:
                return stream[np.sort(first)[:n]]
        # Repeats or excluded items dominate the stream: exact exponential keys (Efraimidis-Spirakis).
        keys = np.full(len(excluded), np.inf)
        np.divide(rng.exponential(size=len(keys)), self.weights, out=keys, where=~excluded)
        return np.argpartition(keys, n - 1)[:n].astype(np.int64)


def _check_scores(raw: Tensor, n_items: int, batch: np.ndarray) -> Tensor:
    """A scorer's output checked, as (B, n_items) scores with the padding column dropped (column j = item j+1)."""
    expected = (len(batch), n_items + 1)
    if not isinstance(raw, Tensor) or tuple(raw.shape) != expected:
        got = tuple(raw.shape) if isinstance(raw, Tensor) else type(raw).__name__
        raise ValueError(f"scorer must return a tensor of shape {expected} (B, n_items + 1), got {got}")
    if not raw.is_floating_point():
        raise ValueError(f"scorer must return float scores, got dtype {raw.dtype}")
    scores = raw[:, 1:].to(_float_dtype(raw), copy=True)
    if torch.isnan(scores).any():
        row = int(torch.isnan(scores).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"scorer returned NaN scores for user {int(batch[row])}")
    return scores


def _full_matrix(scores: Tensor, seen: list[np.ndarray], targets: np.ndarray, exclude_seen: bool):
    cols = torch.as_tensor(targets - 1, device=scores.device)
    if exclude_seen:
        rows_idx = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
        items = np.concatenate(seen) if seen else np.zeros(0, np.int64)
        keep = items > 0
        rows = torch.as_tensor(rows_idx[keep], device=scores.device)
        arange = torch.arange(len(seen), device=scores.device)
        # The target is never masked, even when it repeats an item of the history: a masked target would
        # score -inf and rank last whatever the model said, punishing a correct re-consumption prediction.
        target_scores = scores[arange, cols].clone()
        scores[rows, torch.as_tensor(items[keep] - 1, device=scores.device)] = float("-inf")
        scores[arange, cols] = target_scores
    return scores, cols


def _sampler(data, sampled: SampledRanking | None) -> NegativeSampler | None:
    if sampled is None:
        return None
    weights = item_popularity(data) if sampled.strategy == "popularity" else None
    return NegativeSampler(data.n_items, sampled, weights)


def _sampled_matrix(scores, seen, targets, batch, sampler: NegativeSampler):
    negatives = [sampler(u, s, t) for u, s, t in zip(batch, seen, targets)]
    candidates = np.concatenate([targets[:, None], np.stack(negatives)], axis=1)  # target in column 0
    index = torch.as_tensor(candidates - 1, device=scores.device)
    return scores.gather(1, index), torch.zeros(len(batch), dtype=torch.long, device=scores.device)


def _protocol(data, stage, exclude_seen, ks, max_len, sampled, users) -> dict[str, Any]:
    return {
        "stage": stage,
        "exclude_seen": bool(exclude_seen),
        "exclude_seen_keeps_target": True,
        "ranking": "full" if sampled is None else "sampled",
        "n_negatives": None if sampled is None else sampled.n_negatives,
        "strategy": None if sampled is None else sampled.strategy,
        "seed": None if sampled is None else sampled.seed,
        "negatives_exclude_seen": sampled is not None,
        "ties": "pessimistic",
        "ks": [int(k) for k in ks],
        "max_len": int(max_len),
        "n_users": int(len(users)),
        "data_fingerprint": getattr(data, "fingerprint", None),
    }


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")


def _check_args(stage: str, max_len: int, batch_size: int) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if max_len < 1 or batch_size < 1:
        raise ValueError(f"max_len and batch_size must be >= 1, got {max_len} and {batch_size}")


def _user_index(data, users) -> np.ndarray:
    if users is None:
        return np.arange(data.n_users, dtype=np.int64)
    index = np.asarray(users, dtype=np.int64).reshape(-1)
    if index.size == 0:
        raise ValueError("users is empty: nothing to evaluate")
    bad = index[(index < 0) | (index >= data.n_users)]
    if bad.size:
        raise ValueError(f"user index {int(bad[0])} is out of range [0, {data.n_users})")
    return index


def _check_targets(targets: np.ndarray, users: np.ndarray, n_items: int) -> None:
    bad = np.flatnonzero((targets < 1) | (targets > n_items))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"user {int(users[i])} has target {int(targets[i])} outside items 1..{n_items}")


def _float_dtype(t: Tensor) -> torch.dtype:
    # Upcasting half precision is exact (ties stay ties); float64 stays float64 so no ties are invented.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
