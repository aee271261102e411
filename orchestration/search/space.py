"""Search spaces for `layerwise tune`: a typed YAML file -> checked values -> `ray.tune` distributions.

    space = load_space("tune_spaces/llama.yaml", ["teacher.preset=tiny", "space.heal_epochs=1"])
    param_space = space.to_tune()   # {"lr": tune.loguniform(1e-4, 3e-3), "selector": tune.choice([...]), ...}

A file has three sections (see tune_spaces/llama.yaml, every entry commented there):
  teacher:  which teacher the search compresses (trained once before the search, shared by all trials);
  protocol: how each trial is measured (calibration, benchmark, seed): fixed, never searched, so that
            every trial is measured the same way;
  space:    the trial parameters (PARAMETERS). Each is a constant (`bridge_rank: 8`) or a distribution:
            {distribution: loguniform, low: 1.0e-4, high: 3.0e-3}.

Every mistake is an error that names the file and the key: an unknown section, parameter or distribution,
a missing or extra field, low >= high, a value of the wrong type or outside the parameter's range.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from orchestration.pipeline.config import added_option

# Fields each distribution takes (besides `distribution`), and which parameter types it can sample.
# Semantics are ray.tune's: randint and lograndint exclude `high`; quniform rounds to multiples of q.
DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], tuple[type, ...]]] = {
    "choice": (("values",), (int, float, str)),
    "uniform": (("low", "high"), (float,)),
    "quniform": (("low", "high", "q"), (float,)),
    "loguniform": (("low", "high"), (float,)),
    "randint": (("low", "high"), (int,)),
    "lograndint": (("low", "high"), (int,)),
}


@dataclass(frozen=True)
class Param:
    """One trial parameter: its type, the values it may take, and whether it may be None (`null`)."""

    kind: type
    check: Callable[[Any], bool]
    rule: str  # says what `check` allows, for error messages
    nullable: bool = False


def _names(registry_module: str, attr: str) -> Callable[[], list[str]]:
    def names() -> list[str]:  # imported lazily: the registries import torch, a YAML check should not
        import importlib

        return sorted(getattr(importlib.import_module(registry_module), attr))
    return names


_SELECTORS = _names("layerwise.compression.select", "SELECTORS")
_METHODS = _names("layerwise.compression.importance", "IMPORTANCE")
_TRAINABLE = ("bridges", "lora", "all")

PARAMETERS: dict[str, Param] = {
    "layers": Param(int, lambda v: v >= 1, ">= 1 (teacher layers kept)"),
    "keep": Param(float, lambda v: 0 < v <= 1, "in (0, 1] (fraction of teacher layers kept)"),
    "bridge_rank": Param(int, lambda v: v >= 0, ">= 0 (0 = no bridges)"),
    "selector": Param(str, lambda v: v in _SELECTORS(), "a layerwise.compression.select.SELECTORS key"),
    "method": Param(str, lambda v: v in _METHODS(), "a layerwise.compression.importance.IMPORTANCE key", nullable=True),
    "temperature": Param(float, lambda v: v > 0, "> 0"),
    "kd_weight": Param(float, lambda v: v >= 0, ">= 0"),
    "ce_weight": Param(float, lambda v: v >= 0, ">= 0"),
    "hidden_weight": Param(float, lambda v: v >= 0, ">= 0"),
    "lr": Param(float, lambda v: v > 0, "> 0"),
    "heal_epochs": Param(int, lambda v: v >= 1, ">= 1"),
    "heal_batch_size": Param(int, lambda v: v >= 1, ">= 1"),
    "trainable": Param(str, lambda v: v in _TRAINABLE, f"one of {list(_TRAINABLE)}"),
    "lora_rank": Param(int, lambda v: v >= 1, ">= 1"),
    "prefit_steps": Param(int, lambda v: v >= 0, ">= 0"),
    "patience": Param(int, lambda v: v >= 1, ">= 1"),
}
DEPTH_KEYS = ("layers", "keep")  # exactly one of them says how deep the compact model is
REQUIRED = ("bridge_rank", "selector")


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher every trial compresses: a preset (optionally re-sized) or a pretrained backbone (a
    known LLM name, a GGUF file or a local Hugging Face directory)."""

    family: str = "llama"
    preset: str = "small"
    n_layers: int | None = None  # re-size the preset's depth (None: the preset's own)
    pretrained: str | None = None
    dataset: str = "ml-100k"
    data_dir: str | None = None
    cache_dir: str = "runs/data_cache"
    min_core: int = 0
    max_len: int = 50
    epochs: int = 200
    lr: float = 1e-3
    batch_size: int = 128
    dropout: float = 0.1
    seed: int = 0
    max_minutes: float | None = None  # wall-clock cap on teacher training (early stopping usually ends sooner)
    head: str = added_option("dot")  # "cos": cosine scores times a learned temperature
    llm: dict | None = added_option(None)  # LLMSetup fields for a pretrained decoder LLM


@dataclass(frozen=True)
class Protocol:
    """How every trial is measured; the same for all trials of a search."""

    seed: int = 0
    calib_batches: int = 8
    calib_batch_size: int = 64
    bench_batch_size: int = 64
    bench_runs: int = 10
    bench_warmup: int = 3
    alone_runs: int = 30  # timed rounds when the front is timed again, alone, after the search
    heal_max_minutes: float | None = None  # wall-clock cap on one trial's healing


@dataclass(frozen=True)
class SearchSpace:
    path: str
    teacher: TeacherSpec
    protocol: Protocol
    entries: dict[str, Any] = field(default_factory=dict)  # name -> constant or checked distribution dict
    # Where the teacher, the trials and their benchmarks run (layerwise.device): auto, cpu, cuda, cuda:N.
    # Not part of a search's key: a search resumes wherever it runs.
    device: str = "auto"

    @property
    def searched(self) -> list[str]:
        """Names of the parameters with a distribution (the rest are constants)."""
        return [name for name, entry in self.entries.items() if isinstance(entry, dict)]

    def to_tune(self) -> dict[str, Any]:
        """The `param_space` for a Tuner: ray.tune domains for searched parameters, constants as they are."""
        return {name: _to_domain(entry) if isinstance(entry, dict) else entry
                for name, entry in self.entries.items()}

    def depth_bounds(self) -> tuple[str, float, float]:
        """("layers" or "keep", smallest value, largest value) the space can produce."""
        key = next(k for k in DEPTH_KEYS if k in self.entries)
        entry = self.entries[key]
        if not isinstance(entry, dict):
            return key, entry, entry
        values = entry.get("values") or [entry["low"], entry["high"] - (key == "layers")]
        return key, min(values), max(values)


def load_space(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SearchSpace:
    """Read and check a search-space YAML, after applying `section.key=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search space {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping with teacher, protocol and space")
    for item in overrides:
        _apply_override(raw, item, path)
    unknown = sorted(set(raw) - {"teacher", "protocol", "space", "device"})
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; known: teacher, protocol, space, device")
    teacher = _typed(TeacherSpec, raw.get("teacher") or {}, f"{path}: teacher")
    _check_llm(teacher.llm, f"{path}: teacher.llm")
    protocol = _typed(Protocol, raw.get("protocol") or {}, f"{path}: protocol")
    entries = check_entries(raw.get("space"), f"{path}: space")
    from layerwise.device import check_device

    return SearchSpace(str(path), teacher, protocol, entries, check_device(raw.get("device")))


def check_entries(space: Any, where: str) -> dict[str, Any]:
    """Validate the `space` section; returns name -> constant or normalised distribution dict."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"{where}: must be a non-empty mapping of parameters")
    unknown = sorted(set(space) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {unknown}; known: {sorted(PARAMETERS)}")
    depth = [k for k in DEPTH_KEYS if k in space]
    if len(depth) != 1:
        raise ValueError(f"{where}: give exactly one of 'layers' (a count) or 'keep' (a fraction), got {depth}")
    missing = [k for k in REQUIRED if k not in space]
    if missing:
        raise ValueError(f"{where}: missing parameter(s) {missing}")
    entries = {name: _check_entry(name, value, f"{where}.{name}") for name, value in space.items()}
    if not any(isinstance(e, dict) for e in entries.values()):
        raise ValueError(f"{where}: every parameter is a constant; give at least one a distribution")
    return entries


def _check_entry(name: str, value: Any, where: str) -> Any:
    param = PARAMETERS[name]
    if not isinstance(value, dict):
        return _check_value(param, value, where)
    kind = value.get("distribution")
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; choose from {sorted(DISTRIBUTIONS)}")
    fields, kinds = DISTRIBUTIONS[kind]
    given = set(value) - {"distribution"}
    if set(fields) - given:
        raise ValueError(f"{where}: {kind} needs {sorted(set(fields) - given)}")
    if given - set(fields):
        raise ValueError(f"{where}: {kind} takes only {list(fields)}, not {sorted(given - set(fields))}")
    if param.kind not in kinds:
        fits = [d for d, (_, ks) in DISTRIBUTIONS.items() if param.kind in ks]
        raise ValueError(f"{where}: {name} is {param.kind.__name__}; {kind} cannot sample it, use one of {fits}")
    if kind == "choice":
        return {"distribution": kind, "values": _check_choice(param, value["values"], where)}
    return _check_range(param, kind, value, where)


def _check_choice(param: Param, values: Any, where: str) -> list:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}.values: must be a non-empty list")
    checked = [_check_value(param, v, f"{where}.values[{i}]") for i, v in enumerate(values)]
    if len({repr(v) for v in checked}) != len(checked):
        raise ValueError(f"{where}.values: has duplicates {values}")
    return checked


def _check_range(param: Param, kind: str, value: dict, where: str) -> dict:
    out = {"distribution": kind}
    for key in DISTRIBUTIONS[kind][0]:
        out[key] = _number(param.kind, value[key], f"{where}.{key}")
    low, high = out["low"], out["high"]
    if low >= high:
        raise ValueError(f"{where}: low ({low}) must be < high ({high})")
    if kind in ("loguniform", "lograndint") and low <= 0:
        raise ValueError(f"{where}: {kind} needs low > 0, got {low}")
    if kind == "quniform":
        steps = (high - low) / out["q"]
        if out["q"] <= 0 or not math.isclose(steps, round(steps), abs_tol=1e-9):
            raise ValueError(f"{where}: q ({out['q']}) must be > 0 and divide high - low ({high - low})")
    # The largest value a sample can take: randint and lograndint exclude `high`.
    top = high - 1 if kind in ("randint", "lograndint") else high
    for bound, label in ((low, "low"), (top, "high")):
        if not param.check(bound):
            raise ValueError(f"{where}.{label}: {bound} is out of range: {where.rsplit('.', 1)[-1]} must be "
                             f"{param.rule}")
    return out


def _check_value(param: Param, value: Any, where: str) -> Any:
    if value is None:
        if param.nullable:
            return None
        raise ValueError(f"{where}: may not be null")
    value = _number(param.kind, value, where) if param.kind in (int, float) else value
    if param.kind is str and not isinstance(value, str):
        raise ValueError(f"{where}: must be a string, got {value!r}")
    if not param.check(value):
        raise ValueError(f"{where}: {value!r} is out of range: must be {param.rule}")
    return value


def _number(kind: type, value: Any, where: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
        raise ValueError(f"{where}: must be {kind.__name__}, got {value!r}{hint}")
    if kind is int and not isinstance(value, int):
        raise ValueError(f"{where}: must be int, got {value!r}")
    return kind(value)


def _to_domain(entry: dict):
    from ray import tune

    kind = entry["distribution"]
    if kind == "choice":
        return tune.choice(entry["values"])
    args = [entry[k] for k in DISTRIBUTIONS[kind][0]]
    return getattr(tune, kind)(*args)


def _check_llm(llm: dict | None, where: str) -> None:
    from layerwise.models.llm import LLMSetup

    try:
        LLMSetup(**(llm or {}))
    except TypeError as err:
        names = [f.name for f in dataclasses.fields(LLMSetup)]
        raise ValueError(f"{where}: {err}; known keys: {names}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _typed(cls, raw: Any, where: str):
    """A flat frozen dataclass from a mapping: unknown keys and wrong types name the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {names}")
    values = {}
    for key, value in raw.items():
        kinds = [a for a in typing.get_args(hints[key]) if a is not type(None)] or [hints[key]]
        if value is None and type(None) in typing.get_args(hints[key]):
            values[key] = None
        elif kinds[0] in (int, float):
            values[key] = _number(kinds[0], value, f"{where}.{key}")
        elif not isinstance(value, kinds[0]):
            raise ValueError(f"{where}.{key}: must be {kinds[0].__name__}, got {value!r}")
        else:
            values[key] = value
    return cls(**values)


def _apply_override(raw: dict, item: str, path: Path) -> None:
    """`teacher.preset=tiny`, `space.lr=0.001` (a constant), `space.lr.high=0.01` (one field)."""
    key, sep, text = item.partition("=")
    keys = key.split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise ValueError(f"override {item!r} is not section.key=value (e.g. teacher.preset=tiny)")
    node = raw
    for part in keys[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{path}: override {item!r} goes through {part!r}, which is not a mapping")
    node[keys[-1]] = yaml.safe_load(text)
