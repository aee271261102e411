"""Honest speed and memory benchmarks: interleaved timing, a measured non-layer fraction, the Amdahl bound.

The project we replace reported as "speedup" the gap between two calls to one unchanged model. Here all
models run in one process, one thread count, `torch.inference_mode()`, on identical seeded inputs, in
interleaved rounds whose order rotates (A B C, B C A, ...) so drift hits all alike. A speedup is a ratio
of medians with a paired bootstrap 95% CI (whole rounds resampled).

f is measured, not assumed: a deep copy of the reference with an empty layer list and a layer count of 0
(llama, qwen3, gpt2, bert and t5 all run so) is timed in the same rounds; f = median(0-layer) /
median(reference). T5 computes its position bias inside block 0, so that cost counts as layer time.
Keeping k of L layers, speedup <= 1 / (f + (1 - f) k / L); efficiency = speedup / bound. Bridges are
extra work outside the teacher's layers, so they count against a compact model's efficiency. The bound
holds only for models whose layers are the reference's own size (`same_layers`); a quantized or
width-pruned model has none.

The bound assumes a layer costs the same in a k-layer model as in the L-layer one. That is a model, and on
a CPU at batch 1 it is off by a few percent: on an AMD EPYC (2 cores, SmolLM2's 30 layers, 2026-12-07)
every 8-layer model ran at 101-104% of it, the teacher's own 8 layers among them, on every attempt. So
each k a timed model has gets a measured ceiling too: a copy of the reference keeping its last k layers
(`kept_variant`), timed in the same rounds. Its speedup (`ceiling`, `ceiling_ci95`) is what the
reference's own layers reach at that depth; no model of those layers can beat it by more than noise.

Every speedup passes `layerwise.perf.guard`: a batch size whose figure is impossible (above its bound and
its measured ceiling, efficiency over 110%, a CI wider than the estimate) is timed again with more rounds, and one that stays so
is marked `"status": "disturbed"` and printed as "disturbed", never as a speedup.

Wall time is the measure; process CPU time per call is recorded beside it (`cpu`), because on a shared
machine long calls are preempted more than short ones, which inflates wall-clock speedups past the bound
(CPU time is immune to that with one torch thread; with more it also counts OpenMP spin-waiting).
CPU RSS is process-wide, so peak memory is measured per saved model in a fresh subprocess
(`layerwise.perf.memory.peak_memories`, side by side where the CPUs and memory allow); in-memory models on
CPU are reported "not measured" rather than given a number. Parameter bytes and FLOPs are counted, not timed
(`layerwise.perf.cost`). The `layerwise bench` command wraps `bench_dirs`; `layerwise.perf.table` renders a result.
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

from layerwise.perf.guard import REMEASURES, judge, remeasure, verdict
from layerwise.perf.cost import FLOPS_NOTE, forward_flops, make_histories, parameter_bytes
from layerwise.device import describe, inference_autocast, peak_bf16_flops, resolve_device
from layerwise.perf.memory import peak_memories
from layerwise.models.recommender import SequentialRecommender

TIMING_NOTE = ("time.perf_counter_ns (wall) and time.process_time_ns (cpu) around each score() call; "
               "rounds interleaved, order rotated by one model per round; GC off while timing")


def interleaved_schedule(names: list[str], rounds: int) -> list[list[str]]:
    """Call order per round: every model once, the order rotated by one each round, so none always leads."""
    n = len(names)
    return [names[r % n:] + names[: r % n] for r in range(rounds)]


def zero_layer_variant(model: SequentialRecommender) -> SequentialRecommender:
    """A deep copy of `model` with an empty layer list: everything the model does outside its layers. The
    layers are shared during the copy and then dropped, so a large model is not copied whole."""
    zero = copy.deepcopy(model, {id(layer): layer for layer in model.layers})
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


def kept_variant(model: SequentialRecommender, k: int) -> SequentialRecommender:
    """A copy of `model` keeping its last k layers (same weights, copied): the measured ceiling of any
    k-layer model built from its layers. Only the kept layers and the first are copied (T5's first block
    holds the position bias the kept ones read); the others are shared during the copy and then dropped, so
    a large reference is not copied whole, and the copy shares no tensor with it."""
    layers = model.layers
    if not 0 < k <= len(layers):
        raise ValueError(f"a kept copy needs 1 to {len(layers)} layers, got {k}")
    memo = {id(layer): layer for layer in list(layers)[1: len(layers) - k]}  # shared, then dropped
    kept = copy.deepcopy(model, memo)
    kept.family.keep_layers(kept.backbone, list(range(len(layers) - k, len(layers))))
    kept.bridges = nn.ModuleDict()
    return kept


def ceiling_name(reference: str, k: int) -> str:
    return f"{reference} [last {k} layers]"


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
            **describe(device), "cpu_count": os.cpu_count(), "load_avg_start": list(os.getloadavg()),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _compare(samples: dict[str, np.ndarray], name: str, reference: str, zero: str, k: int | None, big_l: int,
             seed: int) -> dict:
    """Speedup vs the reference (ratio of medians, paired CI), f, the Amdahl bound and efficiency.

    k is None for a model whose layers are not the reference's (quantized, width-pruned): no layer count
    bounds its speed, so bound, bound_high and efficiency are None. bound_high is the bound at the low end
    of f's 95% CI, the highest the data allow (the guard's test of "above the bound"). ceiling and
    ceiling_ci95 are the speedup of the reference's own k-layer copy in the same rounds, where one was timed
    (its CI's bootstrap seeded by k alone, so every model of that depth shows the same one).
    """
    ref, own = samples[reference], samples[name]
    speedup = float(np.median(ref) / np.median(own))
    out = {"speedup": speedup, "speedup_ci95": list(ratio_ci(ref, own, seed)), "bound": None,
           "bound_high": None, "efficiency": None, "ceiling": None, "ceiling_ci95": None}
    if k is not None:
        f = float(np.median(samples[zero]) / np.median(ref))
        f_low = ratio_ci(samples[zero], ref, seed + 1)[0]
        out["bound"], out["bound_high"] = amdahl_bound(f, k, big_l), amdahl_bound(f_low, k, big_l)
        out["efficiency"] = speedup / out["bound"]
        ceiling = samples.get(ceiling_name(reference, k))
        if ceiling is not None and k < big_l:
            out["ceiling"] = float(np.median(ref) / np.median(ceiling))
            out["ceiling_ci95"] = list(ratio_ci(ref, ceiling, k))
    return out


def amdahl_bound(f: float, k: int, big_l: int) -> float:
    """Highest speedup from keeping k of L layers when a fraction f of the time is outside them."""
    return 1.0 / (f + (1.0 - f) * k / big_l)


def same_layers(model: SequentialRecommender, reference: SequentialRecommender) -> bool:
    """Whether every layer of `model` has the size of a reference layer: then its time per layer is the
    reference's and the Amdahl bound holds (kept, scratch or distilled layers; not quantized or
    width-pruned ones, whose weights are smaller)."""
    sizes = {parameter_bytes(layer) for layer in reference.layers}
    return (model.hidden_size == reference.hidden_size and model.n_layers <= reference.n_layers
            and all(parameter_bytes(layer) in sizes for layer in model.layers))


def _entry(models: dict, name: str, wall: dict, cpu: dict, histories: torch.Tensor, reference: str | None,
           zero: str | None, seed: int) -> dict:
    """Everything measured for one model at one batch size, judged by the guard when it has a speedup."""
    model, (batch, max_len) = models[name], histories.shape
    entry = {**_stats(wall[name], batch), "flops": forward_flops(model, batch, max_len),
             "memory": _memory_in_process(model, histories),
             "cpu": {"median_ms": float(np.median(cpu[name]) / 1e6)}}
    if histories.is_cuda:
        entry["mfu"] = model_flops_utilisation(entry["flops"]["total"], entry["median_ms"], histories.device)
    if zero:
        ref = models[reference]
        layers = (model.n_layers if same_layers(model, ref) else None, ref.n_layers)
        entry.update(_compare(wall, name, reference, zero, *layers, seed))
        entry["cpu"].update(_compare(cpu, name, reference, zero, *layers, seed))
        judge(entry)
        judge(entry["cpu"])  # shown beside the wall figure; the wall figure alone decides a re-measure
    return entry


def model_flops_utilisation(flops: float, median_ms: float, device: torch.device) -> float | None:
    """Analytic forward FLOPs per call / median seconds / the card's published dense bf16 peak; None for a
    card whose peak we do not know (`layerwise.device.PEAK_BF16_TFLOPS`)."""
    peak = peak_bf16_flops(torch.cuda.get_device_name(device))
    return None if peak is None else flops / (median_ms / 1e3) / peak


def _nonlayer(wall: dict, cpu: dict, reference: str, zero: str, seed: int) -> dict:
    return {"median_ms": float(np.median(wall[zero]) / 1e6),
            "f": float(np.median(wall[zero]) / np.median(wall[reference])),
            "f_ci95": list(ratio_ci(wall[zero], wall[reference], seed)),
            "cpu_f": float(np.median(cpu[zero]) / np.median(cpu[reference]))}


def _measure_batch(models: dict, timed: dict, batch: int, runs: int, warmup: int, max_len: int, seed: int,
                   reference: str | None, zero: str | None) -> dict:
    """One batch size timed once: {"entries": {name: entry}, "nonlayer", "status", "disturbed_because"}.
    seed: the histories' seed; the CIs' bootstrap seeds follow from it."""
    n_items = next(iter(models.values())).n_items
    device = next(iter(models.values())).item_embedding.weight.device
    histories = make_histories(batch, max_len, n_items, seed).to(device)
    wall, cpu = _time_rounds(timed, histories, runs, warmup)
    boot = seed + 1000 * batch
    entries = {name: _entry(models, name, wall, cpu, histories, reference, zero, boot + i) for i, name in enumerate(models)}
    reasons = [f"{name}: {why}" for name, e in entries.items() for why in e.get("disturbed_because", [])]
    return {"entries": entries, "nonlayer": _nonlayer(wall, cpu, reference, zero, boot + 999) if zero else None,
            "status": "disturbed" if reasons else "ok", "disturbed_because": reasons}


def benchmark(models: dict[str, SequentialRecommender], batch_sizes=(1, 64), runs: int = 30, warmup: int = 5,
              max_len: int = 50, seed: int = 0, reference: str | None = None,
              remeasures: int = REMEASURES) -> dict:
    """Time `models` interleaved on identical inputs; a JSON-able result (see the module docstring).

    Args:
        models: name -> recommender; same catalogue and device. Each is in eval mode for the run.
        batch_sizes: users per `score` call; histories are (batch, max_len) seeded random items.
        runs: timed rounds (every model once per round); warmup: untimed rounds before them.
        reference: the teacher's name; with it, speedups, f (from its 0-layer copy), bounds, efficiencies.
        remeasures: how often a batch size whose speedups are disturbed is timed again, with more rounds
            (layerwise.perf.guard); one still disturbed is marked `"status": "disturbed"`.

    Returns:
        {"env", "settings", "status", "guard", "models": {name: {"n_layers", "param_bytes",
         "layer_param_bytes", "batches": {str(batch): {"median_ms", "p95_ms", "mean_ms", "std_ms",
         "users_per_s", "runs", "speedup", "speedup_ci95", "bound", "bound_high", "efficiency", "ceiling",
         "ceiling_ci95", "status",
         "disturbed_because", "cpu", "flops", "memory"}}}},
         "nonlayer": {str(batch): {"median_ms", "f", "f_ci95", "cpu_f"}} or None without a reference}.
    """
    n_items, device = _check_models(models, reference)
    timed, zero = dict(models), None
    if reference is not None:
        ref = models[reference]
        zero = f"{reference} [0 layers]"
        timed[zero] = zero_layer_variant(ref)
        for k in sorted({m.n_layers for m in models.values() if 0 < m.n_layers < ref.n_layers and same_layers(m, ref)}):
            timed[ceiling_name(reference, k)] = kept_variant(ref, k)
    training = {name: m.training for name, m in models.items()}
    result = {"env": _environment(device), "nonlayer": {} if zero else None, "models": {
        name: {"n_layers": m.n_layers, "param_bytes": parameter_bytes(m),
               "layer_param_bytes": parameter_bytes(m.layers), "batches": {}} for name, m in models.items()},
        "settings": {"batch_sizes": list(batch_sizes), "runs": runs, "warmup": warmup, "max_len": max_len,
                     "seed": seed, "reference": reference, "n_items": n_items, "remeasures": remeasures,
                     "flops": FLOPS_NOTE, "timing": TIMING_NOTE}}

    def measure(keys: list[str], rounds: int) -> dict[str, dict]:
        return {key: _measure_batch(models, timed, int(key), rounds, warmup, max_len, seed, reference, zero)
                for key in keys}

    try:
        for m in timed.values():
            m.eval()
        with torch.inference_mode(), inference_autocast(device):  # CUDA: bf16 layers where the card has it
            parts, attempts = remeasure(measure, [str(b) for b in batch_sizes], runs, remeasures)
    finally:
        for name, m in models.items():
            m.train(training[name])
    for key in map(str, batch_sizes):
        for name, entry in parts[key]["entries"].items():
            result["models"][name]["batches"][key] = entry
        if zero:
            result["nonlayer"][key] = parts[key]["nonlayer"]
    result["guard"] = verdict(attempts, remeasures)
    result["status"] = result["guard"]["status"]
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
               reference_index: int = 0, max_len: int = 50, seed: int = 0, remeasures: int = REMEASURES,
               device: str | torch.device | None = "cpu") -> dict:
    """Load saved models onto `device` (a `layerwise.device` setting), `benchmark` them against
    model_dirs[reference_index] (re-measured while disturbed, at most `remeasures` times), add
    subprocess peaks (on CUDA from the allocator: torch.cuda.max_memory_allocated)."""
    from layerwise.compression.compact import load_compact

    device = resolve_device(device)
    names = _unique_names(model_dirs)
    models = {name: load_compact(d).to(device) for name, d in zip(names, model_dirs)}
    result = benchmark(models, batch_sizes, runs, warmup, max_len=max_len, seed=seed,
                       reference=names[reference_index], remeasures=remeasures)
    keys = [(name, d, batch) for name, d in zip(names, model_dirs) for batch in batch_sizes]
    peaks = peak_memories([(d, batch) for _, d, batch in keys], max_len, str(device), seed=seed)
    for (name, d, batch), peak in zip(keys, peaks):
        result["models"][name]["dir"] = str(d)
        result["models"][name]["batches"][str(batch)]["memory"] = peak
    return result
