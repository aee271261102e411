"""Depth baselines: other ways of choosing which k layers to keep, through our own compression path.

Every one runs `layerwise.compression.compress.compress` with its selector, the same bridges and the same calibration
as ours, and is reported as removed (unhealed) and healed with exactly our healing budget, so the only
difference from our method is the choice of layers:

    random    k layers drawn uniformly, once per seed in `budget.seeds` (mean and spread)
    uniform   evenly spaced, counted back from the last layer
    first     the first k layers;  last: the last k layers
    shortgpt  ShortGPT: the k layers of highest block influence 1 - cos(h_in, h_out), one shot
    gromov    Gromov et al.: remove the contiguous block whose input and output are closest in angle
    ours      our method (beam over ablation_loss + dependency) by the same path: the table's reference

    variants = BASELINES["shortgpt"](data, teacher=teacher, budget=Budget(k=2))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from layerwise.baselines.budget import Budget, Variant, healed_pair, require
from layerwise.compression.compress import CompressConfig, compress
from layerwise.models.recommender import SequentialRecommender

# Registry name -> selector in layerwise.compression.select (each selector brings its own importance score).
DEPTH_SELECTORS = {
    "random": "random", "uniform": "uniform", "first": "first", "last": "last",
    "shortgpt": "topk", "gromov": "contiguous", "ours": "beam",
}


def depth_variants(teacher: SequentialRecommender, data, budget: Budget, selector: str, row: str,
                   seeds: tuple[int, ...] | None = None, progress: bool = False) -> list[Variant]:
    """Compress with `selector` (keeping budget.k layers), then heal a copy; two variants per seed.

    Returns [unhealed, healed] for each seed in `seeds` (default: budget.seeds[0] only); the selector's
    importance scores, kept layers and unhealed validation metrics go into each variant's `info`.
    """
    variants = []
    for seed in seeds or budget.seeds[:1]:
        # A fraction: `n_kept` reads keep=1 as "all layers", so a count of one cannot be passed as such.
        config = CompressConfig(keep=budget.k / teacher.n_layers, selector=selector,
                                bridge_rank=budget.bridge_rank, ablation_users=budget.ablation_users,
                                seed=seed, heal=budget.heal, do_heal=False)
        result = compress(teacher, data, config, progress=progress)
        info = {"kept": result.kept, "selector": selector, "seed": seed, "scores": result.scores,
                "select_seconds": result.seconds.get("select")}
        # As `compress` does when it heals: the healing run is seeded like the selection.
        variants += healed_pair(result.model, teacher, data, replace(budget.heal, seed=seed), row,
                                timing=row, info=info, progress=progress)
    return variants


def _depth_baseline(name: str, all_seeds: bool = False) -> Callable[..., list[Variant]]:
    selector = DEPTH_SELECTORS[name]

    def baseline(data, teacher=None, budget: Budget | None = None, progress: bool = False,
                 **context) -> list[Variant]:
        budget = require(name, teacher, budget)
        seeds = budget.seeds if all_seeds else None
        return depth_variants(teacher, data, budget, selector, name, seeds, progress)

    baseline.__name__ = name
    baseline.__doc__ = (f"Depth baseline `{name}` (selector `{selector}`): [unhealed, healed] per draw, "
                        f"k = budget.k layers.")
    return baseline


random_layers = _depth_baseline("random", all_seeds=True)
uniform_layers = _depth_baseline("uniform")
first_layers = _depth_baseline("first")
last_layers = _depth_baseline("last")
shortgpt = _depth_baseline("shortgpt")
gromov = _depth_baseline("gromov")
ours = _depth_baseline("ours")
