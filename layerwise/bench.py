"""Honest speed and memory benchmarks: interleaved timing, a measured non-layer fraction, the Amdahl bound.

The project we replace reported as "speedup" the gap between two calls to one unchanged model. Here all
models run in one process, one thread count, `torch.inference_mode()`, on identical seeded inputs, in
interleaved rounds whose order rotates (A B C, B C A, ...) so drift hits all alike. A speedup is a ratio
of medians with a paired bootstrap 95% CI (whole rounds resampled).

f is measured, not assumed: a deep copy of the reference with an empty layer list and a layer count of 0
(llama, qwen3, gpt2, bert and t5 all run so) is timed in the same rounds; f = median(0-layer) /
median(reference). T5 computes its position bias inside block 0, so that cost counts as layer time.
Keeping k of L layers, speedup <= 1 / (f + (1 - f) k / L); efficiency = speedup / bound. Bridges are
extra work outside the teacher's layers, so they count against a compact model's efficiency.

Wall time is the measure; process CPU time per call is recorded beside it (`cpu`), because on a shared
machine long calls are preempted more than short ones, which inflates wall-clock speedups past the bound
(CPU time is immune to that with one torch thread; with more it also counts OpenMP spin-waiting).
CPU RSS is process-wide, so peak memory is measured per saved model in a fresh subprocess
(`layerwise.memory.peak_memory`); in-memory models on CPU are reported "not measured" rather than given a
number. Parameter bytes and FLOPs are counted, not timed (`layerwise.cost`). The `layerwise bench` command
wraps `bench_dirs`.
"""

from __future__ import annotations

import copy
import gc
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import transformers

from layerwise.cost import FLOPS_NOTE, forward_flops, make_histories, parameter_bytes
from layerwise.memory import peak_memory
from layerwise.models.recommender import SequentialRecommender

_MB = 2**20
TIMING_NOTE = ("time.perf_counter_ns (wall) and time.process_time_ns (cpu) around each score() call; "
               "rounds interleaved, order rotated by one model per round; GC off while timing")


def interleaved_schedule(names: list[str], rounds: int) -> list[list[str]]:
    """Call order per round: every model once, the order rotated by one each round, so none always leads."""
    n = len(names)
    return [names[r % n:] + names[: r % n] for r in range(rounds)]


def zero_layer_variant(model: SequentialRecommender) -> SequentialRecommender:
    """A deep copy of `model` with an empty layer list: everything the model does outside its layers."""
    zero = copy.deepcopy(model)
    family, config = zero.family, zero.backbone.config
    parent_path, _, attr = family.layer_path.rpartition(".")
    parent = zero.backbone
    for name in filter(None, parent_path.split(".")):
        parent = getattr(parent, name)
    setattr(parent, attr, nn.ModuleList())
    setattr(config, family.count_key, 0)
    # Per-layer config fields must shrink with the layers (as Family.keep_layers does).
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = []
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = 0
    zero.bridges = nn.ModuleDict()  # their hooks sat on the removed layers
    return zero


def ratio_ci(numerator: np.ndarray, denominator: np.ndarray, seed: int, n_boot: int = 2000) -> tuple[float, float]:
    """Paired bootstrap 95% CI of median(numerator) / median(denominator); both (runs,), same rounds."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(numerator), size=(n_boot, len(numerator)))
    ratios = np.median(numerator[idx], axis=1) / np.median(denominator[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _stats(ns: np.ndarray, batch_size: int) -> dict:
    ms = ns / 1e6
    median = float(np.median(ms))
    return {"median_ms": median, "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "users_per_s": batch_size / (median / 1e3), "runs": len(ms)}


def _time_rounds(models: dict[str, nn.Module], histories: torch.Tensor, runs: int,
                 warmup: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Wall and process-CPU ns per `score` call, (runs,) per model; warm-up rounds interleave too, untimed."""
    sync = torch.cuda.synchronize if histories.is_cuda else (lambda: None)
    wall, cpu = {name: [] for name in models}, {name: [] for name in models}
    gc.collect()
    gc_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside one call would charge it to whichever model ran
    try:
        for r, order in enumerate(interleaved_schedule(list(models), warmup + runs)):
            for name in order:
                sync()
                cpu_start, start = time.process_time_ns(), time.perf_counter_ns()
                models[name].score(histories)
                sync()
                if r >= warmup:
                    wall[name].append(time.perf_counter_ns() - start)
                    cpu[name].append(time.process_time_ns() - cpu_start)
    finally:
        if gc_enabled:
            gc.enable()
    return tuple({n: np.asarray(v, dtype=np.float64) for n, v in d.items()} for d in (wall, cpu))


def _check_models(models: dict[str, SequentialRecommender], reference: str | None) -> tuple[int, torch.device]:
    if not models:
        raise ValueError("benchmark needs at least one model")
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {sorted(models)}")
    catalogues = {name: m.n_items for name, m in models.items()}
    if len(set(catalogues.values())) != 1:
        raise ValueError(f"models score different catalogues, so their inputs cannot be identical: {catalogues}")
    devices = {name: m.item_embedding.weight.device for name, m in models.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"models sit on different devices: {devices}")
    return next(iter(catalogues.values())), next(iter(devices.values()))


def _memory_in_process(model: SequentialRecommender, histories: torch.Tensor) -> dict:
    if not histories.is_cuda:
        return {"status": "not measured", "reason": "CPU RSS is process-wide and this model has no directory; "
                "save it and use peak_memory(model_dir, ...) for a fresh-subprocess peak"}
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model.score(histories)
    torch.cuda.synchronize()
    # Other models' weights are resident in the same process; only this model's increase is its own.
    extra = torch.cuda.max_memory_allocated() - resident
    return {"status": "measured", "method": "torch.cuda.max_memory_allocated",
            "inference_extra_bytes": extra, "peak_bytes": parameter_bytes(model) + extra}


def _environment(device: torch.device) -> dict:
    return {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "device": str(device), "cpu_count": os.cpu_count(), "load_avg_start": list(os.getloadavg()),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _compare(samples: dict[str, np.ndarray], name: str, reference: str, zero: str, k: int, big_l: int,
             seed: int) -> dict:
    """Speedup vs the reference (ratio of medians, paired CI), f, the Amdahl bound and efficiency."""
    ref, own = samples[reference], samples[name]
    speedup = float(np.median(ref) / np.median(own))
    f = float(np.median(samples[zero]) / np.median(ref))
    bound = 1.0 / (f + (1.0 - f) * k / big_l)
    return {"speedup": speedup, "speedup_ci95": list(ratio_ci(ref, own, seed)), "bound": bound,
            "efficiency": speedup / bound}


def _entry(models: dict, name: str, wall: dict, cpu: dict, histories: torch.Tensor, reference: str | None,
           zero: str | None, seed: int) -> dict:
    """Everything measured for one model at one batch size."""
    model, (batch, max_len) = models[name], histories.shape
    entry = {**_stats(wall[name], batch), "flops": forward_flops(model, batch, max_len),
             "memory": _memory_in_process(model, histories),
             "cpu": {"median_ms": float(np.median(cpu[name]) / 1e6)}}
    if zero:
        layers = (model.n_layers, models[reference].n_layers)
        entry.update(_compare(wall, name, reference, zero, *layers, seed))
        entry["cpu"].update(_compare(cpu, name, reference, zero, *layers, seed))
    return entry


def _nonlayer(wall: dict, cpu: dict, reference: str, zero: str, seed: int) -> dict:
    return {"median_ms": float(np.median(wall[zero]) / 1e6),
            "f": float(np.median(wall[zero]) / np.median(wall[reference])),
            "f_ci95": list(ratio_ci(wall[zero], wall[reference], seed)),
            "cpu_f": float(np.median(cpu[zero]) / np.median(cpu[reference]))}


def benchmark(models: dict[str, SequentialRecommender], batch_sizes=(1, 64), runs: int = 30, warmup: int = 5,
              max_len: int = 50, seed: int = 0, reference: str | None = None) -> dict:
    """Time `models` interleaved on identical inputs; a JSON-able result (see the module docstring).

    Args:
        models: name -> recommender; same catalogue and device. Each is in eval mode for the run.
        batch_sizes: users per `score` call; histories are (batch, max_len) seeded random items.
        runs: timed rounds (every model once per round); warmup: untimed rounds before them.
        reference: the teacher's name; with it, speedups, f (from its 0-layer copy), bounds, efficiencies.

    Returns:
        {"env", "settings", "models": {name: {"n_layers", "param_bytes", "layer_param_bytes",
         "batches": {str(batch): {"median_ms", "p95_ms", "mean_ms", "std_ms", "users_per_s", "runs",
         "speedup", "speedup_ci95", "bound", "efficiency", "cpu", "flops", "memory"}}}},
         "nonlayer": {str(batch): {"median_ms", "f", "f_ci95", "cpu_f"}} or None without a reference}.
    """
    n_items, device = _check_models(models, reference)
    timed, zero = dict(models), None
    if reference is not None:
        zero = f"{reference} [0 layers]"
        timed[zero] = zero_layer_variant(models[reference])
    training = {name: m.training for name, m in models.items()}
    result = {"env": _environment(device), "nonlayer": {} if zero else None, "models": {
        name: {"n_layers": m.n_layers, "param_bytes": parameter_bytes(m),
               "layer_param_bytes": parameter_bytes(m.layers), "batches": {}} for name, m in models.items()},
        "settings": {"batch_sizes": list(batch_sizes), "runs": runs, "warmup": warmup, "max_len": max_len,
                     "seed": seed, "reference": reference, "n_items": n_items, "flops": FLOPS_NOTE,
                     "timing": TIMING_NOTE}}
    try:
        for m in timed.values():
            m.eval()
        with torch.inference_mode():
            for b, batch in enumerate(batch_sizes):
                histories = make_histories(batch, max_len, n_items, seed).to(device)
                wall, cpu = _time_rounds(timed, histories, runs, warmup)
                for i, name in enumerate(models):
                    result["models"][name]["batches"][str(batch)] = _entry(
                        models, name, wall, cpu, histories, reference, zero, seed + 1000 * b + i)
                if zero:
                    result["nonlayer"][str(batch)] = _nonlayer(wall, cpu, reference, zero, seed + 1000 * b + 999)
    finally:
        for name, m in models.items():
            m.train(training[name])
    result["env"]["load_avg_end"] = list(os.getloadavg())
    return result


def _unique_names(model_dirs: list[str]) -> list[str]:
    names: list[str] = []
    for d in model_dirs:
        path = Path(d).resolve()
        name = path.name if path.name not in names else f"{path.parent.name}/{path.name}"
        base, i = name, 2
        while name in names:
            name, i = f"{base}#{i}", i + 1
        names.append(name)
    return names


def bench_dirs(model_dirs: list[str], batch_sizes=(1, 64), runs: int = 30, warmup: int = 5,
               reference_index: int = 0, max_len: int = 50, seed: int = 0) -> dict:
    """Load saved models, `benchmark` them against model_dirs[reference_index], add subprocess peaks."""
    from layerwise.compact import load_compact

    names = _unique_names(model_dirs)
    models = {name: load_compact(d) for name, d in zip(names, model_dirs)}
    result = benchmark(models, batch_sizes, runs, warmup, max_len=max_len, seed=seed,
                       reference=names[reference_index])
    for name, d in zip(names, model_dirs):
        result["models"][name]["dir"] = str(d)
        for batch in batch_sizes:
            result["models"][name]["batches"][str(batch)]["memory"] = peak_memory(d, batch, max_len, seed=seed)
    return result


def _memory_cell(memory: dict) -> str:
    if memory.get("status") != "measured":
        return "not measured"
    if "peak_over_baseline_bytes" in memory:
        return f"{memory['peak_over_baseline_bytes'] / _MB:.1f} (abs {memory['peak_rss_bytes'] / _MB:.0f})"
    return f"{memory['peak_bytes'] / _MB:.1f}"


def _row(name: str, model: dict, batch: str, e: dict) -> str:
    cells = [name, model["n_layers"], f"{model['param_bytes'] / _MB:.2f}", batch, f"{e['median_ms']:.3f}",
             f"{e['p95_ms']:.3f}", f"{e['std_ms']:.3f}", f"{e['users_per_s']:.0f}", "-", "-", "-", "-",
             f"{e['flops']['total'] / 1e9:.4f}", _memory_cell(e["memory"])]
    if "speedup" in e:
        (lo, hi), cpu = e["speedup_ci95"], e["cpu"]
        cells[8:12] = [f"{e['speedup']:.2f} [{lo:.2f}, {hi:.2f}]", f"{e['bound']:.2f}", f"{e['efficiency']:.2f}",
                       f"{cpu['speedup']:.2f} / {cpu['efficiency']:.2f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def format_table(result: dict) -> str:
    """Markdown table of a `benchmark` / `bench_dirs` result, one row per model and batch size."""
    env, settings = result["env"], result["settings"]
    header = ["model", "layers", "params MB", "batch", "median ms", "p95 ms", "std ms", "users/s",
              "speedup [95% CI]", "bound", "efficiency", "cpu-time speedup / eff", "GFLOPs", "peak MB over baseline"]
    lines = [f"Reference: {settings['reference']}; {env['torch_threads']} torch threads on {env['device']}; "
             f"{settings['runs']} interleaved runs after {settings['warmup']} warm-up; T = {settings['max_len']}; "
             f"load average {env['load_avg_start'][0]:.1f} on {env['cpu_count']} CPUs.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(name, model, batch, e) for name, model in result["models"].items()
              for batch, e in model["batches"].items()]
    if result.get("nonlayer"):
        parts = [f"batch {b}: f = {v['f']:.3f} [{v['f_ci95'][0]:.3f}, {v['f_ci95'][1]:.3f}] "
                 f"({v['median_ms']:.3f} ms; cpu-time f = {v['cpu_f']:.3f})" for b, v in result["nonlayer"].items()]
        lines += ["", "Non-layer fraction (0-layer copy of the reference): " + "; ".join(parts) + "."]
    return "\n".join(lines)
