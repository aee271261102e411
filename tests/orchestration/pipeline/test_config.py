"""Stage keys of resumable runs: an option added later leaves the keys of runs that never set it alone."""

import dataclasses
import hashlib
import json

import pytest

from orchestration.pipeline.config import TeacherConfig, load_config, stage_hash


def test_added_option_enters_the_stage_key_only_when_set():
    teacher = TeacherConfig()
    without = {k: v for k, v in dataclasses.asdict(teacher).items() if k != "causal"}  # a key from before
    before = hashlib.sha256(json.dumps([without, 0], sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert stage_hash(teacher, 0) == before
    assert stage_hash(dataclasses.replace(teacher, causal=True), 0) != before
    assert stage_hash(dataclasses.replace(teacher, dropout=0.2), 0) != before  # ordinary fields always count


def test_causal_teacher_from_overrides():
    from orchestration.pipeline.config import PipelineConfig

    config = load_config(None, ["teacher.causal=true", "teacher.family=bert"], cls=PipelineConfig)
    assert config.teacher.causal is True
    with pytest.raises(ValueError, match="causal"):
        load_config(None, ["teacher.causal=maybe"], cls=PipelineConfig)
