"""`layerwise study` on a device: `device:` in a study config (and --device), kept out of every stage's key,
and the Ray request of its seed tasks. The seed's stages running on the device are tested in
tests/test_device.py, which a GPU machine without Ray runs too (benchmarks/gpu_check.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerwise.data import load_dataset
from orchestration.cli.experiments import _config_and_overrides
from orchestration.cli.main import build_parser
from orchestration.distributed.ray_runtime import GPU_TASKS_PER_CARD
from orchestration.pipeline.config import _build
from orchestration.study.config import StudyConfig, config_dict, load_study_config
from orchestration.study.driver import seed_task_config, seed_task_options
from orchestration.study.seed import SeedRun

TINY = ["seeds=[0,1]", "data.dataset=synthetic:120:40:1500:0", "teacher.preset=tiny", "baselines=[first,int8]",
        "sweep.ks=[1]"]


def test_a_study_config_takes_a_device_and_the_flag_wins(tmp_path):
    yaml = tmp_path / "study.yaml"
    yaml.write_text("device: cpu\nseeds: [0]\nteacher:\n  preset: tiny\n")
    config = load_study_config(str(yaml))
    assert config.device == "cpu" and load_study_config(None).device == "auto"
    assert _build(StudyConfig, config_dict(config), "") == config  # what a seed task rebuilds
    args = build_parser().parse_args(["study", str(yaml), "seeds=[0,1]", "--device", "cuda:1"])
    assert load_study_config(*_config_and_overrides(args)).device == "cuda:1"
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load_study_config(None, ["device=gpu"])


def test_the_device_is_in_no_stage_key(tmp_path):
    """A stage made on a GPU is the stage made on a CPU: every planned key is the same for any device."""
    keys = {}
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        config = load_study_config(None, [*TINY, f"device={device}", f"data.cache_dir={tmp_path / 'cache'}"])
        data = load_dataset(config.data.dataset, cache_dir=config.data.cache_dir)
        keys[device] = [SeedRun(config, seed, tmp_path / f"seed-{seed}", data).planned() for seed in config.seeds]
    assert len(keys["cpu"][0]) > 5 and keys["cpu"][0] != keys["cpu"][1]
    assert keys["auto"] == keys["cpu"] == keys["cuda"] == keys["cuda:1"]


@pytest.mark.parametrize("device, gpus, seen", [("cpu", 0.0, "cpu"), ("cuda", 1 / GPU_TASKS_PER_CARD, "cuda"),
                                                ("cuda:1", 1 / GPU_TASKS_PER_CARD, "cuda")])
def test_seed_tasks_ask_ray_for_a_gpu_share_only_for_a_gpu_device(device, gpus, seen):
    config = load_study_config(None, ["ray.cpus_per_seed=0.5", f"device={device}"])
    options = seed_task_options(config)
    assert options == {"num_cpus": 0.5, "num_gpus": gpus, "max_retries": 0, "runtime_env": None}
    # The task sees the one GPU Ray gave it as cuda (whichever card), and its config keeps every other value.
    task = seed_task_config(config, options)
    assert task["device"] == seen and {**task, "device": device} == config_dict(config)


def test_seed_tasks_with_pinned_kernels_keep_their_environment():
    config = load_study_config(None, ["ray.portable_numerics=true", "device=cpu"])
    assert seed_task_options(config)["runtime_env"]["env_vars"]["ATEN_CPU_CAPABILITY"] == "avx2"

