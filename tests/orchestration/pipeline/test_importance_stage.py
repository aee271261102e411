"""`layerwise run`'s importance stage computes what the selection needs: the local estimators always (one
cheap pass, the report's heatmap), an ablation only for a selector that ranks by it, and the loss dependency
matrix (1 + L + L(L-1)/2 model evaluations) only for beam."""

from __future__ import annotations

from pathlib import Path

from orchestration.pipeline.config import load_config
from orchestration.pipeline.steps import EVALUATIONS, importance_evaluations

SMOLLM2 = str(Path(__file__).resolve().parents[3] / "studies" / "recipes" / "smollm2.yaml")


def test_topk_on_block_influence_needs_no_evaluation():
    assert importance_evaluations("topk", "block_influence") == ()
    assert importance_evaluations("topk", None) == ()  # its default method is block influence
    assert importance_evaluations("contiguous", None) == ()


def test_the_smollm2_recipe_as_the_issue_ran_it_submits_no_dependency_matrix():
    config = load_config(SMOLLM2, ["compress.selector=topk", "compress.method=block_influence"])
    assert importance_evaluations(config.compress.selector, config.compress.method) == ()
    recipe = load_config(SMOLLM2)  # topk on combined: local estimators only
    assert importance_evaluations(recipe.compress.selector, recipe.compress.method) == ()


def test_beam_and_ablation_rankers_get_what_they_read():
    assert importance_evaluations("beam", None) == ("dependency", "ablation_loss")
    assert importance_evaluations("beam", "ablation") == ("dependency", "ablation")
    assert importance_evaluations("greedy", "ablation") == ("ablation",)
    assert importance_evaluations("topk", "ablation_loss") == ("ablation_loss",)
    assert set(importance_evaluations("beam", None)) < set(EVALUATIONS)
