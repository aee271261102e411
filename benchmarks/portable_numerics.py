"""What pinning the CPU kernels costs (orchestration.study.config PORTABLE_NUMERICS), and which pins train
the same bits: one SmolLM2 recommender training step (30 layers, LoRA r16, 32 ml-100k windows of 50 items,
one torch thread), float32 and bf16 autocast, unpinned and under each pin of `ray.portable_isa`.

    .venv/bin/python benchmarks/portable_numerics.py --json benchmarks/results/portable_numerics.json

Each setting runs in its own process (the pins are environment variables read when torch loads). In each,
one step from the same initial weights gives a SHA-256 of the trainable weights after it, per precision:
equal digests mean the pin trains the same bits as the unpinned run on this machine. Then `--rounds`
timed rounds, float32 and bf16 interleaved, after a warm-up. The load average is recorded: on a shared
machine compare the settings' ratios, not their seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("native", "avx2", "avx512_bf16")


def worker(rounds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from llm_step_times import MODEL, _batch, _step  # beside this file (main puts its folder on the path)

    from layerwise.data import load_dataset
    from layerwise.models.factory import build_recommender
    from layerwise.models.llm import LLMSetup

    data = load_dataset("ml-100k")
    model = build_recommender(data, "llama", pretrained=MODEL, dropout=0.0, seed=0,
                              llm=LLMSetup(finetune="lora", lora_rank=16, item_init="random"))
    model.train()
    x, y = _batch(data, 50)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    out = {"capability": torch.backends.cpu.get_cpu_capability(), "load_avg_1m": os.getloadavg()[0]}
    for precision in ("fp32", "bf16"):  # one step from the same weights: the bits it trains
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        _step(model, optimizer, x, y, precision == "bf16")
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest()
        out[f"{precision}_digest"] = digest
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    samples = {"fp32": [], "bf16": []}
    for round_ in range(rounds + 1):
        for precision in samples:
            seconds = _step(model, optimizer, x, y, precision == "bf16")["step"]
            if round_:  # the first round warms up
                samples[precision].append(seconds)
    for precision, values in samples.items():
        out[f"{precision}_step_seconds"] = min(values)
        out[f"{precision}_step_samples"] = values
    out["load_avg_1m_end"] = os.getloadavg()[0]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="where to write the results (required)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds after a warm-up (default 1: the "
                        "AVX2 pin's bf16 step takes minutes)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.rounds)))
        return
    if args.json is None:
        parser.error("--json is required")
    from orchestration.study.config import PORTABLE_NUMERICS

    results = {"model": "smollm2-135m", "setup": "lora30, 32 windows x 50 items, 1 torch thread",
               "cpus": os.cpu_count(), "settings": {}}
    for setting in args.settings:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **PORTABLE_NUMERICS.get(setting, {})}
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--worker", "--rounds", str(args.rounds)], env=env,
                              check=True, stdout=subprocess.PIPE, text=True)
        row = {"pins": PORTABLE_NUMERICS.get(setting, {}), **json.loads(done.stdout.strip().splitlines()[-1]),
               "process_seconds": time.perf_counter() - started}
        results["settings"][setting] = row
        print(f"{setting:<12} {row['capability']:<7} fp32 {row['fp32_step_seconds']:6.1f} s  bf16 "
              f"{row['bf16_step_seconds']:6.1f} s  same bits as native: "
              f"{_same(results, setting, 'fp32')} / {_same(results, setting, 'bf16')}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))


def _same(results: dict, setting: str, precision: str) -> str:
    native = results["settings"].get("native")
    if native is None:
        return "?"
    return "yes" if native[f"{precision}_digest"] == results["settings"][setting][f"{precision}_digest"] else "no"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
