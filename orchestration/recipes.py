"""Training recipes: the measured teacher settings kept in studies/recipes/*.yaml, named on the command line.

    layerwise train --pretrained smollm2-135m --dataset ml-100k --out /tmp/smollm2          # the LLM recipe
    layerwise train --recipe studies/recipes/smollm2.yaml --epochs 3 --out /tmp/smollm2-3   # named, overridden

A recipe is a `layerwise run` config; `train` reads its `teacher` section (backbone, head, LLM setup and
training schedule). A pretrained decoder LLM takes the recipe that names it, else `smollm2`, the one the
recipe sweep measured (benchmarks/results/llm_recipe_sweep.json), unless a flag says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parents[1] / "studies" / "recipes"
LLM_RECIPE = "smollm2"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    teacher: object  # orchestration.pipeline.config.TeacherConfig


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(spec: str) -> Recipe:
    """A recipe by name (a file in studies/recipes/) or by path to a YAML file."""
    from orchestration.pipeline.config import load_config

    path = Path(spec)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = RECIPES_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no recipe {spec!r}: name one of {', '.join(recipe_names())} "
                                f"(in {RECIPES_DIR}) or give a YAML file")
    return Recipe(path.stem, path, load_config(str(path)).teacher)


def recipe_for(pretrained: str) -> Recipe:
    """The recipe of a pretrained decoder LLM: the one whose teacher names it, else LLM_RECIPE."""
    for name in recipe_names():
        recipe = load_recipe(name)
        if recipe.teacher.pretrained == pretrained:
            return recipe
    return load_recipe(LLM_RECIPE)


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (AVX-512 BF16 or AMX). Without them bf16 autocast
    is emulated: a SmolLM2 step took 190 s against 6.9 s in float32 (benchmarks/portable_numerics.py)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.read_text().splitlines()
                  if line.startswith("flags")), [])
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))
