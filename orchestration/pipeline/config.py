"""The pipeline's configuration: nested frozen dataclasses, loaded from YAML with key=value overrides.

    config = load_config("study.yaml", ["teacher.train.epochs=5", "compress.keep=0.5"])

Unknown keys and wrong types are errors that name the key, so a typo never silently runs the default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from layerwise.perf.guard import REMEASURES
from layerwise.compression.compress import DEFAULT_BRIDGE_RANK
from layerwise.device import check_device
from layerwise.compression.distill import HealConfig
from layerwise.models.llm import LLMSetup
from layerwise.training.train import ADDED, TrainConfig


def added_option(default: Any) -> Any:
    """A config field whose default keeps every earlier result valid (see `_plain`)."""
    return field(default=default, metadata={"hash_if_set": True})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "ml-100k"
    data_dir: str | None = None
    cache_dir: str = "runs/data_cache"
    min_core: int = 0
    max_len: int = 50


@dataclass(frozen=True)
class TeacherConfig:
    family: str = "llama"
    preset: str = "small"
    pretrained: str | None = None  # a known LLM name (`layerwise models list`), a GGUF file or an HF directory
    text_features: bool = False
    dropout: float = 0.1
    causal: bool = added_option(False)  # BERT as a decoder: next item at every position, not cloze
    head: str = added_option("dot")  # or "cos": cosine scores times a learned temperature
    # How a pretrained decoder LLM becomes the recommender (layerwise.models.llm.LLMSetup's fields); None
    # gives a pretrained decoder LLMSetup's defaults.
    llm: LLMSetup | None = added_option(None)
    # Budgeted by epochs, never by wall-clock minutes, so that the same seed gives the same teacher on a busy
    # machine and a quiet one. On ml-100k validation NDCG@10 climbs to ~0.125 by epoch 20 and peaks at
    # ~0.134 near epoch 30; 20 epochs (~4.5 minutes on one quiet core) keep `make run` within 15 minutes.
    # A cap set by hand (teacher.train.max_minutes) is reported in the headline when it stops training.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20))


@dataclass(frozen=True)
class CompressStageConfig:
    keep: float = 0.25
    selector: str = "beam"
    method: str | None = None
    bridge_rank: int = DEFAULT_BRIDGE_RANK
    calib_batches: int = 8
    calib_batch_size: int = 64
    # 10 healing epochs, not the library's 20: an epoch costs about 15 CPU seconds here (the teacher's
    # forward for the KD targets included), and early stopping still ends it sooner when it stalls.
    heal: HealConfig = field(default_factory=lambda: HealConfig(epochs=10))
    # Validation users that ablation, the dependency matrix and selection evaluate on (None: all). On a
    # 30-layer LLM each evaluation is a forward of the whole model over them, and the dependency matrix
    # takes 1 + L + L(L-1)/2 of them: a sample keeps that to a fraction.
    ablation_users: int | None = field(default=None, metadata=ADDED)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: embedded local Ray (or $RAY_ADDRESS when set)
    shards: int = 2  # importance shards, one Ray task each
    distributed_training: bool = False  # teacher and healing through Ray Train + DeepSpeed
    workers: int = 2
    zero_stage: int = 2


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None: sqlite store in the run directory
    experiment: str = "layerwise"
    registered_model: str = "layerwise-compact"


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 64)
    runs: int = 30
    warmup: int = 5
    threads: int | None = None  # None: the pipeline's `threads`
    remeasures: int = added_option(REMEASURES)  # a disturbed speedup is timed again, with 2x the rounds


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "default"
    run_dir: str = "runs"
    seed: int = 0
    # torch threads in the driver, pinned: with the same seed the teacher and the healing are then
    # bit-identical on a busy machine and a quiet one (and two OpenMP threads on two cores, one of them
    # taken by another job, spin against each other and run ~3x slower than one).
    threads: int | None = 1
    # Where every stage runs its models (layerwise.device): auto (a GPU when one is visible), cpu, cuda,
    # cuda:N. A CPU run keeps its stage folders; a GPU's results are other bits, so they get their own.
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    compress: CompressStageConfig = field(default_factory=CompressStageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def __post_init__(self) -> None:
        check_device(self.device)


def device_key(device: str | None) -> tuple:
    """What a device setting adds to a stage hash: nothing on the CPU (earlier stages stay valid), the
    resolved device's type where it is a GPU."""
    from layerwise.device import resolve_device

    resolved = resolve_device(device)
    return () if resolved.type == "cpu" else (resolved.type,)


def load_config(path: str | None = None, overrides: list[str] | None = None, cls: type = PipelineConfig):
    """`cls` (default PipelineConfig) from the embedded defaults, then a YAML file, then key=value
    overrides."""
    raw: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        _set_path(raw, key.split("."), yaml.safe_load(value))
    return _build(cls, raw, "")


def stage_hash(*parts: Any) -> str:
    """Stable short hash of the configuration that determines a stage's outputs."""
    blob = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    """A dataclass as a dict for hashing. A field added after runs existed (metadata `hash_if_set`) is left
    out while it has its default, which keeps the old behaviour: finished stages keep their folders."""
    if not dataclasses.is_dataclass(value):
        return value
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
            if not (f.metadata.get("hash_if_set") and getattr(value, f.name) == f.default)}


def _set_path(raw: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        raw = raw.setdefault(key, {})
        if not isinstance(raw, dict):
            raise ValueError(f"override path {'.'.join(keys)} goes through a non-section")
    raw[keys[-1]] = value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + u for u in unknown]}; "
                         f"known in this section: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(hint, value, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):  # a section, or an optional one (teacher.llm)
        return _build(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and
                                                 not (hint is int and isinstance(value, bool))):
        raise ValueError(f"config key {key} must be {hint.__name__}, got {value!r}")
    return value
