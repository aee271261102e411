"""A study's rows as the statistics read them: each method's rows by name and seed, and its per-user metric
arrays, loaded once and checked to cover the same test users (orchestration.study.results, .compute)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

METRIC = "ndcg@10"  # the metric every study table compares
ROWS = "rows.json"  # what each stage writes: one row per model it evaluated


class Rows:
    """Rows by name and seed, with per-user arrays loaded once and checked to cover the same users."""

    def __init__(self, rows: Sequence[Mapping], seeds: Sequence[int], metric: str = METRIC):
        self.seeds, self.metric = list(seeds), metric
        self.by_name: dict[str, dict[int, list[Mapping]]] = {}
        for row in rows:
            self.by_name.setdefault(row["row"], {}).setdefault(row["seed"], []).append(row)
        self._users: np.ndarray | None = None
        self._cache: dict[str, np.ndarray] = {}

    def names(self, table: str) -> list[str]:
        return [n for n, seeds in self.by_name.items() if next(iter(seeds.values()))[0]["table"] == table]

    def first(self, name: str) -> Mapping:
        return self.by_name[name][self.seeds[0]][0] if self.seeds[0] in self.by_name[name] else \
            next(iter(self.by_name[name].values()))[0]

    def complete(self, name: str) -> bool:
        return all(s in self.by_name.get(name, {}) for s in self.seeds)

    def seed_means(self, name: str, metric: str | None = None) -> np.ndarray:
        """(n_seeds,) the metric (default: the table's) per seed, the mean over draws within a seed."""
        metric = metric or self.metric
        return np.array([np.mean([r["means"][metric] for r in self.by_name[name][s]]) for s in self.seeds])

    def per_user(self, name: str) -> np.ndarray:
        """(n_users,) the per-user metric averaged over seeds and draws."""
        if name not in self._cache:
            per_seed = [np.mean([self._load(r["per_user"]) for r in self.by_name[name][s]], axis=0)
                        for s in self.seeds]  # draws first, as in seed_means, so every seed weighs the same
            self._cache[name] = np.mean(per_seed, axis=0)
        return self._cache[name]

    @property
    def users(self) -> np.ndarray:
        if self._users is None:
            raise RuntimeError("no per-user table loaded yet")
        return self._users

    def _load(self, path: str) -> np.ndarray:
        table = pq.read_table(path, columns=["user", self.metric])
        users = table.column("user").to_numpy()
        if self._users is None:
            self._users = users
        elif not np.array_equal(users, self._users):
            raise ValueError(f"{path}: its test users differ from the other evaluations'")
        return table.column(self.metric).to_numpy()
