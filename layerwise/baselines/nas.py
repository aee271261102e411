"""NAS-style layer-subset search with the evaluation budget of our own selection.

Our default selector (beam over `ablation_loss` with the dependency matrix) evaluates the gated model on
every single and every pair of removed layers: 1 + L + L(L-1)/2 distinct model evaluations
(`selection_evaluations`). The search gets exactly as many evaluations of its own objective: the unhealed
validation NDCG@10 of the teacher with the other layers gated off (`layerwise.compression.tracing.metric_with_removed`,
the same users our selection scores on). The winner is then built with our bridges and healed with our
budget. The search strategy is a callable passed in (the library does not import Optuna;
`orchestration.search.nas.tpe_search` is Optuna TPE over L "take layer i" scores repaired to exactly k):

    objective = SubsetObjective(teacher, data, budget=selection_evaluations(teacher.n_layers))
    keep = search(objective, teacher.n_layers, k, seed)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from layerwise.baselines.budget import Budget, Variant, healed_pair, require
from layerwise.compression.compact import build_compact
from layerwise.models.recommender import SequentialRecommender
from layerwise.compression.tracing import metric_with_removed, sample_users

Search = Callable[["SubsetObjective", int, int, int], list[int]]


def selection_evaluations(n_layers: int) -> int:
    """Distinct model evaluations of our beam selection: the full model, L single and L(L-1)/2 pair removals.

    (`ablation_loss` and `dependency_matrix` each evaluate the full model and the singles; those are the
    same evaluations, counted once.)
    """
    return 1 + n_layers + n_layers * (n_layers - 1) // 2


def top_k_subset(values: Sequence[float], k: int) -> list[int]:
    """Repair L free scores into exactly k layers: the k largest (ties to the lower index), sorted."""
    if not 1 <= k <= len(values):
        raise ValueError(f"k must be between 1 and {len(values)}, got {k}")
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


class BudgetSpent(RuntimeError):
    """A search asked for a new subset after the evaluation budget was used up."""


class SubsetObjective:
    """Unhealed validation NDCG@10 of the teacher keeping a layer subset; counts distinct evaluations.

    A subset seen before costs nothing (its value is cached); a new one after `budget` evaluations
    raises BudgetSpent. `best` is the best (value, kept) so far; `history` lists every evaluation in order.
    """

    def __init__(self, teacher: SequentialRecommender, data, budget: int, max_users: int | None = None,
                 max_len: int = 50, seed: int = 0):
        self.teacher, self.data, self.budget, self.max_len = teacher, data, budget, max_len
        self.users = sample_users(data, max_users, seed) if data is not None else None
        self.cache: dict[tuple[int, ...], float] = {}
        self.history: list[tuple[list[int], float]] = []

    @property
    def evaluations(self) -> int:
        return len(self.cache)

    @property
    def spent(self) -> bool:
        return self.evaluations >= self.budget

    def exhausted(self, k: int) -> bool:
        """True when every k-subset has been evaluated (a small search space can be enumerated)."""
        return self.evaluations >= math.comb(self.teacher.n_layers, k)

    @property
    def best(self) -> tuple[float, list[int]]:
        if not self.cache:
            raise ValueError("nothing evaluated yet")
        # Equal values: the subset with the lower layer indices wins, as in layerwise.compression.select.
        key = max(self.cache, key=lambda s: (self.cache[s], tuple(-i for i in s)))
        return self.cache[key], list(key)

    def __call__(self, keep: Sequence[int]) -> float:
        key = tuple(sorted(int(i) for i in keep))
        if key not in self.cache:
            if self.spent:
                raise BudgetSpent(f"all {self.budget} evaluations are used")
            removed = set(range(self.teacher.n_layers)) - set(key)
            self.cache[key] = metric_with_removed(self.teacher, removed, "ndcg@10", data=self.data,
                                                  users=self.users, max_len=self.max_len)
            self.history.append((list(key), self.cache[key]))
        return self.cache[key]


def nas(data, teacher=None, budget: Budget | None = None, search: Search | None = None,
        progress: bool = False, **context) -> list[Variant]:
    """Registry `nas`: search k-subsets with `search` under our evaluation budget, bridge and heal the best.

    search: (objective, n_layers, k, seed) -> kept layers; it may stop early. The subset reported is the
        objective's best, whatever the search returns.
    """
    budget = require("nas", teacher, budget)
    if search is None:
        raise ValueError("the NAS baseline needs a search strategy: search=orchestration.search.nas.tpe_search")
    n_evals = selection_evaluations(teacher.n_layers)
    objective = SubsetObjective(teacher, data, n_evals, budget.ablation_users, budget.heal.max_len,
                                budget.seeds[0])
    search(objective, teacher.n_layers, budget.k, budget.seeds[0])
    value, keep = objective.best
    info = {"kept": keep, "budget": n_evals, "evaluations": objective.evaluations, "search_valid_ndcg@10": value,
            "history": objective.history}
    student = build_compact(teacher, keep, budget.bridge_rank, seed=budget.seeds[0])
    return healed_pair(student, teacher, data, replace(budget.heal, seed=budget.seeds[0]), "nas", "nas", info,
                       progress)
