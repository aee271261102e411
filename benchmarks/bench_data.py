"""Benchmark the data layer at the seed's scale: generate + split 100k users x 10k items x 1M interactions.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_data.py --json runs/bench_data.json --check
    PYTHONPATH=. .venv/bin/python benchmarks/bench_data.py --users 2000 --items 500 --interactions 20000

Targets (for generate + build_sequences together): <= 60 s wall time and <= 4 GiB peak RSS on 2 cores.
Peak RSS is the program's high-water mark (layerwise.perf.memory.peak_rss_bytes), imports (torch included)
counted. Saving and loading the Parquet cache are timed too, for information.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from layerwise.data import build_sequences, dataset_stats, generate_synthetic, load_sequences, save_sequences
from layerwise.perf.memory import peak_rss_bytes

TARGET_SECONDS = 60.0
TARGET_RSS_GIB = 4.0


def run(users: int, items: int, interactions: int, seed: int) -> dict:
    """Time each stage once; returns a JSON-able dict of timings, memory and data statistics."""
    rss_start = peak_rss_bytes()
    t0 = time.perf_counter()
    log = generate_synthetic(users, items, interactions, seed=seed)
    t1 = time.perf_counter()
    data = build_sequences(log, f"synthetic-{users}x{items}x{interactions}-s{seed}")
    t2 = time.perf_counter()
    rss_split = peak_rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_sequences(data, Path(tmp) / "bench.parquet")
        t3 = time.perf_counter()
        loaded = load_sequences(path)
        t4 = time.perf_counter()
        cache_bytes = path.stat().st_size
    assert loaded.fingerprint == data.fingerprint
    stats = dataset_stats(data)
    total = t2 - t0
    return {
        "users": users, "items": items, "interactions": interactions, "seed": seed,
        "generate_s": round(t1 - t0, 3), "build_sequences_s": round(t2 - t1, 3), "total_s": round(total, 3),
        "save_cache_s": round(t3 - t2, 3), "load_cache_s": round(t4 - t3, 3),
        "cache_mib": round(cache_bytes / 2**20, 1),
        "peak_rss_gib_after_split": round(rss_split / 2**30, 3), "peak_rss_gib_at_start": round(rss_start / 2**30, 3),
        "peak_rss_gib": round(peak_rss_bytes() / 2**30, 3),
        "targets": {"total_s": TARGET_SECONDS, "peak_rss_gib": TARGET_RSS_GIB},
        "meets_targets": bool(total <= TARGET_SECONDS and rss_split <= TARGET_RSS_GIB * 2**30),
        "data": {k: v for k, v in stats.items() if k != "protocol"},
        "env": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                "pyarrow": pa.__version__, "machine": platform.machine()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    result = run(args.users, args.items, args.interactions, args.seed)
    print(f"generate {result['generate_s']:.2f} s + build_sequences {result['build_sequences_s']:.2f} s "
          f"= {result['total_s']:.2f} s (target {TARGET_SECONDS:.0f} s); peak RSS "
          f"{result['peak_rss_gib_after_split']:.2f} GiB (target {TARGET_RSS_GIB:.0f} GiB); "
          f"cache save {result['save_cache_s']:.2f} s, load {result['load_cache_s']:.2f} s, "
          f"{result['cache_mib']} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if args.check and not result["meets_targets"] else 0


if __name__ == "__main__":
    sys.exit(main())
