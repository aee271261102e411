"""Benchmark sharded importance on Ray: 1 shard vs 2 shards on 2 workers vs the single-process call.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_shards.py --json runs/bench_shards.json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_shards.py --batches 2 --batch-size 16 --repeats 1

Default case: the `small` LLaMA preset (8 layers, 64 wide) over 1682 items (ml-100k's catalogue), random
weights, 8 calibration batches of 64 sequences of 50 items, all six local estimators. `--model DIR` loads
a saved recommender instead. Every call is timed end to end (trace on the driver, object store, tasks);
calls are interleaved (single, S=1, S=2, rotated each round) after one warm-up each, so that machine
drift hits all of them; the median is reported. The driver trace alone is timed too: it is the serial
part that sharding cannot speed up. Agreement is the largest relative difference, over layers and
estimators, between a sharded result and the single-process one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch

from layerwise.perf.bench import interleaved_schedule
from layerwise.compression.importance import LOCAL_METHODS, compute_importance, shard_inputs
from layerwise.models import SequentialRecommender, build_backbone, preset_config
from layerwise.models.checkpoint import load_recommender
from layerwise.compression.tracing import trace_layers
from layerwise.training.train import cloze_mask
from orchestration.distributed.ray_runtime import ray_session
from orchestration.distributed.shards import shard_weights, sharded_importance, split_shards


def make_model(model_dir: str | None, family: str, preset: str, n_items: int, seed: int) -> SequentialRecommender:
    """A saved recommender, or a randomly initialised preset without dropout."""
    if model_dir:
        return load_recommender(model_dir)
    torch.manual_seed(seed)
    return SequentialRecommender(build_backbone(preset_config(family, preset, dropout=0.0)), n_items, dropout=0.0)


def make_batches(model: SequentialRecommender, n_batches: int, batch_size: int, seq_len: int,
                 seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random left-padded histories of 5..seq_len+1 items: next-item targets, or cloze for encoders.

    Returns n_batches `(inputs (B, seq_len), targets (B, seq_len))` pairs, 0 = padding / no target.
    """
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        seqs = torch.randint(1, model.n_items + 1, (batch_size, seq_len + 1), generator=g)
        lengths = torch.randint(5, seq_len + 2, (batch_size, 1), generator=g)
        seqs = seqs.masked_fill(torch.arange(seq_len + 1) < seq_len + 1 - lengths, 0)
        if model.causal:
            inputs, targets = seqs[:, :-1], seqs[:, 1:].masked_fill(seqs[:, :-1] == 0, 0)
        else:
            inputs, targets = cloze_mask(seqs[:, 1:], model.mask_index, 0.2, g)
        batches.append((inputs, targets))
    return batches


def _payload_mib(model, batches, n_shards: int) -> list[float]:
    """Tensor bytes each shard task receives (its boundary data + its weights), MiB."""
    traces = trace_layers(model, batches)
    sizes = []
    for start, end in split_shards(model.n_layers, n_shards):
        total = _tensor_bytes(shard_inputs(traces, start, end)) + _tensor_bytes(shard_weights(model, start, end))
        sizes.append(round(total / 2**20, 2))
    return sizes


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return sum(_tensor_bytes(v) for v in vars(value).values()) if hasattr(value, "__dataclass_fields__") else 0


def _max_rel_diff(got: dict, expected: dict) -> float:
    return max(((got[m] - expected[m]).abs() / expected[m].abs().clamp(min=1e-30)).max().item() for m in expected)


def run(model, batches, repeats: int, task_cpus: float) -> dict:
    """Time the single-process call, S=1 and S=2 (interleaved) and the driver trace; check agreement."""
    calls = {
        "single": lambda: compute_importance(model, batches),
        "shards_1": lambda: sharded_importance(model, batches, 1, num_cpus=task_cpus),
        "shards_2": lambda: sharded_importance(model, batches, 2, num_cpus=task_cpus),
        "trace_only": lambda: trace_layers(model, batches),
    }
    results = {name: call() for name, call in calls.items()}  # warm-up: starts the workers, too
    times = {name: [] for name in calls}
    for order in interleaved_schedule(list(calls), repeats):
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    median = {name: float(np.median(t)) for name, t in times.items()}
    return {
        "median_s": {k: round(v, 3) for k, v in median.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "speedup_2_vs_1_shard": round(median["shards_1"] / median["shards_2"], 3),
        "speedup_2_shards_vs_single": round(median["single"] / median["shards_2"], 3),
        "max_rel_diff": {f"shards_{s}": _max_rel_diff(results[f"shards_{s}"], results["single"]) for s in (1, 2)},
        "payload_mib_per_shard": {f"shards_{s}": _payload_mib(model, batches, s) for s in (1, 2)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved recommender directory (default: a random preset)")
    parser.add_argument("--family", default="llama")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--n-items", type=int, default=1682)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the driver (workers get 1)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray")
    parser.add_argument("--task-cpus", type=float, default=1.0, help="CPU request per shard task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = make_model(args.model, args.family, args.preset, args.n_items, args.seed).eval()
    batches = make_batches(model, args.batches, args.batch_size, args.seq_len, args.seed)
    with ray_session(num_cpus=args.num_cpus):
        result = run(model, batches, args.repeats, args.task_cpus)
    result["setup"] = {
        "model": args.model or f"{args.family}/{args.preset} (random)", "family": model.family.name,
        "n_layers": model.n_layers, "hidden": model.hidden_size, "n_items": model.n_items,
        "batches": args.batches, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "methods": list(LOCAL_METHODS), "driver_threads": args.threads, "ray_cpus": args.num_cpus,
        "task_cpus": args.task_cpus, "repeats": args.repeats,
    }
    result["env"] = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "python":
                     platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}
    m = result["median_s"]
    print(f"{model.n_layers}-layer {model.family.name}, {args.batches} x {args.batch_size}x{args.seq_len}: "
          f"single {m['single']:.2f} s | 1 shard {m['shards_1']:.2f} s | 2 shards {m['shards_2']:.2f} s "
          f"(x{result['speedup_2_vs_1_shard']:.2f} vs 1 shard) | driver trace {m['trace_only']:.2f} s")
    print(f"max relative difference vs single: {result['max_rel_diff']}; "
          f"payload MiB per shard: {result['payload_mib_per_shard']}; load avg {result['env']['load_avg_1m']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
