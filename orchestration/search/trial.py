"""One trial of a search, run by Ray Tune in a worker: select k layers with the trial's selector and
estimator, build the compact model with rank-r bridges, heal it (in the trial, or on Ray Train + DeepSpeed),
then measure validation NDCG@10 retention and the speedup over the teacher in the same process
(interleaved rounds), save the model and report every searcher metric.

`orchestration.search.tuning` builds the search around `search_trial`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def search_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: select, build, heal, evaluate, benchmark, save, log; reports every searcher metric.

    config: the trial's parameters (orchestration.search.space.PARAMETERS); ctx: the search's fixed context.
    """
    import torch
    from ray import tune

    from orchestration import tracking

    torch.set_num_threads(ctx["threads"])
    trial_id = tune.get_context().get_trial_id()
    tracking.ensure_experiment(ctx["experiment"], ctx["tracking_uri"])
    with tracking.tracked_run(f"trial-{trial_id}", params=config, parent_run_id=ctx["parent_run_id"],
                              tags={"trial_id": trial_id, "stage": "tune-trial", "study": ctx["study"]}):
        metrics, bench = _measure_trial(config, ctx, trial_id)
        tracking.log_metrics(metrics)
        tracking.log_json(bench, "bench.json")
    tune.report(metrics)


def _measure_trial(config: dict, ctx: dict, trial_id: str) -> tuple[dict, dict]:
    from layerwise.perf.bench import benchmark
    from layerwise.compression.compact import load_compact, save_compact
    from layerwise.compression.compress import calibration_batches, select_layers
    from orchestration.distributed.ray_runtime import task_device
    from orchestration.distributed.specs import DataSpec

    started, p = time.perf_counter(), ctx["protocol"]
    data = DataSpec(**ctx["data"]).load()
    teacher = load_compact(ctx["teacher_dir"]).eval().to(task_device())  # the GPU share Tune gave it, if any
    batches = calibration_batches(teacher, data, p["calib_batches"], p["calib_batch_size"], ctx["max_len"],
                                  p["seed"])
    kept, _ = select_layers(teacher, data, _depth(config, teacher.n_layers), config["selector"],
                            config.get("method"), batches, seed=p["seed"])
    selected = time.perf_counter()
    model_dir = Path(ctx["run_dir"]) / "trials" / trial_id / "model"
    student, healed = _heal(config, ctx, teacher, data, kept, model_dir, trial_id)
    healed_at = time.perf_counter()
    valid = valid_ndcg(student, data, ctx["max_len"])
    bench = benchmark({"teacher": teacher, "compact": student}, batch_sizes=(p["bench_batch_size"],),
                      runs=p["bench_runs"], warmup=p["bench_warmup"], max_len=ctx["max_len"], seed=p["seed"],
                      reference="teacher")
    metrics = {
        "retention": valid / ctx["teacher_valid_ndcg"], **speed_metrics(bench, str(p["bench_batch_size"])),
        "valid_ndcg_at_10": valid, "n_layers": len(kept), "kept": ",".join(map(str, kept)),
        "heal_workers": healed,
        "param_ratio": bench["models"]["compact"]["param_bytes"] / bench["models"]["teacher"]["param_bytes"],
        "seconds_select": selected - started, "seconds_heal": healed_at - selected,
        "seconds_total": time.perf_counter() - started,
    }
    manifest = {"teacher": ctx["teacher_dir"], "dataset": ctx["data"]["name"], "max_len": ctx["max_len"],
                "data_fingerprint": data.fingerprint, "tune": {"trial_id": trial_id, "params": config,
                                                                "metrics": metrics}}
    save_compact(student, model_dir, manifest)
    return {**metrics, "model_dir": str(model_dir)}, bench


def speed_metrics(bench: dict, batch: str) -> dict:
    """The trial's speed figures from its benchmark. A disturbed timing (layerwise.perf.guard) reports
    NaN for every one of them: the searcher then records the trial as failed rather than chase a speedup
    that load made up, and the table prints "disturbed"."""
    entry, teacher = bench["models"]["compact"]["batches"][batch], bench["models"]["teacher"]["batches"][batch]
    figures = {"speedup": entry["speedup"], "latency_ms": entry["median_ms"],
               "speedup_ci_low": entry["speedup_ci95"][0], "speedup_ci_high": entry["speedup_ci95"][1],
               "efficiency": entry["efficiency"], "bound": entry["bound"], "teacher_latency_ms": teacher["median_ms"]}
    if entry["status"] == "disturbed":
        figures = dict.fromkeys(figures, math.nan)
    return {**figures, "speed_status": entry["status"], "speed_disturbed_because": "; ".join(entry["disturbed_because"])}


def _heal(config: dict, ctx: dict, teacher, data, kept: list[int], model_dir: Path, trial_id: str):
    """(healed student, healing processes: 0 = not healed, 1 = in this trial, n = n Ray Train workers)."""
    from layerwise.compression.compact import build_compact, load_compact
    from layerwise.compression.distill import heal

    heal_config = _heal_config(config, ctx)
    rank = config["bridge_rank"]
    if heal_config.trainable == "bridges" and rank == 0:
        return build_compact(teacher, kept, 0), 0  # nothing to train: the plain removal is the result
    if not ctx["distributed_heal"]:
        # Ray starts each worker with its own random torch state: unseeded bridges would differ per run.
        student = build_compact(teacher, kept, rank, seed=heal_config.seed)
        heal(student, teacher, data, heal_config, progress=False)
        return student.eval(), 1
    from orchestration.distributed.specs import DataSpec
    from orchestration.distributed.training import heal_distributed

    out = heal_distributed(DataSpec(**ctx["data"]), ctx["teacher_dir"], kept, rank, heal_config,
                           num_workers=ctx["workers"], zero_stage=ctx["zero_stage"],
                           storage_path=str(Path(ctx["run_dir"]) / "ray_train"), cpus_per_worker=0.5,
                           out_dir=str(model_dir.with_name("healed")), name=f"heal-{trial_id}-{time.time_ns()}")
    return load_compact(out["model_dir"]).eval(), int(out["world_size"])


def _heal_config(config: dict, ctx: dict):
    from layerwise.compression.distill import HealConfig

    names = {"heal_epochs": "epochs", "heal_batch_size": "batch_size"}
    fields = set(HealConfig.__dataclass_fields__)
    given = {names.get(k, k): v for k, v in config.items() if names.get(k, k) in fields}
    return replace(HealConfig(**given), max_len=ctx["max_len"], seed=ctx["protocol"]["seed"],
                   max_minutes=ctx["protocol"]["heal_max_minutes"])


def _depth(config: dict, n_layers: int) -> int:
    from layerwise.compression.compress import n_kept

    return int(config["layers"]) if "layers" in config else n_kept(float(config["keep"]), n_layers)


def valid_ndcg(model, data, max_len: int) -> float:
    """Validation NDCG@10 of `model` (full ranking, seen items excluded): what retention is a ratio of."""
    from layerwise.evaluation.evaluate import evaluate

    return evaluate(model.eval().score, data, stage="valid", exclude_seen=True, max_len=max_len).means["ndcg@10"]
