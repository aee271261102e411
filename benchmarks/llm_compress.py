"""Compress the SmolLM2-135M teacher (30 layers) to k layers, heal it, and measure what it kept and gained.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/llm_compress.py --keep 8
    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/llm_compress.py --keep 4
    PYTHONPATH=. .venv/bin/python benchmarks/llm_compress.py --keep 2 --teacher DIR --smoke   # minutes

The teacher is benchmarks/llm_teachers.py's pretrained one. Steps, each written to --out as it finishes so
that a rerun resumes: the teacher's test metrics per user (float32); every local importance estimator on
calibration windows; the kept layers by `combined` (a weighted Borda count of the estimators, the weights
chosen on unhealed validation NDCG@10 of 512 users) and top-k; the compact model healed by distillation
with the teacher's states cached once (and the time per healing step with and without that cache,
measured on the same batches); the compact model's test metrics and retention with paired-bootstrap 95%
CIs; `layerwise bench` (interleaved latency at batch 1 and 64, the 0-layer copy for f, the Amdahl
bound, efficiency, parameter bytes, subprocess peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from layerwise.perf.bench import bench_dirs
from layerwise.perf.table import format_table
from layerwise.compression.compact import build_compact, load_compact, save_compact
from layerwise.compression.compress import calibration_batches
from layerwise.data import load_dataset
from layerwise.compression.distill import HealConfig, TeacherCache, _batch_loss, heal, teacher_targets, trainable_parameters
from layerwise.evaluation.evaluate import evaluate
from layerwise.compression.importance import LOCAL_METHODS, combined, compute_importance
from layerwise.evaluation.stats import ratio_ci
from layerwise.training.train import _validate, autocast_context, training_windows
from orchestration.outputs import write_json

METRICS = ("ndcg@5", "ndcg@10", "ndcg@20", "mrr", "hr@10")
HEAL = HealConfig(epochs=6, batch_size=64, lr=2e-4, trainable="all", prefit_steps=0, patience=2, eval_every=1,
                  max_len=50, seed=0, autocast="bf16", cache_teacher=True)  # by epochs: no clock


def once(path: Path, compute):
    """JSON at `path`, computed and written first if it is not there (the script's resume points)."""
    if not path.exists():
        write_json(path, compute())
    return json.loads(path.read_text())


def test_per_user(model, data) -> dict[str, list[float]]:
    result = evaluate(model.eval().score, data, stage="test", exclude_seen=True, max_len=50)
    return {m: [float(v) for v in result.per_user[m]] for m in METRICS}


def importance(teacher, batches) -> dict:
    tick = time.monotonic()
    scores = compute_importance(teacher, batches, LOCAL_METHODS)
    return {"scores": {m: v.tolist() for m, v in scores.items()}, "seconds": time.monotonic() - tick}


def selection(teacher, batches, data, k: int, scores: dict) -> dict:
    tick = time.monotonic()
    ranks = combined(teacher, batches, data, k, scores={m: torch.tensor(v) for m, v in scores.items()})
    choice = ranks.combination
    return {"kept": choice.kept, "weights": choice.weights, "valid_ndcg@10_512_users": choice.valid_ndcg,
            "candidates": len(choice.tried), "seconds": time.monotonic() - tick}


def cache_gain(teacher, student, data, config: HealConfig, n_batches: int = 3) -> dict:
    """Seconds per healing step (forward, loss, backward) with the teacher run per batch vs read from the
    cache, interleaved on the same batches; the cache's build time; the projected time per epoch."""
    inputs, targets = training_windows(data, config.max_len, True)
    tick = time.monotonic()
    cache = TeacherCache.build(teacher, inputs, targets, teacher_targets(teacher, student), config.batch_size,
                               config.autocast)
    build = time.monotonic() - tick
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(1))
    timings = {"per_batch_teacher": [], "cached": []}
    trainable_parameters(student, config)  # as healing sets them (a copy of a frozen teacher has none)
    student.train()
    for b in range(n_batches):
        idx = order[b * config.batch_size:(b + 1) * config.batch_size]
        for mode in ("per_batch_teacher", "cached"):
            tick = time.monotonic()
            with autocast_context(config.autocast):
                loss = _batch_loss(student, teacher, inputs[idx], targets[idx], config,
                                   cache.rows(idx) if mode == "cached" else None)
            loss.backward()
            timings[mode].append(time.monotonic() - tick)
            student.zero_grad(set_to_none=True)
    steps = -(-len(inputs) // config.batch_size)
    median = {mode: float(np.median(v)) for mode, v in timings.items()}
    return {"step_seconds": timings, "median_step_seconds": median, "cache_build_seconds": build,
            "projected_epoch_minutes": {m: v * steps / 60 for m, v in median.items()},
            "steps_per_epoch": steps, "load_avg": os.getloadavg()[0]}


def retention(teacher: dict, compact: dict) -> dict:
    out = {}
    for m in METRICS:
        t, c = np.asarray(teacher[m]), np.asarray(compact[m])
        out[m] = {"teacher": float(t.mean()), "compact": float(c.mean()), "retention": float(c.mean() / t.mean()),
                  "retention_ci95": list(ratio_ci(c, t, n_boot=2000, seed=0))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=int, required=True, help="layers kept (k of the teacher's 30)")
    parser.add_argument("--teacher", default="runs/llm_teachers/pretrained/model")
    parser.add_argument("--out", default="runs/llm_compress")
    parser.add_argument("--json", default="benchmarks/results/llm_compress.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench-runs", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="a short heal and benchmark: checks the script")
    parser.add_argument("--skip-bench", action="store_true",
                        help="stop after the test metrics (every step so far is deterministic and may share the "
                             "machine); rerun without it in a quiet window for the timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, k = Path(args.out), args.keep
    data = load_dataset("ml-100k", cache_dir="runs/data_cache")
    teacher = load_compact(args.teacher).eval().requires_grad_(False)
    config = HealConfig(**{**asdict(HEAL), **({"epochs": 1, "max_minutes": 1.0} if args.smoke else {})})
    teacher_test = once(out / "teacher_test.json", lambda: test_per_user(teacher, data))
    batches = calibration_batches(teacher, data, n_batches=4, batch_size=32, max_len=50, seed=0)
    scores = once(out / "importance.json", lambda: importance(teacher, batches))
    chosen = once(out / f"k{k}" / "selection.json", lambda: selection(teacher, batches, data, k, scores["scores"]))
    student = build_compact(teacher, chosen["kept"])
    gain = once(out / f"k{k}" / "cache_gain.json", lambda: cache_gain(teacher, student, data, config))

    def healed() -> dict:
        unhealed = _validate(student, data, 50, config.autocast)
        tick = time.monotonic()
        result = heal(student, teacher, data, config, progress=True)
        seconds = time.monotonic() - tick
        save_compact(student, out / f"k{k}" / "model", {"selector": "topk", "method": "combined",
                                                       "teacher": str(Path(args.teacher).resolve()),
                                                       "dataset": data.name, "data_fingerprint": data.fingerprint,
                                                       "max_len": 50,
                                                       "heal": asdict(config), "valid": result.best_valid})
        return {"unhealed_valid": unhealed, "best_valid": result.best_valid, "best_epoch": result.best_epoch,
                "history": result.history, "cache_seconds": result.cache_seconds, "heal_seconds": seconds,
                "config": asdict(config)}

    healing = once(out / f"k{k}" / "heal.json", healed)
    compact_test = once(out / f"k{k}" / "test.json",
                        lambda: test_per_user(load_compact(out / f"k{k}" / "model"), data))
    quality = retention(teacher_test, compact_test)
    q = quality["ndcg@10"]
    summary = (f"k={k}: kept {chosen['kept']}; NDCG@10 {q['teacher']:.4f} -> {q['compact']:.4f}, retention "
               f"{q['retention']:.1%} [{q['retention_ci95'][0]:.1%}, {q['retention_ci95'][1]:.1%}]")
    if args.skip_bench:
        print(summary + "; no benchmark yet")
        return
    bench = once(out / f"k{k}" / "bench.json", lambda: bench_dirs(
        [args.teacher, str(out / f"k{k}" / "model")], batch_sizes=(1, 64),
        runs=3 if args.smoke else args.bench_runs, warmup=1 if args.smoke else 5))
    print(format_table(bench))
    entry = {"k": k, "teacher_layers": teacher.n_layers, "kept": chosen["kept"], "selection": chosen,
             "importance_seconds": scores["seconds"], "quality": quality,
             "heal": {key: healing[key] for key in ("unhealed_valid", "best_valid", "best_epoch", "cache_seconds",
                                                   "heal_seconds", "config", "history")},
             "teacher_cache": gain, "bench": bench, "threads": args.threads, "smoke": args.smoke}
    path = Path(args.json if not args.smoke else args.json.replace(".json", "_smoke.json"))
    results = json.loads(path.read_text()) if path.exists() else {}
    results[f"k{k}"] = entry
    write_json(path, results)
    print(summary)


if __name__ == "__main__":
    main()
