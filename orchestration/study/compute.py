"""A study's equal-compute view: what each student cost to make, in CPU minutes, and what it reached.

For ours the cost is its importance stage, then its healing (the teacher's outputs cached, then its epochs);
for scratch and truncated, their training. With the teacher's training charged to ours, the view says what a
user gains from compression who has no teacher yet; without, what one gains who already has it. Rendered by
layerwise.report.compute.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from layerwise.baselines.budget import history_curve
from layerwise.evaluation.stats import across_seeds
from layerwise.models.checkpoint import read_manifest
from orchestration.study.rows import METRIC, Rows


def equal_compute(table: Rows, seed_dirs: Mapping[int, Mapping[str, Path]],
                  names: Sequence[str] = ("ours", "scratch", "truncated")) -> dict | None:
    """What each student cost to make and what it reached: for ours (its importance stage, then its healing:
    the teacher's outputs cached, then its epochs), scratch and truncated, the CPU minutes of its own
    training and validation, the same with the teacher's training charged to ours, and the validation
    NDCG@10 after each epoch against the CPU minutes so far (per seed). None until a row records its curve
    (layerwise.baselines.budget.training_curve).

    CPU minutes, not wall minutes: a study's stages may run at other thread counts and beside other work
    (seed 0 of the SmolLM2 study healed ours at 2 threads and trained scratch at 1), and the CPU time of the
    stage's process neither halves with a second thread nor grows when other jobs take the cores. Exact where
    every epoch recorded it; for runs made before they did, the wall curve times its stage's CPU/wall ratio
    (_seconds.json: the stage's invocations on the machine that finished it), and `estimated` names them."""
    rows, curves, teacher, estimated = [], {}, [], []
    for seed in table.seeds:
        minutes, exact = _teacher_cpu_minutes(table.by_name["teacher"][seed][0], seed_dirs[seed])
        teacher.append(minutes)
        if not exact:
            estimated.append(f"teacher, seed {seed}")
    for name in names:
        if not table.complete(name) or any("curve" not in (table.by_name[name][s][0].get("training") or {})
                                           for s in table.seeds):
            continue
        own, per_seed = [], []
        for seed in table.seeds:
            row = table.by_name[name][seed][0]
            curve, start, exact = _cpu_curve(row["training"], _cpu_ratio(seed_dirs[seed], row.get("stage")))
            if name == "ours":
                importance, whole = _importance_cpu_minutes(seed_dirs[seed])
                start, exact = start + importance, exact and whole
            curve = [{**p, "minutes": start + p["minutes"]} for p in curve]
            own.append(curve[-1]["minutes"] if curve else start)
            per_seed.append(curve)
            if not exact:
                estimated.append(f"{name}, seed {seed}")
        charged = [m + (t if name == "ours" else 0.0) for m, t in zip(own, teacher)]
        rows.append({"name": name, "metric": across_seeds(table.seed_means(name)), "own_minutes": across_seeds(own),
                     "with_teacher_minutes": across_seeds(charged)})
        curves[name] = per_seed
    if not rows:
        return None
    return {"metric": METRIC, "seeds": table.seeds, "unit": "CPU minutes", "teacher_minutes": across_seeds(teacher),
            "rows": rows, "curves": curves, "estimated": estimated}


def _cpu_ratio(dirs: Mapping[str, Path], stage: str | None) -> float:
    """CPU seconds per wall second of a stage (its _seconds.json; 1.0 where it recorded none)."""
    path = dirs[stage] / "_seconds.json" if stage in dirs else None
    if path is None or not path.exists():
        return 1.0
    timing = json.loads(path.read_text())
    return timing["cpu_seconds"] / timing["seconds"] if timing.get("seconds") else 1.0


def _cpu_curve(training: Mapping, ratio: float) -> tuple[list[dict], float, bool]:
    """A row's curve as [{"epoch", "minutes" (CPU), "valid"}], its setup's CPU minutes, and whether both were
    recorded (else the wall minutes times `ratio`)."""
    curve = training["curve"]
    exact = all("cpu_minutes" in p for p in curve) and ("setup_cpu_minutes" in training
                                                         or not training.get("setup_minutes"))
    if exact:
        return ([{"epoch": p["epoch"], "minutes": p["cpu_minutes"], "valid": p["valid"]} for p in curve],
                training.get("setup_cpu_minutes", 0.0), True)
    return ([{"epoch": p["epoch"], "minutes": p["minutes"] * ratio, "valid": p["valid"]} for p in curve],
            training.get("setup_minutes", 0.0) * ratio, False)


def _importance_cpu_minutes(dirs: Mapping[str, Path]) -> tuple[float, bool]:
    """The importance stage's CPU minutes, and whether they are whole: the sum of its parts' (importance.json
    records each, in whichever invocation it was made), else its _seconds.json's, which times only the
    invocations on the machine that finished it (an estimate: parts made on another machine are left out)."""
    if "importance" not in dirs:
        return 0.0, False
    parts = json.loads((dirs["importance"] / "importance.json").read_text()).get("cpu_seconds") or {}
    if parts and all(v is not None for v in parts.values()):
        return sum(parts.values()) / 60, True
    path = dirs["importance"] / "_seconds.json"
    return (json.loads(path.read_text())["cpu_seconds"] / 60 if path.exists() else 0.0), False


def _teacher_cpu_minutes(row: Mapping, dirs: Mapping[str, Path]) -> tuple[float, bool]:
    """The teacher's training and validation CPU minutes, and whether every epoch recorded them: from its row's
    curve, or else from its saved model's training history (a teacher row written before rows recorded
    curves); else its wall minutes times its stage's CPU/wall ratio."""
    curve = (row.get("training") or {}).get("curve") or history_curve(
        read_manifest(dirs["teacher"] / "model").get("history") or [])
    if not curve:
        return 0.0, False
    if "cpu_minutes" in curve[-1]:
        return curve[-1]["cpu_minutes"], True
    return curve[-1]["minutes"] * _cpu_ratio(dirs, "teacher"), False
