"""Robustness perturbations of TEST histories: a data view that `evaluate` reads like `SequenceData`.

Only what the model sees when predicting the test item changes; targets, validation histories and train
sequences never do (so train popularity, sampled negatives and the split are the same at every level).

    from layerwise.evaluation.noise import NoisyData
    noisy = NoisyData(data, "replace_uniform", level=0.2, seed=0)
    evaluate(scorer, noisy, stage="test")      # the same users and targets, 20% of history items replaced

Kinds, at level p (the expected fraction of history positions changed):
    replace_uniform     each position, with probability p, becomes a different item drawn uniformly;
    replace_popularity  the same, drawn in proportion to train popularity (plausible, popular noise);
    drop                each position is removed with probability p (the most recent item survives if
                        every one was drawn, since an empty history gives the model nothing at all);
    reorder             local shuffles: the history is cut into blocks of `block` items (random phase) and
                        each block, with probability p, is rotated by a random non-zero offset, so an item
                        moves at most block - 1 places.

Every user's perturbation depends only on (seed, kind, user), so it is reproducible and does not change
with batching or user order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from layerwise.evaluation.evaluate import item_popularity

KINDS = ("replace_uniform", "replace_popularity", "drop", "reorder")
LEVELS = (0.0, 0.1, 0.2, 0.4)
SEEN = ("noisy", "clean")


class NoisyData:
    """A view of `data` whose test histories are perturbed; everything else is delegated unchanged.

    Args:
        data: a `SequenceData` (or anything with its methods).
        kind: one of `KINDS`.
        level: expected fraction of history positions changed, in [0, 1).
        seed: noise seed.
        block: reorder block size (>= 2).
        seen: which history `history(u, "test")` returns, i.e. which items `evaluate` excludes as already
            seen: "noisy" (default; the deployed system only knows the noisy history) or "clean" (the
            candidate set stays identical across levels, so only the model's input changes).
            `padded_histories` is always the noisy one.
    """

    def __init__(self, data, kind: str, level: float, seed: int = 0, block: int = 4, seen: str = "noisy"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not 0.0 <= level < 1.0:
            raise ValueError(f"level must be in [0, 1), got {level!r}")
        if block < 2 or seen not in SEEN:
            raise ValueError(f"need block >= 2 and seen in {SEEN}, got block={block}, seen={seen!r}")
        if kind.startswith("replace") and data.n_items < 2:
            raise ValueError(f"replacing items needs at least 2 items in the catalogue, got {data.n_items}")
        self.data, self.kind, self.level, self.seed, self.block, self.seen = data, kind, level, seed, block, seen
        self._cache: dict[int, np.ndarray] = {}
        self._cdf = None
        if kind == "replace_popularity" and level > 0:
            weights = item_popularity(data).astype(np.float64)
            if weights.sum() <= 0:
                raise ValueError("replace_popularity needs items with train interactions; none have any")
            self._cdf = np.cumsum(weights)

    @property
    def noise(self) -> dict[str, Any]:
        """The perturbation's record, for the run's protocol."""
        return {"kind": self.kind, "level": self.level, "seed": self.seed, "block": self.block,
                "seen": self.seen, "stage": "test"}

    @property
    def protocol(self) -> dict[str, Any]:
        return {**getattr(self.data, "protocol", {}), "noise": self.noise}

    def __getattr__(self, name: str):
        # Only reached for attributes not defined here: n_users, n_items, targets, fingerprint, ...
        if name == "data":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.data, name)

    def history(self, u: int, stage: str) -> np.ndarray:
        """User u's history: perturbed for "test" (unless seen="clean"), unchanged for "valid"."""
        if stage != "test" or self.seen == "clean":
            return self.data.history(u, stage)
        return self.noisy_history(u)

    def noisy_history(self, u: int) -> np.ndarray:
        """(len',) the perturbed test history of user u (len' < len only for "drop")."""
        u = int(u)
        if u not in self._cache:
            clean = np.asarray(self.data.history(u, "test"))
            self._cache[u] = clean if self.level == 0 else self._perturb(u, clean)
        return self._cache[u]

    def padded_histories(self, users, stage: str, max_len: int) -> torch.Tensor:
        """(B, max_len) long, left-padded, the most recent item last; built from the noisy test history."""
        if stage != "test" or self.level == 0:
            return self.data.padded_histories(users, stage, max_len)
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        out = torch.zeros(len(users), max_len, dtype=torch.long)
        for row, u in enumerate(users):
            hist = self.noisy_history(int(u))[-max_len:]
            if len(hist):
                out[row, -len(hist):] = torch.from_numpy(hist.astype(np.int64))
        return out

    def _perturb(self, u: int, clean: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, KINDS.index(self.kind), u])
        if self.kind == "drop":
            return _drop(clean, self.level, rng)
        if self.kind == "reorder":
            return _reorder(clean, self.level, self.block, rng)
        return _replace(clean, self.level, self.data.n_items, rng, self._cdf)


def _replace(hist: np.ndarray, level: float, n_items: int, rng: np.random.Generator,
             cdf: np.ndarray | None) -> np.ndarray:
    """Each position with probability `level` becomes a different item (uniform, or by the cdf)."""
    out = hist.copy()
    where = np.flatnonzero(rng.random(len(hist)) < level)
    if cdf is None:
        # Uniform over the n_items - 1 OTHER items: draw from 1..n_items-1 and skip the original.
        draws = rng.integers(1, n_items, size=len(where))
        out[where] = draws + (draws >= hist[where])
        return out
    for _ in range(64):  # redraw collisions with the original; rare unless one item dominates
        draws = np.searchsorted(cdf, rng.random(len(where)) * cdf[-1], side="right")
        same = draws == hist[where]
        out[where[~same]] = draws[~same]
        where = where[same]
        if not len(where):
            break
    return out


def _drop(hist: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    keep = rng.random(len(hist)) >= level
    if len(hist) and not keep.any():
        keep[-1] = True
    return hist[keep]


def _reorder(hist: np.ndarray, level: float, block: int, rng: np.random.Generator) -> np.ndarray:
    """Rotate randomly chosen blocks of consecutive items; the random phase varies the block edges."""
    out = hist.copy()
    phase = int(rng.integers(0, block))
    starts = np.arange(-phase, len(hist), block)
    chosen = rng.random(len(starts)) < level
    shifts = rng.integers(1, block, size=len(starts))
    for start, pick, shift in zip(starts, chosen, shifts):
        lo, hi = max(start, 0), min(start + block, len(hist))
        if pick and hi - lo >= 2:
            out[lo:hi] = np.roll(hist[lo:hi], 1 + (shift - 1) % (hi - lo - 1))
    return out
