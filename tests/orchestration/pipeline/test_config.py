"""Stage keys of resumable runs: an option added later leaves the keys of runs that never set it alone."""

import dataclasses
import hashlib
import json

import pytest

from orchestration.pipeline.config import TeacherConfig, load_config, stage_hash


def test_added_option_enters_the_stage_key_only_when_set():
    teacher = TeacherConfig()
    later = {"causal", "head", "llm"}  # keys added after runs existed, and TrainConfig's below
    without = {k: v for k, v in dataclasses.asdict(teacher).items() if k not in later}
    without["train"] = {k: v for k, v in without["train"].items()
                        if k not in ("schedule", "warmup", "schedule_minutes", "autocast")}
    before = hashlib.sha256(json.dumps([without, 0], sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert stage_hash(teacher, 0) == before
    assert stage_hash(dataclasses.replace(teacher, causal=True), 0) != before
    assert stage_hash(dataclasses.replace(teacher, dropout=0.2), 0) != before  # ordinary fields always count
    cosine = dataclasses.replace(teacher, train=dataclasses.replace(teacher.train, schedule="cosine"))
    assert stage_hash(cosine, 0) != before


def test_causal_teacher_from_overrides():
    from orchestration.pipeline.config import PipelineConfig

    config = load_config(None, ["teacher.causal=true", "teacher.family=bert"], cls=PipelineConfig)
    assert config.teacher.causal is True
    with pytest.raises(ValueError, match="causal"):
        load_config(None, ["teacher.causal=maybe"], cls=PipelineConfig)


def test_llm_teacher_keys_from_yaml_and_overrides(tmp_path):
    from layerwise.models.llm import LLMSetup
    from orchestration.pipeline.config import PipelineConfig

    recipe = tmp_path / "llm.yaml"
    recipe.write_text("teacher:\n  pretrained: smollm2-135m\n  head: cos\n"
                      "  llm: {item_init: title_tokens, item_scale: row_norm}\n"
                      "  train: {schedule: cosine, warmup: 0.1, autocast: bf16}\n")
    config = load_config(str(recipe), ["teacher.llm.lora_rank=8", "teacher.train.schedule_minutes=50"],
                         cls=PipelineConfig)
    t = config.teacher
    assert t.llm == LLMSetup(item_init="title_tokens", item_scale="row_norm", lora_rank=8)
    assert (t.head, t.train.schedule, t.train.warmup, t.train.autocast) == ("cos", "cosine", 0.1, "bf16")
    assert t.train.schedule_minutes == 50.0
    assert load_config(None, ["teacher.llm.finetune=full"], cls=PipelineConfig).teacher.llm.finetune == "full"
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['teacher.llm.rank'\]"):
        load_config(None, ["teacher.llm.rank=8"], cls=PipelineConfig)
    with pytest.raises(ValueError, match="unknown item_init 'titles'"):
        load_config(None, ["teacher.llm.item_init=titles"], cls=PipelineConfig)


def test_the_smollm2_recipe_is_budgeted_by_epochs_not_by_the_clock():
    from pathlib import Path

    from orchestration.pipeline.config import PipelineConfig

    recipe = Path(__file__).resolve().parents[3] / "studies" / "recipes" / "smollm2.yaml"
    train = load_config(str(recipe), [], cls=PipelineConfig).teacher.train
    assert (train.epochs, train.schedule, train.warmup, train.schedule_minutes) == (12, "cosine", 0.1, None)
    assert train.max_minutes and train.max_minutes > train.epochs * 6  # a cap above 4.4 min per quiet epoch


def test_every_shipped_recipe_loads_as_a_pipeline_config():
    from pathlib import Path

    from orchestration.pipeline.config import PipelineConfig

    recipes = sorted((Path(__file__).resolve().parents[3] / "studies" / "recipes").glob("*.yaml"))
    configs = {path.stem: load_config(str(path), [], cls=PipelineConfig) for path in recipes}
    assert {"smollm2", "beauty"} <= set(configs)
    assert configs["beauty"].data.dataset == "beauty" and configs["beauty"].compress.heal.cache_teacher
    llm = configs["smollm2"].compress
    assert (llm.keep, llm.selector, llm.method, llm.ablation_users) == (8, "topk", "combined", 512)
