"""The main job: data -> teacher -> sharded importance -> selection -> compact -> heal -> evaluate -> bench.

Smallest CPU run (tiny synthetic data and a tiny model, about a minute):
    layerwise run data.dataset=synthetic:300:60:6000:0 teacher.preset=tiny teacher.train.epochs=4

Every stage writes its outputs under runs/<name>/<stage>-<hash>/ (orchestration.pipeline.stages), where
the hash covers exactly the configuration that determines them. A stage whose outputs exist is skipped, so
an interrupted run resumes where it stopped and a changed setting re-runs only what it affects. The stages
themselves are in orchestration.pipeline.steps.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestration.outputs import write_json
from orchestration.pipeline.config import PipelineConfig, device_key, stage_hash
from orchestration.pipeline.stages import Stages, tree_cpu_seconds


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the headline figures."""
    from orchestration.pipeline import steps

    started, cpu = time.perf_counter(), tree_cpu_seconds()
    root = Path(config.run_dir).resolve() / config.name
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "config.json", asdict(config))
    with steps.pipeline_context(config, root) as ctx:
        stages = Stages(root, on_done=ctx.log_stage)
        loading = time.perf_counter()
        data = steps.load_data(config)
        data_seconds = time.perf_counter() - loading
        data_key = stage_hash(config.data, data.fingerprint)
        teacher_key = stage_hash(data_key, config.teacher, config.seed, config.threads, *device_key(config.device))
        teacher_dir = stages.run("teacher", teacher_key, lambda out: steps.train_teacher(ctx, data, out))
        base_key = stage_hash(teacher_key, "evaluate")
        base_dir = stages.run("evaluate-teacher", base_key,
                              lambda out: steps.evaluate_models(ctx, data, {"teacher": teacher_dir}, out,
                                                                with_mostpop=True))
        # What the stage computes follows the selector (steps.importance_evaluations); a stage that made all
        # of it, as every one did before, keeps its key.
        evaluations = steps.importance_evaluations(config.compress.selector, config.compress.method)
        imp_key = stage_hash(teacher_key, config.compress.calib_batches, config.compress.calib_batch_size,
                             config.ray.shards, *([] if evaluations == steps.EVALUATIONS else [evaluations]))
        imp_dir = stages.run("importance", imp_key,
                             lambda out: steps.importance(ctx, data, teacher_dir, out))
        comp_key = stage_hash(imp_key, config.compress)
        comp_dir = stages.run("compact", comp_key,
                              lambda out: steps.compress(ctx, data, teacher_dir, imp_dir, out))
        eval_key = stage_hash(comp_key, "evaluate")
        eval_dir = stages.run("evaluate-compact", eval_key,
                              lambda out: steps.evaluate_models(ctx, data, {"compact": comp_dir / "model"},
                                                                out, with_mostpop=False))
        bench_key = stage_hash(comp_key, config.bench)
        bench_dir = stages.run("bench", bench_key,
                               lambda out: steps.bench(ctx, teacher_dir, comp_dir / "model", out))
        headline = steps.headline(ctx, teacher_dir, base_dir, eval_dir, bench_dir, comp_dir)
        # Before Ray shuts down: its workers' CPU time counts only while they live.
        headline["time"] = run_time(stages, data_seconds, time.perf_counter() - started, tree_cpu_seconds() - cpu)
    print_run_time(headline["time"])
    write_json(root / "headline.json", headline)
    return headline


def run_time(stages: Stages, data_seconds: float, seconds: float, cpu_seconds: float) -> dict:
    """Where this run's time went: loading the data, each stage (wall, CPU, load average; a skipped one
    with the time it took when it ran), and the rest (Ray start, MLflow logging and registry, headline)."""
    ran = sum(stages.timings[name]["seconds"] for name in stages.ran)
    ran_cpu = sum(stages.timings[name].get("cpu_seconds", 0.0) for name in stages.ran)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "data_seconds": data_seconds,
            "other_seconds": seconds - ran - data_seconds, "other_cpu_seconds": cpu_seconds - ran_cpu,
            "stages": {name: {**t, "skipped": name in stages.skipped} for name, t in stages.timings.items()}}


def print_run_time(t: dict) -> None:
    parts = [f"{name} {s['seconds']:.0f}s" + (" (earlier run)" if s["skipped"] else "")
             for name, s in t["stages"].items()]
    print(f"time: {t['seconds']:.0f} s wall, {t['cpu_seconds']:.0f} s CPU; data {t['data_seconds']:.0f}s, "
          + ", ".join(parts) + f"; Ray start, MLflow and headline {t['other_seconds']:.0f}s")
