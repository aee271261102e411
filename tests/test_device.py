"""One device setting: what `auto|cpu|cuda[:N]` resolves to, and that a training step and a ranking batch
run wholly on the device asked for.

A TorchFunctionMode (`DeviceLog`) records the device of every tensor torch returns during the step, and
which function made it. The only tensors allowed off the device are the host data a batch starts from
(`from_numpy`) and the deliberate transfers back (`cpu`), which are counted: a ranking brings its ranks back
once, not once per batch. The CUDA cases are skipped without a GPU; benchmarks/gpu_check.sh runs this file
on one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from layerwise.data import load_dataset
from layerwise.device import (autocast_for, check_device, device_scorer, model_device, peak_bf16_flops,
                              resolve_device, wants_gpu)
from layerwise.compression.distill import heal
from layerwise.evaluation.evaluate import evaluate, rank_targets
from layerwise.models import SequentialRecommender, build_backbone, preset_config
from layerwise.training.train import TrainConfig, batch_loss, training_windows

NO_GPU = not torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(NO_GPU, reason="no CUDA GPU visible"))]
HOST_DATA = {"from_numpy"}  # a batch's items and users are read on the host, then moved
TO_HOST = {"cpu"}  # the deliberate transfers back


class DeviceLog(TorchFunctionMode):
    """Counts (function name, device) of every tensor that a torch function returns while active."""

    def __init__(self):
        super().__init__()
        self.made: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.made[(name, str(value.device))] += 1
        return out

    def off(self, device: torch.device) -> Counter:
        """Tensors made elsewhere than `device`, by function name."""
        return Counter({name: n for (name, where), n in self.made.items() if torch.device(where) != device})

    def calls(self, name: str) -> int:
        return sum(n for (fn, _), n in self.made.items() if fn == name)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic:60:40:600:0")  # 40 items with titles and genres


def preset(data) -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(build_backbone(preset_config("llama", "tiny", n_layers=2)), data.n_items)


def pretrained_llm(data, smollm2) -> SequentialRecommender:
    """The real SmolLM2-135M cut to 2 layers, with LoRA, as tests/models/test_llm.py builds it."""
    from layerwise.models.factory import build_recommender
    from layerwise.models.llm import LLMSetup

    return build_recommender(data, "llama", pretrained=str(smollm2.path), dropout=0.0,
                             llm=LLMSetup(n_layers=2, item_init="title_hidden", lora_rank=4))


def _assert_placed(model, device: torch.device) -> None:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert tensors and all(t.device == device for t in tensors.values()), \
        {n: str(t.device) for n, t in tensors.items() if t.device != device}


def _training_step(model, data, device: torch.device) -> DeviceLog:
    """One optimizer step as `train_recommender` takes it: the batch moved, its loss, backward, clip, step."""
    inputs, targets = training_windows(data, 12, model.causal)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    with DeviceLog() as log:
        x, y = inputs[:8].to(device), targets[:8].to(device)
        loss = batch_loss(model, x, y, TrainConfig(max_len=12), torch.Generator().manual_seed(0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()  # torch keeps Adam's step counter on the host by design; its moments are checked below
    assert torch.isfinite(loss).item() and loss.device == device
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    assert moments and all(v.device == device for v in moments)
    return log


def _ranking(model, data, device: torch.device) -> tuple[DeviceLog, torch.Tensor]:
    """`evaluate`'s ranking of 60 users in two batches, scored where the model is."""
    model.eval()
    with DeviceLog() as log:
        ranks = rank_targets(lambda h: {"model": device_scorer(model)(h)}, data, stage="test", max_len=12,
                             batch_size=32)["model"]
    return log, ranks


def _check_step_and_ranking(model, data, device: torch.device) -> None:
    model.to(device)
    _assert_placed(model, device)
    step = _training_step(model, data, device)
    assert step.calls("linear") > 0  # the layers ran under the log
    # Off the device: only the one read of each group's lengths, which picks the groups on the host.
    assert set(step.off(device)) <= TO_HOST, step.off(device)
    _assert_placed(model, device)
    log, ranks = _ranking(model, data, device)
    assert set(log.off(device)) <= HOST_DATA | TO_HOST, log.off(device)
    assert log.calls("cpu") == 1  # the per-user ranks come back to the host once, after both batches
    assert ranks.device.type == "cpu" and ranks.shape == (data.n_users,) and (ranks >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_a_preset_trains_and_ranks_on_the_device_asked_for(data, device):
    _check_step_and_ranking(preset(data), data, resolve_device(device))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_pretrained_llm_trains_and_ranks_on_the_device_asked_for(data, smollm2, device):
    _check_step_and_ranking(pretrained_llm(data, smollm2), data, resolve_device(device))


def test_the_device_log_sees_a_tensor_made_elsewhere():
    with DeviceLog() as log:
        torch.zeros(3, device="meta") + 1
        torch.arange(4)
    assert log.off(torch.device("meta")) == Counter({"arange": 1})


def test_device_settings_resolve_or_say_what_is_wrong():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu" if NO_GPU else "cuda")
    assert check_device("CUDA:1") == "cuda:1" and check_device(None) == "auto"
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="unknown device"):
        check_device("cuda:x")
    assert wants_gpu("cuda") and not wants_gpu("cpu") and wants_gpu("auto") == (not NO_GPU)


@pytest.mark.skipif(not NO_GPU, reason="a GPU is visible")
def test_cuda_asked_for_on_a_machine_without_one_is_refused_by_name():
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        resolve_device("cuda:0")


def test_cpu_autocast_stays_as_configured_and_unknown_values_are_refused():
    cpu = torch.device("cpu")
    assert [autocast_for(a, cpu) for a in (None, "bf16", "fp32")] == [None, "bf16", "fp32"]
    with pytest.raises(ValueError, match="unknown autocast"):
        autocast_for("fp16", cpu)


@pytest.mark.skipif(NO_GPU, reason="no CUDA GPU visible")
def test_cuda_autocast_is_bf16_where_the_card_has_it():
    cuda = torch.device("cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    assert autocast_for(None, cuda) == autocast_for("bf16", cuda) == expected and autocast_for("fp32", cuda) is None


def test_a_cpu_evaluation_through_the_device_scorer_is_the_same_bits(data):
    model = preset(data).eval()
    direct = evaluate(model.score, data, stage="test", max_len=12)
    placed = evaluate(device_scorer(model), data, stage="test", max_len=12)
    assert all((direct.per_user[k] == placed.per_user[k]).all() for k in direct.per_user)


def test_healing_refuses_a_teacher_on_another_device(data):
    teacher = preset(data).to("meta")
    with pytest.raises(ValueError, match="place both on one device"):
        heal(preset(data), teacher, data)
    assert model_device(teacher).type == "meta"


def test_published_bf16_peaks_are_matched_on_the_card_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12  # SXM
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_bf16_flops("NVIDIA H100 NVL") == 835.5e12
    assert peak_bf16_flops("NVIDIA H200") == 989.4e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Tesla T4") is None


COMMANDS = ("train", "compress", "evaluate", "score", "bench", "serve", "run", "tune", "baselines", "study")


def test_every_command_that_runs_a_model_documents_device():
    from orchestration.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in COMMANDS:
        text = " ".join(commands[name].format_help().split())
        assert "--device DEVICE" in text and "cuda:N" in text, name


def test_run_configs_take_a_device_and_a_cpu_keeps_its_stage_hashes(tmp_path):
    from orchestration.cli.experiments import _config_and_overrides
    from orchestration.cli.main import build_parser
    from orchestration.pipeline.config import device_key, load_config, stage_hash

    yaml = tmp_path / "run.yaml"
    yaml.write_text("device: cpu\nteacher:\n  preset: tiny\n")
    assert load_config(str(yaml)).device == "cpu"
    args = build_parser().parse_args(["run", str(yaml), "teacher.train.epochs=2", "--device", "cuda:1"])
    assert load_config(*_config_and_overrides(args)).device == "cuda:1"  # the flag wins over the YAML
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load_config(None, ["device=gpu"])
    config = load_config(None, ["device=cpu"])
    assert device_key("cpu") == () and stage_hash(config.teacher, *device_key("cpu")) == stage_hash(config.teacher)


def test_a_search_space_takes_a_device_outside_its_key(tmp_path):
    from orchestration.search.space import load_space

    shipped = Path(__file__).resolve().parent.parent / "tune_spaces" / "llama.yaml"
    assert load_space(shipped).device == "auto"
    path = tmp_path / "space.yaml"
    path.write_text("device: CUDA:0\n" + shipped.read_text())
    assert load_space(path).device == "cuda:0"
    path.write_text("device: tpu\n" + shipped.read_text())
    with pytest.raises(ValueError, match="unknown device"):
        load_space(path)



# A study seed at the smallest size that still runs every kind of stage: a baseline of each kind (a scorer,
# a depth cut, INT8 on the CPU, a model trained afresh), an ablation, a k of the sweep, noise, the dependency.
STUDY = ["seeds=[0]", "data.dataset=synthetic:120:40:1500:0", "teacher.preset=tiny", "teacher.train.epochs=1",
         "compress.keep=0.5", "compress.calib_batches=2", "compress.heal.epochs=1", "compress.ablation_users=40",
         "baselines=[mostpop,first,int8,scratch]", "ablation=[kd]", "sweep.selectors=[random]", "sweep.ks=[1]",
         "sweep.heal_epochs=1", "noise.kinds=[drop]", "noise.levels=[0.0,0.2]", "bench.runs=3", "bench.warmup=1",
         "bench.remeasures=0", "bench.batch_sizes=[1,8]"]
STAGES = {"teacher", "importance", "ours", "baseline-mostpop", "baseline-first", "baseline-int8",
          "baseline-scratch", "noise", "dependency", "ablation-kd", "sweep-random-k1"}


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_study_seed_runs_every_stage_on_the_device_asked_for(tmp_path, device):
    """Each stage records where it ran; the driver's speed stage times the seed's models there too (INT8,
    CPU-only, is left out on a GPU and says so)."""
    import json

    from orchestration.study.config import config_dict, load_study_config
    from orchestration.study.driver import _time_models, collect_rows
    from orchestration.study.seed import run_seed

    config = load_study_config(None, [*STUDY, f"device={device}", f"data.cache_dir={tmp_path / 'cache'}"])
    dirs = {k: Path(v) for k, v in run_seed(config_dict(config), 0, str(tmp_path / "seed-0"),
                                            threads=torch.get_num_threads()).items()}
    where = resolve_device(device)
    assert set(dirs) == STAGES
    for name, path in dirs.items():
        timing = json.loads((path / "_seconds.json").read_text())
        assert timing["device"] == str(where), name
        assert timing["precision"]["heal"] == (autocast_for(None, where) or "float32"), name
    rows = collect_rows({0: dirs})
    assert {r["row"] for r in rows} >= {"teacher", "ours", "mostpop", "first +heal", "int8", "scratch"}
    assert all(0 <= r["means"]["ndcg@10"] <= 1 for r in rows)
    (tmp_path / "speed").mkdir()
    _time_models(config, data_for(config), dirs, rows, tmp_path / "speed")
    speed = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert speed["env"]["device"] == str(where) and {"teacher", "ours", "first"} <= set(speed["models"])
    assert ("int8" in speed["models"]) == (where.type == "cpu")
    assert where.type == "cpu" or "runs on the CPU only" in speed["sources"]["int8"]
    if where.type == "cpu":  # INT8 timed apart, after the float models, against the same teacher
        assert speed["quantized"]["models"] == ["int8"] and "timed after the float models" in speed["sources"]["int8"]
        assert speed["quantized"]["teacher"]["batches"] and speed["models"]["int8"]["batches"]
    else:
        assert "quantized" not in speed


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_the_baselines_table_runs_on_the_device_asked_for(tmp_path, device):
    from dataclasses import asdict

    from layerwise.compression.distill import HealConfig
    from layerwise.models.checkpoint import save_recommender
    from layerwise.training.train import train_recommender
    from orchestration.baselines.table import run_baselines

    data = load_dataset("synthetic:40:30:400:0")
    recipe = TrainConfig(epochs=2, batch_size=32, lr=1e-2, max_len=12)
    teacher = SequentialRecommender(build_backbone(preset_config("llama", "tiny", n_layers=4)), data.n_items)
    train_recommender(teacher, data, recipe)
    save_recommender(teacher, tmp_path / "teacher", {"kind": "teacher", "data_fingerprint": data.fingerprint,
                                                     "max_len": 12, "train": asdict(recipe)})
    where = resolve_device(device)
    result = run_baselines(tmp_path / "teacher", data, keep=0.5, heal_config=HealConfig(epochs=1), seeds=(0,),
                           which=["mostpop", "first", "int8", "scratch"], bridge_rank=4, batch_sizes=(1, 8),
                           runs=3, memory=where.type == "cuda", progress=False, device=device)
    rows = {r["row"]: r for r in result["rows"]}
    assert result["settings"]["device"] == result["benchmark"]["env"]["device"] == str(where)
    assert {"teacher", "ours", "first", "scratch"} <= set(result["benchmark"]["models"])
    assert (rows["int8"]["speed"] is None) == (where.type == "cuda")  # CPU kernels only: evaluated, not timed
    assert all(0 <= row["metrics"]["ndcg@10"] <= 1 for row in rows.values())
    if where.type == "cuda":
        assert rows["scratch"]["memory"]["status"] == "measured"


def data_for(config):
    return load_dataset(config.data.dataset, cache_dir=config.data.cache_dir)
