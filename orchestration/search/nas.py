"""Optuna TPE over layer subsets of size k, under the evaluation budget of our own selection.

The library holds the objective (`layerwise.baselines.nas.SubsetObjective`); Optuna stays out of the
library, so the search lives here and is handed to the `nas` baseline:

    variants = BASELINES["nas"](data, teacher=teacher, budget=budget, search=tpe_search)
"""

from __future__ import annotations

from layerwise.baselines.nas import SubsetObjective, top_k_subset

# TPE may propose a subset it has seen (free: the objective caches it); this many proposals per budgeted
# evaluation ends a search that keeps doing so.
PROPOSALS_PER_EVALUATION = 20


def tpe_search(objective: SubsetObjective, n_layers: int, k: int, seed: int = 0) -> list[int]:
    """Maximise objective(subset) with TPE over L "take layer i" scores in [0, 1], repaired to the top k.

    Stops when the objective's budget is spent, every k-subset has been tried, or TPE only repeats itself.
    Returns the best subset found (sorted teacher indices).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, objective.budget // 3)))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(PROPOSALS_PER_EVALUATION * objective.budget):
        if objective.spent or objective.exhausted(k):
            break
        trial = study.ask()
        keep = top_k_subset([trial.suggest_float(f"layer_{i}", 0.0, 1.0) for i in range(n_layers)], k)
        study.tell(trial, objective(keep))
    return objective.best[1]
