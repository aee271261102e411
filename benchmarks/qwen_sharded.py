"""Real weights at 1.5B on CPU: sharded forward importance, a 7-layer compact model, latency and memory
against the plan's formulas, on qwen2.5-coder-1.5b (28 layers x 1536, fp32). Opt-in, not a test.

    layerwise models get qwen2.5-coder-1.5b --install        # once: 22 packages, converted to safetensors
    PYTHONPATH=. nice -n 5 .venv/bin/python benchmarks/qwen_sharded.py --threads 1

Steps, each saved to the JSON as it finishes and skipped when the JSON has it (`--redo STEP` repeats one):
- importance: block influence, angular distance and activation change over ml-100k item titles, once in
  this process (`compute_importance`) and once as 2 Ray tasks that each receive only their shard's
  layers (`sharded_importance`, fresh_workers: one worker process per shard, so each peak is its own
  shard's); equality and each worker's memory. Torch tensors travel zero-copy
  (RAY_ENABLE_ZERO_COPY_TORCH_TENSORS), so a worker maps its shard from the object store instead of
  unpickling a second private copy.
- compact: keep the top-k layers by `--method`, shorten with the qwen2 family's renumbering, save with
  `save_pretrained`, reload with stock `AutoModelForCausalLM.from_pretrained` and check it.
- latency: full against compact, interleaved rounds at batch 1 and 8, `--tokens` of title text per row,
  the next-token logits only (`logits_to_keep=1`); median, p95, speedup with a paired bootstrap CI.
- memory: peak RSS of each model's forward at batch 8, each in a fresh subprocess, and how much of it is
  pages mapped from the safetensors file (from_pretrained maps it; an input table pages in by the row).
- plan: `orchestration.scale.plan` formulas for this shape and these settings, against the measurements.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")  # read when ray is imported

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

STEPS = ("importance", "compact", "latency", "memory", "plan")
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="known name or HF directory (default: %(default)s)")
    parser.add_argument("--json", default="benchmarks/results/qwen_sharded.json")
    parser.add_argument("--compact-dir", default=None, help="where the compact model goes (default: cache)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the memory runs")
    parser.add_argument("--titles", type=int, default=64, help="calibration titles (default: %(default)s)")
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument("--max-title-tokens", type=int, default=32)
    parser.add_argument("--keep", type=int, default=7, help="layers kept (default: %(default)s)")
    parser.add_argument("--method", default="block_influence", choices=["block_influence", "angular", "activation"])
    parser.add_argument("--tokens", type=int, default=48, help="tokens per row for latency and memory")
    parser.add_argument("--rounds", type=int, nargs=2, default=[20, 8], metavar=("B1", "B8"),
                        help="timed interleaved rounds at batch 1 and 8 (default: %(default)s)")
    parser.add_argument("--redo", nargs="*", default=[], choices=STEPS)
    parser.add_argument("--peak", nargs=3, default=None, metavar=("DIR", "BATCH", "TOKENS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(message, flush=True)


# --- importance ---------------------------------------------------------------------------------------
def calibration(directory: Path, args) -> list:
    from transformers import AutoTokenizer

    from layerwise.data.cache import load_dataset
    from layerwise.models.token_stack import text_batches

    titles = list(load_dataset("ml-100k", progress=False).item_text)[1:1 + args.titles]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return text_batches(tokenizer, titles, args.calib_batch, args.max_title_tokens)


def step_importance(directory: Path, args) -> dict:
    import ray
    from transformers import AutoModel

    from layerwise.compression.importance import compute_importance
    from layerwise.models.token_stack import TEXT_METHODS, TokenStack
    from orchestration.distributed.ray_runtime import init_ray
    from orchestration.distributed.shards import process_memory, sharded_importance, split_shards

    batches = calibration(directory, args)
    baseline = process_memory()
    stack = TokenStack(AutoModel.from_pretrained(str(directory), dtype=torch.float32).eval())
    loaded = process_memory()
    say(f"importance: {stack.n_layers} layers, {len(batches)} batches, "
        f"{sum(int((x != 0).sum()) for x, _ in batches)} title tokens")
    start = time.perf_counter()
    single = compute_importance(stack, batches, TEXT_METHODS)
    single_s = time.perf_counter() - start
    layer_bytes = sum(p.numel() * p.element_size() for p in stack.layers.parameters())
    init_ray(num_cpus=2, object_store_mb=int(1.2 * layer_bytes / 2**20) + 512)
    probe = ray.remote(num_cpus=1, max_calls=1)(_worker_baseline)  # a fresh worker with the task's imports
    worker_baseline = ray.get([probe.remote() for _ in range(2)])
    memory: list = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one zero-copy warning per tensor
        sharded = sharded_importance(stack, batches, 2, TEXT_METHODS, num_cpus=1, worker_memory=memory,
                                     fresh_workers=True)  # one process per shard: its peak is its own
    sharded_s = time.perf_counter() - start
    driver = process_memory()
    ray.shutdown()
    diff = {m: float((sharded[m] - single[m]).abs().max()) for m in TEXT_METHODS}
    rel = {m: float(((sharded[m] - single[m]).abs() / single[m].abs()).max()) for m in TEXT_METHODS}
    return {"methods": {m: single[m].tolist() for m in TEXT_METHODS},
            "sharded": {m: sharded[m].tolist() for m in TEXT_METHODS},
            "identical": all(torch.equal(sharded[m], single[m]) for m in TEXT_METHODS),
            "max_abs_diff": diff, "max_rel_diff": rel,
            "shards": split_shards(stack.n_layers, 2), "layer_bytes": layer_bytes,
            "calibration": {"batches": len(batches), "titles": args.titles, "batch_size": args.calib_batch,
                            "positions": [list(x.shape) for x, _ in batches],
                            "real_tokens": sum(int((x != 0).sum()) for x, _ in batches)},
            "seconds": {"single_process": single_s, "sharded_with_trace": sharded_s},
            "worker_memory": memory, "worker_baseline": worker_baseline,
            "driver_memory": {"after_imports": baseline, "after_load": loaded, "after_sharded": driver},
            "threads": torch.get_num_threads()}


def _worker_baseline() -> dict:
    import orchestration.distributed.shards as shards  # the shard task's own imports

    return shards.process_memory()


# --- compact --------------------------------------------------------------------------------------------
def step_compact(directory: Path, compact_dir: Path, scores: list[float], args) -> dict:
    from transformers import AutoModelForCausalLM

    from layerwise.models.families import FAMILIES
    from layerwise.compression.select import SELECTORS

    kept = sorted(SELECTORS["topk"](torch.tensor(scores, dtype=torch.float64), args.keep))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    probe = model.model.layers[kept[-1]].mlp.down_proj.weight.detach().clone()
    FAMILIES["qwen2"].keep_layers(model.model, kept)
    gc.collect()
    model.save_pretrained(compact_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    reloaded = AutoModelForCausalLM.from_pretrained(str(compact_dir))  # stock, no layerwise code involved
    ok = (reloaded.config.num_hidden_layers == len(kept) and len(reloaded.model.layers) == len(kept)
          and torch.equal(reloaded.model.layers[-1].mlp.down_proj.weight, probe))
    return {"kept": kept, "method": args.method, "dir": str(compact_dir), "parameters": params,
            "reloaded_ok": bool(ok), "files": sorted(p.name for p in compact_dir.iterdir())}


# --- latency --------------------------------------------------------------------------------------------
def token_rows(directory: Path, n_rows: int, n_tokens: int) -> torch.Tensor:
    """(n_rows, n_tokens) ids of ml-100k titles joined by '; ', each row starting at a later title."""
    from transformers import AutoTokenizer

    from layerwise.data.cache import load_dataset

    titles = [t for t in load_dataset("ml-100k", progress=False).item_text if t]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    rows = [tokenizer("; ".join(titles[10 * r:10 * r + 20]))["input_ids"][:n_tokens] for r in range(n_rows)]
    return torch.tensor(rows)


def step_latency(directory: Path, compact_dir: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    from layerwise.perf.bench import interleaved_schedule, ratio_ci

    models = {"full": AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval(),
              "compact": AutoModelForCausalLM.from_pretrained(str(compact_dir), dtype=torch.float32).eval()}
    out = {"threads": torch.get_num_threads(), "tokens": args.tokens, "head": "logits_to_keep=1"}
    for batch, rounds in zip((1, 8), args.rounds):
        ids = token_rows(directory, batch, args.tokens)
        times = {name: [] for name in models}
        with torch.inference_mode():
            for r, order in enumerate(interleaved_schedule(list(models), rounds + 1)):  # round 0: warm-up
                for name in order:
                    start = time.perf_counter()
                    models[name](input_ids=ids, use_cache=False, logits_to_keep=1)
                    if r:
                        times[name].append(time.perf_counter() - start)
        full, compact = (np.asarray(times[n]) for n in ("full", "compact"))
        ratio = float(np.median(full) / np.median(compact))
        # ratio_ci gives median(numerator) / median(denominator): compact / full, inverted for the speedup
        low, high = ratio_ci(compact, full, seed=0)
        out[f"batch_{batch}"] = {
            "rounds": rounds, **{f"{n}_median_ms": 1e3 * float(np.median(t)) for n, t in (("full", full), ("compact", compact))},
            **{f"{n}_p95_ms": 1e3 * float(np.percentile(t, 95)) for n, t in (("full", full), ("compact", compact))},
            "speedup": ratio, "speedup_ci95": [1 / high, 1 / low]}
        say(f"latency b{batch}: full {out[f'batch_{batch}']['full_median_ms']:.0f} ms, compact "
            f"{out[f'batch_{batch}']['compact_median_ms']:.0f} ms, speedup {ratio:.2f}x")
    return out


# --- memory ---------------------------------------------------------------------------------------------
def measure_peak(model_dir: str, batch: int, tokens: int) -> dict:
    """In a fresh process: baseline after imports, load, reset the high-water mark, forward twice."""
    from transformers import AutoModelForCausalLM

    from layerwise.perf.memory import _hwm_bytes, _reset_hwm
    from orchestration.distributed.shards import process_memory

    baseline = process_memory()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(100, 100_000, (batch, tokens))
    loaded = process_memory()
    reset = _reset_hwm()
    with torch.inference_mode():
        for _ in range(2):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    after = process_memory()  # rss - rss_anon - rss_shmem: pages mapped from the safetensors file
    return {"baseline": baseline, "loaded": loaded, "after_forward": after,
            "rss_file_after_forward": after["rss"] - after["rss_anon"] - after["rss_shmem"],
            "peak_rss": _hwm_bytes()[0], "hwm_reset_after_load": reset,
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "batch": batch}


def step_memory(directory: Path, compact_dir: Path, args) -> dict:
    out = {}
    for name, path in (("full", directory), ("compact", compact_dir)):
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--peak", str(path), "8", str(args.tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        say(f"memory {name}: peak {out[name]['peak_rss'] / GIB:.2f} GiB "
            f"(after imports {out[name]['baseline']['rss'] / GIB:.2f} GiB)")
    return out


# --- plan ---------------------------------------------------------------------------------------------------
def step_plan(directory: Path, result: dict) -> dict:
    from transformers import AutoConfig

    from orchestration.scale.plan import inference_memory, layer_dims, shard_memory

    config = AutoConfig.from_pretrained(str(directory))
    dims, imp = layer_dims(config), result["importance"]
    n_layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    layer_params = imp["layer_bytes"] // 4 // n_layers
    positions = max(b * t for b, t in imp["calibration"]["positions"])
    out = {"shape": {"layers": n_layers, "hidden": hidden, "intermediate": config.intermediate_size,
                     "vocab": vocab, "tied": config.tie_word_embeddings, "layer_params": layer_params}}
    shards = []
    for (start, end), worker, base in zip(imp["shards"], imp["worker_memory"], imp["worker_baseline"]):
        planned = shard_memory(layer_params, end - start, dims, positions, imp["calibration"]["batches"], gradients=False)
        shards.append({"layers": [start, end], "plan_bytes": planned, "measured_peak_rss": worker["peak_rss"],
                       "measured_over_baseline": worker["peak_rss"] - base["rss"],
                       "ratio_over_baseline": (worker["peak_rss"] - base["rss"]) / planned})
    out["shards"] = shards
    inference = {}
    for name in ("full", "compact"):
        measured = result["memory"][name]
        params = measured["param_bytes"] // 4
        # from_pretrained maps the safetensors file: of the untied input table only the looked-up rows page in
        planned = inference_memory(params, dims, 8, result["latency"]["tokens"], vocab - 1, value_bytes=4,
                                   mapped_table_rows=vocab)
        over = measured["peak_rss"] - measured["baseline"]["rss"]
        inference[name] = {"plan_bytes": planned["total"], "plan_weights": planned["weights"],
                           "plan_mapped_unread": planned["mapped_unread"],
                           "plan_activations": planned["activations"], "measured_peak_rss": measured["peak_rss"],
                           "measured_over_baseline": over, "ratio_over_baseline": over / planned["total"]}
    out["inference_b8"] = inference
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak:
        print(json.dumps(measure_peak(args.peak[0], int(args.peak[1]), int(args.peak[2]))))
        return 0
    from layerwise.models.pretrained import cache_dir, resolve_pretrained

    directory = resolve_pretrained(args.model)
    compact_dir = Path(args.compact_dir or cache_dir().parent / "qwen_sharded" / f"compact-k{args.keep}")
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {}
    for step in STEPS:
        if step in result and step not in args.redo:
            say(f"{step}: done earlier (in {path}); --redo {step} repeats it")
            continue
        start = time.perf_counter()
        if step == "importance":
            result[step] = step_importance(directory, args)
        elif step == "compact":
            result[step] = step_compact(directory, compact_dir, result["importance"]["methods"][args.method], args)
        elif step == "latency":
            result[step] = step_latency(directory, compact_dir, args)
        elif step == "memory":
            result[step] = step_memory(directory, compact_dir, args)
        else:
            result[step] = step_plan(directory, result)
        result[step]["wall_s"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        say(f"{step}: {result[step]['wall_s']:.0f} s, saved to {path}")
        gc.collect()
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    imp, comp, lat, plan = (result[k] for k in ("importance", "compact", "latency", "plan"))
    lines = [f"sharded == single-process: identical={imp['identical']}, max rel diff "
             + ", ".join(f"{m} {v:.1e}" for m, v in imp["max_rel_diff"].items()),
             f"kept {comp['kept']} by {comp['method']}; reloaded with AutoModelForCausalLM: {comp['reloaded_ok']}"]
    for s in plan["shards"]:
        lines.append(f"shard {s['layers']}: peak RSS {s['measured_peak_rss'] / GIB:.2f} GiB, over worker baseline "
                     f"{s['measured_over_baseline'] / GIB:.2f} GiB vs plan {s['plan_bytes'] / GIB:.2f} GiB "
                     f"({100 * (s['ratio_over_baseline'] - 1):+.1f}%)")
    pids = [w["pid"] for w in imp["worker_memory"]]
    if len(set(pids)) < len(pids):
        lines.append(f"note: the shard tasks ran one after the other in the same Ray worker(s) {pids}; a later "
                     "shard's peak also holds the earlier shards' pages, still mapped from the object store")
    for name, s in plan["inference_b8"].items():
        lines.append(f"inference {name} b8: peak RSS {s['measured_peak_rss'] / GIB:.2f} GiB, over baseline "
                     f"{s['measured_over_baseline'] / GIB:.2f} GiB vs plan {s['plan_bytes'] / GIB:.2f} GiB "
                     f"({100 * (s['ratio_over_baseline'] - 1):+.1f}%)")
    for b in ("batch_1", "batch_8"):
        e = lat[b]
        lines.append(f"{b}: full {e['full_median_ms']:.0f} ms, compact {e['compact_median_ms']:.0f} ms, speedup "
                     f"{e['speedup']:.2f}x [{e['speedup_ci95'][0]:.2f}, {e['speedup_ci95'][1]:.2f}] "
                     f"({lat['threads']} thread(s), {lat['tokens']} tokens)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
