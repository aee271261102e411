"""Does torch.compile make the SmolLM2 recommender's training step faster on a CPU?

    nice -n 10 .venv/bin/python benchmarks/train_compile.py --setups lora30 full8 --threads 1 \
        --json benchmarks/results/train_compile.json

The step is the teacher's (all 30 layers, LoRA r=16) and a student's (8 layers, fully trained), as in
benchmarks/llm_step_times.py: 32 ml-100k training windows of 50 items, float32 (the study's precision on
CPUs without native bf16), the sampled loss, AdamW. Eager and compiled (`torch.compile` of the model's
`encode`, inductor, static shapes) run interleaved on one model, so a shared machine's load hits both alike;
one warm-up round each (the compiled one includes compiling, timed apart), then the median of `--rounds`.

Static shapes are the best case for the compiler. Training trims each batch's leading padding columns
(layerwise.data.batching.trim_left), so a real epoch sees up to 50 window lengths, and each new one would
compile again (or need dynamic shapes). Before any timing, both paths compute the loss of one batch with the
same weights: their difference is recorded, so a faster path that computes something else is visible.
The step's FLOPs (torch's FlopCounterMode, on the step itself) over its time give its rate, against this
core's rate for one matrix product of a layer's shape: how much a faster step could still gain.

Measured on an AMD EPYC (AVX2) at 1 thread beside a running study (benchmarks/results/train_compile.json):
lora30 1.10x, 0.98x and 1.21x in three runs, full8 1.05x and 1.10x; the first compiled step took 29-277 s.
Eager runs at 69% (lora30) and 80% (full8) of the matrix products' rate. Not adopted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_step_times import MODEL, SETUPS, _batch, _machine, _step  # noqa: E402 - the same model, batch, step

from layerwise.data import load_dataset  # noqa: E402
from layerwise.models.factory import build_recommender  # noqa: E402
from layerwise.models.llm import LLMSetup  # noqa: E402
from layerwise.training.train import TrainConfig, next_item_loss  # noqa: E402


def _loss(model, encode, x, y):
    return next_item_loss(model, encode(x), y, TrainConfig(), torch.Generator())


def step_flops(model, x, y) -> int:
    """The FLOPs of one training step's forward and backward (torch's FlopCounterMode: matrix products and
    attention), counted on the step itself."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _loss(model, model.encode, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def gemm_gflops(rounds: int = 5) -> float:
    """This core's float32 matrix-product rate at a teacher layer's shape (1,600 positions, 576 -> 1,536),
    the ceiling a training step's products can reach: the median of `rounds` after a warm-up."""
    a, b = torch.randn(1600, 576), torch.randn(576, 1536)
    a @ b
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * 1600 * 576 * 1536 / statistics.median(times) / 1e9


def time_setup(data, name: str, rounds: int) -> dict:
    model = build_recommender(data, "llama", pretrained=MODEL, dropout=0.0,
                              llm=LLMSetup(**SETUPS[name], item_init="random"))
    x, y = _batch(data, 50)
    compiled = torch.compile(model.encode, dynamic=False)
    paths = {"eager": model.encode, "compiled": compiled}
    model.train()
    flops = step_flops(model, x, y)
    with torch.no_grad():  # the same weights, the same batch and negatives: the same loss?
        eager_loss = _loss(model, model.encode, x, y).item()
        started = time.perf_counter()
        compiled_loss = _loss(model, compiled, x, y).item()
        compile_forward = time.perf_counter() - started
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    samples = {path: [] for path in paths}
    warmup = {}
    for round_ in range(rounds + 1):
        for path, encode in paths.items():
            sample = _step(model, optimizer, x, y, bf16=False, encode=encode)
            if round_:
                samples[path].append(sample)
            else:  # the compiled path's first step compiles its training graph (forward and backward)
                warmup[path] = sample["step"]
    out = {"setup": name, "layers": model.n_layers, "batch": len(x), "max_len": 50, "rounds": rounds,
           "loss_eager": eager_loss, "loss_compiled": compiled_loss,
           "loss_abs_diff": abs(eager_loss - compiled_loss), "compile_seconds_inference": compile_forward,
           "first_step_seconds": warmup, **_machine()}
    for path, rows in samples.items():
        out[path] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        out[path]["step_samples"] = [r["step"] for r in rows]
    out["step_flops"] = flops  # forward and backward; the optimizer's few are not counted
    out["eager"]["gflops"] = flops / out["eager"]["step"] / 1e9
    out["compiled"]["gflops"] = flops / out["compiled"]["step"] / 1e9
    out["speedup_step"] = out["eager"]["step"] / out["compiled"]["step"]
    out["speedup_backward"] = out["eager"]["backward"] / out["compiled"]["backward"]
    out["speedup_forward"] = out["eager"]["forward"] / out["compiled"]["forward"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=["lora30"])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one step per path) after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a study's seed task uses 1 or 2)")
    parser.add_argument("--json", type=Path, required=True, help="results file; each invocation adds one run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("ml-100k")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {"model": MODEL, "runs": []}
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
           "gemm_gflops": gemm_gflops(), "setups": {}}
    print(f"float32 matrix products at a layer's shape: {run['gemm_gflops']:.1f} GFLOPS", flush=True)
    results["runs"].append(run)
    for name in args.setups:
        row = time_setup(data, name, args.rounds)
        print(json.dumps({k: v for k, v in row.items() if k not in ("eager", "compiled")}), flush=True)
        print(f"{name}: eager step {row['eager']['step']:.2f} s, compiled {row['compiled']['step']:.2f} s "
              f"({row['speedup_step']:.2f}x; forward {row['speedup_forward']:.2f}x, backward "
              f"{row['speedup_backward']:.2f}x); loss difference {row['loss_abs_diff']:.2e}; eager runs at "
              f"{row['eager']['gflops']:.1f} GFLOPS, {row['eager']['gflops'] / run['gemm_gflops']:.0%} of the "
              f"products' rate", flush=True)
        run["setups"][name] = row
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
