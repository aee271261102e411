"""Every baseline under the same budget as our method, measured alike, in one table (`layerwise baselines`).

Smallest CPU run (tiny synthetic data; a couple of minutes):
    layerwise train --dataset synthetic:300:60:6000:0 --family llama --preset tiny --out /tmp/teacher
    layerwise baselines --teacher /tmp/teacher --dataset synthetic:300:60:6000:0 --keep 0.5 \
        --json /tmp/baselines.json --md /tmp/baselines.md --only first magnitude int8 --heal-epochs 1

For every method: NDCG@5/10/20, MRR, HR@10 and P@5 on the test split (full ranking, seen items
excluded), retention against the teacher, speedup at each batch size from ONE interleaved
`layerwise.perf.bench.benchmark` call with the teacher as reference, weight bytes (packed weights of quantized
models included), peak memory of saveable models in a fresh subprocess, and the training epochs used.
Our own method (beam selection, bridges, healing) is always run: it is the reference row, it sets the
parameter budget of the width and sparsity baselines, and `ours+int8` quantizes it.

Every model runs on `device` (the teacher is placed there, the rest follow it); INT8 and INT4 have CPU kernels
only, so on a GPU those rows are evaluated on the CPU and left out of the benchmark and the memory column.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from layerwise.baselines import Budget, Variant, is_quantized, ours, storage_bytes
from layerwise.baselines.budget import DRAWS, n_parameters
from layerwise.baselines.students import is_llm_build
from layerwise.device import device_scorer, resolve_device
from layerwise.perf.bench import benchmark
from layerwise.perf.guard import describe, speed_cell
from layerwise.compression.compress import n_kept
from layerwise.compression.distill import HealConfig
from layerwise.evaluation.evaluate import evaluate
from layerwise.perf.memory import peak_memories
from layerwise.models.checkpoint import read_manifest, save_recommender
from orchestration.baselines.method import methods, run_method, teacher_build, teacher_train_config
from orchestration.outputs import METRIC_COLUMNS, write_json

_MB = 2**20


def _test_metrics(variant: Variant, data, max_len: int) -> dict[str, float]:
    scorer = variant.model if variant.info.get("scorer") else device_scorer(variant.model)
    result = evaluate(scorer, data, stage="test", exclude_seen=True, ks=(5, 10, 20), max_len=max_len)
    return {m: result.means[m] for m in METRIC_COLUMNS}


def _row(method: str, members: list[tuple[Variant, dict]], teacher_metrics: dict) -> dict:
    """One table row: mean (and sample std over draws) of each metric, retention, training, details."""
    values = {m: np.array([metrics[m] for _, metrics in members]) for m in METRIC_COLUMNS}
    first = members[0][0]
    row = {"row": first.row, "method": method, "n": len(members), "timing": first.timing,
           "metrics": {m: float(v.mean()) for m, v in values.items()},
           "spread": {m: float(v.std(ddof=1)) for m, v in values.items()} if len(members) > 1 else None,
           "retention": {m: float(values[m].mean() / teacher_metrics[m]) if teacher_metrics[m] else None
                         for m in METRIC_COLUMNS},
           "n_layers": None if first.info.get("scorer") else first.model.n_layers,
           "weight_bytes": None if first.info.get("scorer") else storage_bytes(first.model),
           "training": [v.training for v, _ in members],
           "members": [{"metrics": metrics, "info": v.info} for v, metrics in members]}
    return row


def _rows(variants: dict[str, list[Variant]], data, max_len: int) -> list[dict]:
    teacher_metrics = _test_metrics(variants["teacher"][0], data, max_len)
    rows = []
    for method, members in variants.items():
        by_row: dict[str, list] = {}
        for v in members:
            metrics = teacher_metrics if method == "teacher" else _test_metrics(v, data, max_len)
            by_row.setdefault(v.row, []).append((v, metrics))
        rows += [_row(method, group, teacher_metrics) for group in by_row.values()]
    return rows


def _timed_models(variants: dict[str, list[Variant]], device: torch.device) -> dict:
    """One model per architecture (timing key): unhealed and healed, or draws, share their timing. On a GPU
    the quantized ones (CPU only) are left out: one benchmark times every model on one device."""
    models = {}
    for members in variants.values():
        for v in members:
            if v.timing and v.timing not in models and not (device.type != "cpu" and is_quantized(v.model)):
                models[v.timing] = v.model
    return models


def _memory(models: dict, teacher_dir: str, batch: int, max_len: int, device: str = "cpu") -> dict[str, dict]:
    """Peak inference memory per timed model in a fresh subprocess; quantized ones are not measured."""
    out, paths = {}, {}
    with tempfile.TemporaryDirectory(prefix="baselines-") as tmp:
        for name, model in models.items():
            if is_quantized(model):
                out[name] = {"status": "not measured", "reason": "quantized modules have no stock save format "
                             "here, and CPU RSS in this process is shared by every model"}
                continue
            paths[name] = teacher_dir if name == "teacher" else save_recommender(
                model, Path(tmp) / f"m{len(paths)}", {"kind": "baseline", "row": name})
        out.update(zip(paths, peak_memories([(p, batch) for p in paths.values()], max_len, device)))
    return {name: out[name] for name in models}


def _attach_speed(rows: list[dict], timing: dict, memory: dict) -> None:
    for row in rows:
        entry = timing["models"].get(row["timing"])
        row["speed"] = None if entry is None else {b: _speed(e) for b, e in entry["batches"].items()}
        row["memory"] = memory.get(row["timing"])


def _speed(e: dict) -> dict:
    """One row's speed at one batch size; a timing the guard found disturbed keeps its reasons, no figure
    (the raw timing stays in the result's "benchmark")."""
    if e.get("status") == "disturbed":
        return {"speedup": None, "ci95": None, "median_ms": None, "cpu_speedup": None, "status": "disturbed",
                "disturbed_because": e["disturbed_because"]}
    return {"speedup": e.get("speedup"), "ci95": e.get("speedup_ci95"), "median_ms": e["median_ms"],
            "cpu_speedup": e["cpu"].get("speedup"), "status": e.get("status", "ok"), "disturbed_because": []}


def _collect(teacher, data, budget: Budget, names: list[str], progress: bool
             ) -> tuple[dict[str, list[Variant]], Budget, dict[str, float]]:
    """Our method first (it fixes budget.removed), then every baseline; returns variants per method, the
    completed budget and the seconds each method took."""
    started = time.perf_counter()
    variants = {"teacher": [Variant("teacher", teacher, "teacher")],
                "ours": ours(data, teacher=teacher, budget=budget, progress=progress)}
    seconds = {"ours": time.perf_counter() - started}
    print(f"[baselines] ours: {seconds['ours']:.1f}s", file=sys.stderr)
    compact = variants["ours"][-1].model
    budget = replace(budget, removed=n_parameters(teacher) - n_parameters(compact))
    for name in names:
        started = time.perf_counter()
        variants[name] = run_method(name, data, teacher, budget, compact, progress)
        seconds[name] = time.perf_counter() - started
        print(f"[baselines] {name}: {seconds[name]:.1f}s", file=sys.stderr)
    return variants, budget, seconds


def run_baselines(teacher_dir: str | Path, data, keep: float = 0.25, heal_config: HealConfig = HealConfig(),
                  seeds: tuple[int, ...] = DRAWS, out_json: str | Path | None = None,
                  out_md: str | Path | None = None, which: list[str] | None = None, bridge_rank: int = 0,
                  batch_sizes: tuple[int, ...] = (1, 64), runs: int = 30, memory: bool = True,
                  progress: bool = True, device: str = "cpu") -> dict:
    """Run the teacher, our method and the chosen baselines under one budget; returns the table as a dict.

    Args:
        teacher_dir: saved teacher; data: the loaded data set (`layerwise.data.load_dataset`).
        keep: layers kept by ours and the depth baselines (fraction or count); heal_config: our healing
            recipe (its max_len is set to the teacher's); seeds: random-layer draws (seeds[0] seeds the rest).
        which: baseline names (default: all); memory: measure peak memory at the largest batch size.
        device: where the models run (a `layerwise.device` setting: auto, cpu, cuda, cuda:N).

    Returns:
        {"settings", "budget", "rows": [{"row", "method", "n", "metrics", "spread", "retention", "n_layers",
         "weight_bytes", "training", "speed", "memory", "members"}], "benchmark", "seconds"}.
    """
    from orchestration.loading import load_model_for

    device = resolve_device(device)
    teacher, manifest = load_model_for(str(teacher_dir), data, device).eval(), read_manifest(teacher_dir)
    max_len = manifest.get("max_len") or heal_config.max_len
    budget = Budget(k=n_kept(keep, teacher.n_layers), heal=replace(heal_config, max_len=max_len),
                    bridge_rank=bridge_rank, seeds=tuple(seeds), train=teacher_train_config(manifest),
                    build=teacher_build(manifest))
    variants, budget, seconds = _collect(teacher, data, budget, methods(which, is_llm_build(budget.build)),
                                         progress)
    rows = _rows(variants, data, max_len)
    timed = _timed_models(variants, device)
    timing = benchmark(timed, batch_sizes, runs=runs, max_len=max_len, reference="teacher")
    peaks = _memory(timed, str(teacher_dir), max(batch_sizes), max_len, str(device)) if memory else {}
    _attach_speed(rows, timing, peaks)
    result = {"settings": {"teacher": str(teacher_dir), "dataset": data.name, "device": str(device),
                           "keep": keep, "k": budget.k, "teacher_layers": teacher.n_layers, "max_len": max_len,
                           "batch_sizes": list(batch_sizes), "memory_batch": max(batch_sizes) if memory else None,
                           "eval": "test split, full ranking, seen items excluded"},
              "budget": {**dataclasses.asdict(budget), "teacher_parameters": n_parameters(teacher)},
              "rows": rows, "benchmark": timing, "seconds": seconds}
    if out_json:
        write_json(out_json, result)
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(format_markdown(result) + "\n")
    return result


def _cell(row: dict, metric: str) -> str:
    value = row["metrics"][metric]
    return f"{value:.4f}" if not row["spread"] else f"{value:.4f} ± {row['spread'][metric]:.4f}"


def _speed_cell(row: dict, batch: str) -> str:
    entry = (row.get("speed") or {}).get(batch)
    if entry and entry["speedup"] is None and entry["status"] != "disturbed":
        return "-"
    return speed_cell(entry, lambda e: f"{e['speedup']:.2f} [{e['ci95'][0]:.2f}, {e['ci95'][1]:.2f}]")


def _memory_cell(row: dict) -> str:
    memory = row.get("memory")
    if not memory or memory.get("status") != "measured":
        return "not measured"
    return f"{memory['peak_over_baseline_bytes'] / _MB:.1f}"


def _epochs_cell(row: dict) -> str:
    runs = [t for t in row["training"] if t]
    if not runs:
        return "0"
    run, best = np.mean([t["epochs_run"] for t in runs]), np.mean([t["best_epoch"] for t in runs])
    return f"{run:g}/{best:g}" + (" (train)" if runs[0]["kind"] == "train" else "")


def format_markdown(result: dict) -> str:
    """The table of `run_baselines` as Markdown, with the settings and what each number means."""
    settings, batches = result["settings"], [str(b) for b in result["settings"]["batch_sizes"]]
    header = ["method", "layers", "epochs run/best", *(m.upper() for m in METRIC_COLUMNS),
              "NDCG@10 retention", *(f"speedup b={b} [95% CI]" for b in batches), "weights MB",
              f"peak MB b={settings['memory_batch']}"]
    lines = [f"Teacher {settings['teacher']} ({settings['teacher_layers']} layers), data {settings['dataset']}, "
             f"k = {settings['k']} kept layers; {settings['eval']}; T = {settings['max_len']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        retention = row["retention"]["ndcg@10"]
        cells = [row["row"] + (f" (n={row['n']})" if row["n"] > 1 else ""), row["n_layers"] or "-",
                 _epochs_cell(row), *(_cell(row, m) for m in METRIC_COLUMNS),
                 f"{retention:.3f}" if retention is not None else "-", *(_speed_cell(row, b) for b in batches),
                 f"{row['weight_bytes'] / _MB:.3f}" if row["weight_bytes"] else "-", _memory_cell(row)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "n > 1: mean ± sample std over random draws. Speedups: ratio of median wall times against the "
              "teacher in one interleaved benchmark (paired bootstrap CI); unhealed and healed variants share "
              "an architecture and one timing. Magnitude pruning keeps dense kernels, so ~1x is its honest "
              "speedup. Weights MB counts packed int8/int4 weights and their scales. Peak MB: inference peak "
              "over the bare interpreter, fresh subprocess per saved model; quantized models are not measured.",
              "", describe(result["benchmark"].get("guard"))]
    return "\n".join(lines)

