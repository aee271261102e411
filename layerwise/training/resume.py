"""Resumable training: the whole state of a training run after an epoch, saved so that a killed run goes on
from there and ends exactly as an uninterrupted one would.

    state = TrainingState.load(directory, model, optimizer, generator, config)   # None: start afresh
    ...
    TrainingState(epoch, steps, stale, elapsed, result, best).save(directory, model, optimizer, generator, config)

A run of an LLM teacher takes an hour or more on a small machine, longer than a working session may last;
a study's teacher stage then resumes mid-training instead of starting again. What is saved:

- the trainable parameters and the buffers (`trainable.safetensors`): frozen weights (a pretrained LLM's
  layers under LoRA) are rebuilt the same way by the caller, not copied;
- the best epoch's values of the same tensors (`best.safetensors`), for the weights training returns;
- the optimizer's state (`optimizer.pt`, read back with `torch.load(weights_only=True)`: tensors and
  numbers only);
- the data-order generator's and torch's global RNG states (`rng.safetensors`: dropout draws from the
  latter), so that the next epoch sees the same batches and masks;
- the epoch, the schedule's step count, the early-stopping count, the wall time so far, the history and
  the best validation metrics, with the run's config (`progress.json`); a checkpoint of another config is
  refused, naming the keys that differ (all but the wall-clock safety cap, which a resume may raise).

Each epoch is written to `epoch-N.tmp/` and renamed to `epoch-N/` when complete, then older ones are removed,
so a run killed while writing leaves the previous epoch's checkpoint intact.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_PREFIX = "epoch-"
_MAY_DIFFER = ("max_minutes",)  # a safety cap, not part of what the run computes


def saved_names(model: torch.nn.Module) -> list[str]:
    """The state-dict entries a checkpoint holds: trainable parameters and buffers (frozen weights are not)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return [name for name in model.state_dict() if name in trainable or name in buffers]


@dataclass
class TrainingState:
    """Where a training run stands after `epoch` (see the module docstring)."""

    epoch: int
    steps: int
    stale: int
    elapsed: float
    result: dict[str, Any]  # best_epoch, best_valid, history
    best: dict[str, torch.Tensor] | None = None  # the best epoch's saved entries (None: no validation yet)
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, config: dict[str, Any]) -> Path:
        """Write this state as `directory/epoch-N/` (atomically) and remove older epochs."""
        directory = Path(directory)
        final = directory / f"{_PREFIX}{self.epoch}"
        tmp = directory / f"{_PREFIX}{self.epoch}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = model.state_dict()
        save_file({n: state[n].detach().contiguous().clone() for n in saved_names(model)},
                  str(tmp / "trainable.safetensors"))
        if self.best is not None:
            save_file({n: t.detach().contiguous().clone() for n, t in self.best.items()},
                      str(tmp / "best.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({"generator": generator.get_state(), "torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({
            "epoch": self.epoch, "steps": self.steps, "stale": self.stale, "elapsed": self.elapsed,
            "result": self.result, "extra": self.extra, "config": config}, indent=1, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _epochs(directory):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, config: dict[str, Any]) -> "TrainingState | None":
        """Restore the latest complete epoch into `model`, `optimizer`, `generator` and torch's RNG; None if
        `directory` holds none. Raises ValueError if it was written for another config or model."""
        found = _epochs(Path(directory))
        if not found:
            return None
        path = found[-1]
        progress = json.loads((path / "progress.json").read_text())
        saved = json.loads(json.dumps(config, default=str))
        keys = sorted(k for k in set(saved) | set(progress["config"])
                      if k not in _MAY_DIFFER and saved.get(k) != progress["config"].get(k))
        if keys:
            raise ValueError(f"checkpoint {path} was written by a run with another config (differs in {keys}); "
                             "remove it to start again, or resume with the same config")
        tensors = load_file(str(path / "trainable.safetensors"))
        expected = set(saved_names(model))
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
            raise ValueError(f"checkpoint {path} does not fit this model (missing {missing}, unexpected {extra})")
        model.load_state_dict(tensors, strict=False)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        rng = load_file(str(path / "rng.safetensors"))
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        best = load_file(str(path / "best.safetensors")) if (path / "best.safetensors").exists() else None
        return cls(epoch=progress["epoch"], steps=progress["steps"], stale=progress["stale"],
                   elapsed=progress["elapsed"], result=progress["result"], best=best, extra=progress["extra"])


_STAGE_CHECKPOINTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("stage_checkpoints", default=None)


@contextlib.contextmanager
def stage_checkpoints(directory: str | Path):
    """A stage's training checkpoints. Every `layerwise.compression.distill.heal` call inside without its own
    `checkpoint`, and every trained student baseline (scratch, truncated: layerwise.baselines.students), keeps
    its state in `directory`/heal-N (N counting the calls in order); a finished healing keeps its result
    there too. The directory is removed when the block ends without an error. A stage of several healings
    (a baseline's draws) stopped midway and run again the same way (a stage's code is deterministic) takes
    each finished healing's result as it was and resumes the unfinished one from its last epoch."""
    directory = Path(directory)
    token = _STAGE_CHECKPOINTS.set([directory, 0])
    try:
        yield directory
    finally:
        _STAGE_CHECKPOINTS.reset(token)
    shutil.rmtree(directory, ignore_errors=True)  # reached only when the block raised nothing


def next_stage_checkpoint() -> Path | None:
    """The next training's checkpoint in the enclosing `stage_checkpoints` block, if any (counted per call)."""
    found = _STAGE_CHECKPOINTS.get()
    if found is None:
        return None
    found[1] += 1
    return found[0] / f"heal-{found[1]}"


def in_stage_checkpoints() -> bool:
    """Whether a `stage_checkpoints` block encloses the caller."""
    return _STAGE_CHECKPOINTS.get() is not None


def saved_progress(directory: str | Path) -> dict[str, Any] | None:
    """The latest complete epoch's progress.json in a run's checkpoint `directory` (epoch, elapsed seconds,
    best validation, history, extra), read without loading a model; None if it holds none."""
    found = _epochs(Path(directory))
    return json.loads((found[-1] / "progress.json").read_text()) if found else None


def remove(directory: str | Path) -> None:
    """Delete a run's checkpoints (after it ended: its model is the output)."""
    shutil.rmtree(directory, ignore_errors=True)


def _epochs(directory: Path) -> list[Path]:
    """Complete epoch checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    done = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
            and p.name[len(_PREFIX):].isdigit() and (p / "progress.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))
