"""Benchmark the literature's data sets: full-ranking evaluation of all Yelp users, one training epoch on Beauty.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_literature.py --data-dir ../shared/data/amazon-yelp \
        --json runs/bench_literature.json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_literature.py --stages evaluate --eval-dataset toys

Each stage runs in its own fresh Python process, so each peak RSS (VmHWM, imports included) is that
stage's own; `baseline_rss_gib` is the process after its imports, before any data or model.

  evaluate  the `small` LLaMA recommender (8 layers, 64 wide; untrained: the time does not depend on the
            weights) ranks every test item of every user of --eval-dataset (default yelp: 30,431 users x
            20,033 items) against the whole catalogue, the user's history excluded. Users go through in
            batches of --eval-batch, so only a (batch, n_items + 1) score matrix exists at a time.
  train     one epoch of the default teacher recipe on --train-dataset (default beauty): every window of
            every training history, full-softmax cross-entropy, AdamW, batch 128; then, timed apart, the
            validation pass over all users that the recipe runs every `eval_every` epochs.

The bound to meet is the 1M benchmark's (benchmarks/bench_scale.py): every stage's peak RSS <= 4 GiB. On a
shared machine read each time next to the load average it ran under.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench_scale import GIB, _epoch, _own_peak_rss

TARGET_RSS_GIB = 4.0
STAGES = ("evaluate", "train")


def _load(name: str, args):
    from layerwise.data import load_dataset

    return load_dataset(name, data_dir=args.data_dir, progress=False)


def _model(data, args):
    from layerwise.models.factory import build_recommender

    return build_recommender(data, "llama", args.preset, max_len=args.max_len, dropout=0.1, seed=args.seed)


def stage_evaluate(args) -> dict:
    from layerwise.evaluation.evaluate import evaluate

    data = _load(args.eval_dataset, args)
    model = _model(data, args).eval()
    t0 = time.perf_counter()
    result = evaluate(model.score, data, stage="test", max_len=args.max_len, batch_size=args.eval_batch)
    seconds = time.perf_counter() - t0
    return {"dataset": data.name, "users": len(result.users), "items": data.n_items,
            "batch_size": args.eval_batch, "evaluate_s": round(seconds, 2),
            "users_per_s": round(len(result.users) / seconds, 1),
            "batch_scores_mib": round(args.eval_batch * (data.n_items + 1) * 4 / 2**20, 1),
            "all_scores_gib": round(data.n_users * (data.n_items + 1) * 4 / GIB, 2),
            "ndcg@10_untrained": round(result.means["ndcg@10"], 5)}


def stage_train(args) -> dict:
    import torch

    from layerwise.evaluation.evaluate import evaluate
    from layerwise.training.train import TrainConfig, batch_loss, training_windows

    data = _load(args.train_dataset, args)
    config = TrainConfig(max_len=args.max_len, seed=args.seed)  # the default recipe: full softmax
    t0 = time.perf_counter()
    inputs, targets = training_windows(data, config.max_len, causal=True)
    windows_s = time.perf_counter() - t0
    model = _model(data, args)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    epoch = _epoch(list(model.parameters()),
                   lambda x, y: batch_loss(model, x, y, config, generator),
                   inputs, targets, config.batch_size, args.train_steps, args.seed, config.lr,
                   config.weight_decay)
    model.eval()
    t1 = time.perf_counter()
    valid = evaluate(model.score, data, stage="valid", max_len=config.max_len)
    return {"dataset": data.name, "users": data.n_users, "items": data.n_items, "windows": len(inputs),
            "target_tokens": int((targets != 0).sum()), "windows_s": round(windows_s, 2),
            "loss": config.loss, "batch_size": config.batch_size, **epoch,
            "validation_s": round(time.perf_counter() - t1, 2),
            "valid_ndcg@10_after_1_epoch": round(valid.means["ndcg@10"], 5)}


STAGE_FNS = {"evaluate": stage_evaluate, "train": stage_train}


def _run_stage_here(args) -> None:
    """Child side: imports first (outside the clock), then the stage; prints its figures as JSON."""
    import torch

    import layerwise.evaluation.evaluate  # noqa: F401  (transformers and torch load here, before the baseline)
    import layerwise.models.factory  # noqa: F401

    torch.set_num_threads(args.threads)
    baseline = psutil.Process().memory_info().rss
    started = time.perf_counter()
    figures = STAGE_FNS[args.stage](args)
    figures["wall_s"] = round(time.perf_counter() - started, 2)
    figures["baseline_rss_gib"] = round(baseline / GIB, 3)
    figures["ru_maxrss_gib"] = round(_own_peak_rss() / GIB, 3)
    print("RESULT " + json.dumps(figures), flush=True)


def run_stage(stage: str, args) -> dict:
    """Run `stage` in a fresh interpreter and return its figures with the load average around it."""
    cmd = [sys.executable, __file__, "--stage", stage, "--data-dir", str(args.data_dir or ""),
           "--eval-dataset", args.eval_dataset, "--train-dataset", args.train_dataset,
           "--preset", args.preset, "--max-len", str(args.max_len), "--eval-batch", str(args.eval_batch),
           "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.train_steps is not None:
        cmd += ["--train-steps", str(args.train_steps)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "TRANSFORMERS_VERBOSITY": "error"}
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # the child's stderr is ours
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"stage {stage} failed with exit code {proc.returncode} (its stderr is above)")
    figures = json.loads(lines[-1].removeprefix("RESULT "))
    figures["load_avg_before"], figures["load_avg_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    return figures


def print_table(results: dict) -> None:
    """One line per stage: its time, its peak RSS and the load average it ran under."""
    for stage, r in results.items():
        memory = (f"peak RSS {r['ru_maxrss_gib']:.2f} GiB (after imports {r['baseline_rss_gib']:.2f}); "
                  f"load {r['load_avg_before']}-{r['load_avg_after']}")
        if stage == "evaluate":
            print(f"evaluate {r['dataset']}: {r['users']:,} users x {r['items']:,} items in "
                  f"{r['evaluate_s']:.1f} s ({r['users_per_s']} users/s; batch {r['batch_size']}: "
                  f"{r['batch_scores_mib']} MiB of scores at a time, {r['all_scores_gib']} GiB if all at "
                  f"once); {memory}")
        else:
            print(f"train {r['dataset']}: one epoch {r['epoch_s']:.1f} s ({r['steps']} steps of "
                  f"{r['batch_size']}, {r['s_per_step']} s/step, {r['windows']:,} windows, {r['loss']} "
                  f"softmax) + validation {r['validation_s']:.1f} s; {memory}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder of the benchmark files (default $LAYERWISE_DATA_DIR)")
    p.add_argument("--eval-dataset", default="yelp")
    p.add_argument("--train-dataset", default="beauty")
    p.add_argument("--preset", default="small", help="LLaMA preset of the recommender")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=256, help="users per scorer call in evaluate")
    p.add_argument("--train-steps", type=int, default=None, help="cap on training steps (default: 1 epoch)")
    # One thread, as bench_scale.py: on 2 cores shared with other work, 2 threads were slower.
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset, in order")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.data_dir = args.data_dir or None
    if args.stage:
        _run_stage_here(args)
        return 0
    results = {}
    for stage in args.stages.split(","):
        print(f"> {stage} ...", file=sys.stderr, flush=True)
        results[stage] = run_stage(stage, args)
    print_table(results)
    peaks = {s: r["ru_maxrss_gib"] for s, r in results.items()}
    report = {"stages": results, "target_peak_rss_gib": TARGET_RSS_GIB, "peaks_gib": peaks,
              "met": all(p <= TARGET_RSS_GIB for p in peaks.values()),
              "env": {"cpus": os.cpu_count(), "torch_threads": args.threads, "python": platform.python_version(),
                      "machine": platform.machine(), "ram_gib": round(psutil.virtual_memory().total / GIB, 1)}}
    print(json.dumps({"peaks_gib": peaks, "met": report["met"]}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
