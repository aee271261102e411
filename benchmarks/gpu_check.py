"""One short GPU check for a lent GPU machine (about 3-8 minutes on one H200), written as JSON.

    bash benchmarks/gpu_check.sh                                   # $OUT/gpu_check.json (or runs/gpu_check/)
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --out /tmp/gpu_check

Three parts, each recorded (or its error recorded) before the next starts, so a timeout keeps what ran:
1. small: the `small` LLaMA teacher (8 layers, 64 wide, 1682 items as ml-100k) against its compact copy
   (2 uniform layers, rank-16 bridges) with `layerwise.bench.benchmark` on CUDA (interleaved, synchronised,
   batches 1 and 64, 30 runs).
2. llama_1b: the Llama-3.2-1B shape as a recommender (token table dropped, 10,000 items), random weights in
   bf16, full (16 layers) against a 25% compact (4 layers, bridges), batch 8 x 50, interleaved, median of
   20 runs with torch.cuda.synchronize around every call (the same `benchmark`).
3. zero3_step: DeepSpeed ZeRO-3 in bf16 (orchestration.distributed.deepspeed_config, device="cuda") on the 1B shape,
   one process, NCCL: two training steps (cold, warm) through the wrapper the Ray Train loop uses.

Without a visible CUDA GPU it stops at once with exit status 2, a message saying why, and a JSON file with
status "no_gpu": nothing here is meaningful on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

N_ITEMS_1B = 10_000


def require_gpu() -> str | None:
    """None when a CUDA GPU is usable; otherwise why not."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"no CUDA GPU visible (torch {torch.__version__}, {build}); gpu_check only runs on a GPU "
            "machine with a CUDA build of torch")


def _environment() -> dict:
    import transformers

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30, "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported(),
            "transformers": transformers.__version__, "python": platform.python_version()}


def small_benchmark() -> dict:
    """Part 1: the small teacher against its compact copy, on CUDA."""
    from layerwise.bench import benchmark
    from layerwise.compact import build_compact
    from layerwise.models import SequentialRecommender, build_backbone, preset_config
    from layerwise.select import SELECTORS

    torch.manual_seed(0)
    teacher = SequentialRecommender(build_backbone(preset_config("llama", "small")), 1682)
    kept = SELECTORS["uniform"](torch.zeros(teacher.n_layers), 2)
    compact = build_compact(teacher, kept, bridge_rank=16)
    models = {"teacher": teacher.cuda(), "compact": compact.cuda()}
    return {"kept": kept, **benchmark(models, batch_sizes=(1, 64), runs=30, warmup=5, reference="teacher")}


def _one_b(dtype: torch.dtype):
    """The Llama-3.2-1B shape as a recommender, random weights, built straight on the GPU."""
    from layerwise.models import SequentialRecommender, build_backbone
    from layerwise.models.scale import scale_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SequentialRecommender(build_backbone(scale_config("llama", "1b", recommender=True)), N_ITEMS_1B)
    return model.to(dtype)


def llama_1b_forward() -> dict:
    """Part 2: full vs 25% compact forward time at batch 8 x 50 in bf16."""
    from layerwise.bench import benchmark
    from layerwise.compact import build_compact
    from layerwise.select import SELECTORS

    full = _one_b(torch.bfloat16)
    kept = SELECTORS["uniform"](torch.zeros(full.n_layers), round(0.25 * full.n_layers))
    compact = build_compact(full, kept, bridge_rank=16).to("cuda", torch.bfloat16)  # new bridges are fp32 on CPU
    result = benchmark({"full": full, "compact": compact}, batch_sizes=(8,), runs=20, warmup=5,
                       max_len=50, reference="full")
    del full, compact
    torch.cuda.empty_cache()
    return {"kept": kept, "dtype": "bfloat16", **result}


def _init_single_process() -> None:
    """A one-rank NCCL process group, as Ray Train would set up for each worker."""
    import deepspeed

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl")


def zero3_step(steps: int = 2) -> dict:
    """Part 3: ZeRO-3 bf16 training steps on the 1B shape; time per step, loss and peak memory."""
    import deepspeed

    from layerwise.train import TrainConfig, next_item_loss
    from orchestration.distributed.deepspeed_config import deepspeed_config
    from orchestration.distributed.train_loops import _Objective, _register_external  # the production wrapper, reused

    _init_single_process()
    model = _one_b(torch.float32)  # DeepSpeed keeps fp32 master weights and computes in bf16
    generator, train = torch.Generator().manual_seed(0), TrainConfig(loss="full")
    objective = _Objective(model, lambda m, x, y: next_item_loss(m, m.encode(x), y, train, generator))
    _register_external(objective, model)
    config = deepspeed_config(stage=3, lr=1e-4, batch_size=8, device="cuda")
    engine, *_ = deepspeed.initialize(model=objective, model_parameters=list(model.parameters()), config=config)
    items = torch.randint(1, N_ITEMS_1B + 1, (8, 51), generator=torch.Generator().manual_seed(1)).cuda()
    torch.cuda.reset_peak_memory_stats()
    records = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = engine(items[:, :-1], items[:, 1:])
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        records.append({"seconds": time.perf_counter() - start, "loss": loss.item()})
    return {"steps": records, "zero_stage": engine.zero_optimization_stage(), "bf16": config.get("bf16"),
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "loss_finite": all(r["loss"] == r["loss"] and abs(r["loss"]) < float("inf") for r in records),
            "deepspeed": deepspeed.__version__}


PARTS = {"small": small_benchmark, "llama_1b": llama_1b_forward, "zero3_step": zero3_step}


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="output directory")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    reason = require_gpu()
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        _write(out, {"status": "no_gpu", "reason": reason})
        return 2
    result = {"status": "running", "env": _environment(), "parts": {}}
    for name in args.parts:
        started = time.perf_counter()
        try:
            result["parts"][name] = {"status": "ok", **PARTS[name]()}
        except Exception as err:  # record and go on: one broken part must not cost the others' numbers
            result["parts"][name] = {"status": "error", "error": repr(err), "traceback": traceback.format_exc()}
        result["parts"][name]["wall_s"] = time.perf_counter() - started
        print(f"gpu_check: {name} {result['parts'][name]['status']} in {result['parts'][name]['wall_s']:.0f}s",
              flush=True)
        _write(out, result)
    failed = [n for n, part in result["parts"].items() if part["status"] != "ok"]
    result["status"] = "failed: " + ", ".join(failed) if failed else "ok"
    _write(out, result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
