"""One baseline under our budget, as `layerwise baselines` and each seed of `layerwise study` both run it:
which baselines exist and in which order, the teacher's training recipe (the from-scratch baseline trains
the same way), and `run_method`, which hands the registry the context it needs (our compact model for
`ours+int8`, Optuna's search for `nas`).

    variants = run_method("first", data, teacher, Budget(k=2, heal=heal), compact, progress=False)
"""

from __future__ import annotations

import dataclasses

from layerwise.baselines import BASELINES, SCORER_BASELINES, Budget, Variant
from layerwise.training.train import TrainConfig

# Table order: our method, then the references, depth, search, width/sparsity, quantization, students.
ORDER = ("mostpop", "random", "uniform", "first", "last", "shortgpt", "gromov", "nas", "magnitude", "width",
         "int8", "int4", "ours+int8", "distilbert", "tinybert", "truncated", "scratch")
# Only for a teacher built on a pretrained LLM (its manifest's `pretrained` and `llm`): left out of the
# default list otherwise.
PRETRAINED_ONLY = ("truncated",)


def methods(which: list[str] | None, pretrained_llm: bool = False) -> list[str]:
    """The baselines to run, in table order; "ours" and "teacher" are always there and need no name. The
    default (`which` None) is every baseline that applies: PRETRAINED_ONLY ones need `pretrained_llm`."""
    default = [n for n in ORDER if pretrained_llm or n not in PRETRAINED_ONLY]
    names = [n for n in (which or default) if n not in ("ours", "teacher")]
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {sorted(BASELINES)}")
    return [n for n in ORDER if n in names]


def teacher_train_config(manifest: dict) -> TrainConfig | None:
    """The teacher's training recipe from its manifest (for the scratch baseline), or None if absent."""
    recipe = manifest.get("train")
    if not recipe:
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in recipe.items() if k in known})


def teacher_build(manifest: dict) -> dict | None:
    """How the teacher was built (for the baselines that rebuild it from its pretrained weights), or None
    for a teacher without pretrained weights."""
    if not manifest.get("pretrained"):
        return None
    return {key: manifest.get(key) for key in ("pretrained", "llm", "head", "dropout")}


def run_method(name: str, data, teacher, budget: Budget, compact, progress: bool) -> list[Variant]:
    """The variants of baseline `name` under `budget` (`compact`: our model, which `ours+int8` quantizes)."""
    if name in SCORER_BASELINES:
        return [Variant(name, BASELINES[name](data), "", None, {"scorer": True})]
    context = {"compact": compact} if name == "ours+int8" else {}
    if name == "nas":
        from orchestration.search.nas import tpe_search

        context["search"] = tpe_search
    return BASELINES[name](data, teacher=teacher, budget=budget, progress=progress, **context)
