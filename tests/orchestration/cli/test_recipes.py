"""`layerwise train`'s recipes: a pretrained decoder LLM trains with the measured recipe unless a flag says
otherwise, the run says which, and --family comes from the library's registry."""

from __future__ import annotations

import pytest

from layerwise.models.families import FAMILIES
from orchestration.cli.main import build_parser
from orchestration.cli.teacher import teacher_setup
from orchestration.recipes import load_recipe, recipe_for, recipe_names
from tests.helpers.fake_data import FakeSequenceData


def data(titles: bool = True) -> FakeSequenceData:
    fake = FakeSequenceData([[1, 2, 3, 4], [2, 3, 4, 1], [3, 4, 1, 2]], n_items=4)
    fake.item_text = ["", "Toy Story (1995) Animation", "Heat (1995) Action", "Fargo (1996) Crime",
                      "Babe (1995) Comedy"] if titles else None
    return fake


def train_args(*flags: str):
    return build_parser().parse_args(["train", "--dataset", "ml-100k", "--out", "/tmp/x", *flags])


def test_the_smollm2_recipe_is_the_measured_one():
    recipe = recipe_for("smollm2-135m")
    assert recipe.name == "smollm2" and "smollm2" in recipe_names()
    t = recipe.teacher
    assert t.head == "cos" and t.llm.item_init == "title_tokens" and t.llm.item_scale == "row_norm"
    assert t.llm.finetune == "lora" and t.llm.lora_rank == 16
    assert t.train.schedule == "cosine" and t.train.warmup == 0.1 and t.train.epochs == 12
    assert recipe_for("gemma3-270m").name == "smollm2"  # no recipe names it: the measured LLM recipe


def test_a_recipe_sets_the_teacher_and_flags_still_win():
    setup = teacher_setup(train_args("--recipe", "smollm2", "--epochs", "3", "--lora-rank", "8"), data())
    build, train = setup.build, setup.train
    assert build["pretrained"] == "smollm2-135m" and build["head"] == "cos"
    assert build["llm"].item_init == "title_tokens" and build["llm"].lora_rank == 8
    assert train.epochs == 3 and train.schedule == "cosine" and train.lr == 0.001 and train.batch_size == 64
    line = setup.describe()
    assert line.startswith("recipe smollm2 (") and "smollm2.yaml" in line
    assert "head cos" in line and "lora r8" in line and "3 epochs" in line and "10% warm-up" in line


def test_a_data_set_without_titles_gets_random_items_and_says_so():
    setup = teacher_setup(train_args("--recipe", "smollm2", "--head", "dot"), data(titles=False))
    assert setup.build["llm"].item_init == "random" and setup.build["head"] == "dot"
    assert "has no titles" in setup.describe()


def test_no_recipe_for_a_preset_or_when_turned_off():
    preset = teacher_setup(train_args("--family", "qwen2", "--preset", "tiny"), data())
    assert preset.recipe is None and preset.build["family"] == "qwen2" and preset.build["llm"] is None
    assert preset.train.epochs == 200 and preset.build["head"] == "dot"
    assert "recipe: none" in preset.describe()
    with pytest.raises(FileNotFoundError, match="no recipe 'nope'.*smollm2"):
        load_recipe("nope")


def test_family_choices_are_the_library_registry(capsys):
    for family in FAMILIES:
        assert train_args("--family", family).family == family
    with pytest.raises(SystemExit):
        train_args("--family", "mamba")
    assert "invalid choice: 'mamba'" in capsys.readouterr().err
    assert {"qwen2", "gemma3"} <= set(FAMILIES)
