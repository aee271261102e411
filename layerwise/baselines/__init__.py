"""Baselines, one registry: name -> factory.

Two kinds share it. A scorer baseline takes the data alone: `BASELINES["mostpop"](data)` returns a scorer
for `evaluate`. A compression baseline takes the teacher and the budget every baseline gets and returns
the models it made, each measured by the same `evaluate` and `benchmark` as ours:

    variants = BASELINES["magnitude"](data, teacher=teacher, budget=Budget(k=2, removed=n))
    for v in variants:
        evaluate(v.model.score, data, stage="test")

Called with data alone, a compression baseline raises a ValueError that says what it needs. `nas` also
needs a `search=` strategy (orchestration.search.nas.tpe_search); `ours+int8` takes our compact model as
`compact=` (or compresses the teacher itself).
"""

from collections.abc import Callable

from layerwise.baselines.attention import tinybert
from layerwise.baselines.budget import Budget, Variant
from layerwise.baselines.depth import (
    first_layers, gromov, last_layers, ours, random_layers, shortgpt, uniform_layers,
)
from layerwise.baselines.nas import nas, selection_evaluations
from layerwise.baselines.popularity import mostpop_scorer
from layerwise.baselines.quantization import depth_int8, int4, int8, is_quantized, storage_bytes
from layerwise.baselines.sparsity import magnitude
from layerwise.baselines.students import distilbert, scratch, truncated
from layerwise.baselines.width import width

BASELINES: dict[str, Callable] = {
    "mostpop": mostpop_scorer,
    "random": random_layers, "uniform": uniform_layers, "first": first_layers, "last": last_layers,
    "shortgpt": shortgpt, "gromov": gromov,
    "magnitude": magnitude, "width": width,
    "int8": int8, "int4": int4, "ours+int8": depth_int8,
    "distilbert": distilbert, "tinybert": tinybert, "scratch": scratch, "truncated": truncated,
    "nas": nas,
}
SCORER_BASELINES = ("mostpop",)  # take only the data and return a scorer
# Make one [unhealed, healed] pair for each seed in `budget.seeds` (a draw), and nothing else, so that a caller
# may run them one draw at a time with `Budget(seeds=(draw,))` (orchestration.study.seed keeps each draw).
PER_DRAW_BASELINES = ("random",)

__all__ = ["BASELINES", "SCORER_BASELINES", "Budget", "Variant", "mostpop_scorer", "ours",
           "selection_evaluations", "storage_bytes", "is_quantized"]
