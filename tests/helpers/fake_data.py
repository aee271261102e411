"""A tiny stand-in for `layerwise.data.SequenceData` (same attributes and methods, see docs/CONTRACTS.md),
so the evaluation tests build hand-made cases without depending on the data loaders."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class FakeSequenceData:
    sequences: list[list[int]]
    n_items: int
    fingerprint: str = "fake-fingerprint"
    name: str = "fake"
    protocol: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    def sequence(self, u: int) -> np.ndarray:
        return np.asarray(self.sequences[u], dtype=np.int64)

    def train_sequence(self, u: int) -> np.ndarray:
        return self.sequence(u)[:-2]

    def history(self, u: int, stage: str) -> np.ndarray:
        return self.sequence(u)[: -2 if stage == "valid" else -1]

    def target(self, u: int, stage: str) -> int:
        return int(self.sequence(u)[-2 if stage == "valid" else -1])

    def targets(self, stage: str) -> np.ndarray:
        return np.array([self.target(u, stage) for u in range(self.n_users)], dtype=np.int64)

    def padded_histories(self, users, stage: str, max_len: int) -> torch.LongTensor:
        out = torch.zeros(len(users), max_len, dtype=torch.long)
        for row, u in enumerate(users):
            hist = self.history(int(u), stage)[-max_len:]
            if len(hist):
                out[row, -len(hist) :] = torch.as_tensor(hist)
        return out


def random_data(n_users: int, n_items: int, min_len: int, max_len: int, seed: int) -> FakeSequenceData:
    """Random sequences (items may repeat) of lengths in [min_len, max_len]."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, n_items + 1, size=rng.integers(min_len, max_len + 1)).tolist() for _ in range(n_users)]
    return FakeSequenceData(seqs, n_items)
