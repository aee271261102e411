"""Time teacher training steps with each batch run in length groups against the same batch in one call.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_grouping.py --data-dir ../shared/data/amazon-yelp \
        --datasets beauty,ml-100k --steps 30 --json benchmarks/results/padding_trim.json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_grouping.py --datasets synthetic:300:60:6000:0 \
        --preset tiny --steps 3  # smoke, seconds

Three ways to run one random batch of --batch windows (`layerwise.training.train` draws them so), each on its own
copy of the pipeline's small LLaMA (same initial weights, its own AdamW):

  grouped   `layerwise.training.train.batch_loss`: groups of similar length, each with its shared padding cut
            (layerwise.data.batching.split_by_length, GROUP_OVERHEAD)
  trimmed   one group: only the padding shared by all the batch's rows is cut (overhead = inf)
  padded    the whole left-padded batch in one call, as before any cutting

The three step in turn on the same batches, their order rotating each step, in one process on one torch
thread, so a busy machine slows all of them alike; the ratios are the figures to read, next to the load
average. Before training, the three losses and gradients of the first batch are compared without dropout:
they are the same loss computed three ways, so they agree to float rounding.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("grouped", "trimmed", "padded")


def _groups(x: torch.Tensor, y: torch.Tensor, variant: str) -> list:
    from layerwise.data.batching import GROUP_OVERHEAD, split_by_length

    if variant == "padded":
        return [(0, x, y)]
    return split_by_length(x, y, GROUP_OVERHEAD if variant == "grouped" else math.inf)


def _loss(model, x, y, config, generator, variant: str) -> torch.Tensor:
    """The batch's mean next-item loss over its targets, run as `variant` says; x, y: (B, T)."""
    from layerwise.data.batching import mean_over_groups
    from layerwise.training.train import next_item_loss

    return mean_over_groups(_groups(x, y, variant), lambda start, gx, gy: next_item_loss(
        model, model.encode(gx, start=start), gy, config, generator))


def _first_batch_check(model, x, y, config) -> dict:
    """Loss and gradients of one batch, dropout off, each variant against the padded batch; and the
    grouped variant against `batch_loss` itself, so the timed path is the library's."""
    from layerwise.training.train import batch_loss

    model = copy.deepcopy(model).eval()
    losses, grads = {}, {}
    for variant in VARIANTS:
        model.zero_grad(set_to_none=True)
        loss = _loss(model, x, y, config, torch.Generator(), variant)
        loss.backward()
        losses[variant] = loss.item()
        grads[variant] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    library = batch_loss(model, x, y, config, torch.Generator()).item()

    def grad_gap(variant):
        return max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
                   for a, b in zip(grads[variant], grads["padded"]))

    return {"loss": {v: round(losses[v], 6) for v in VARIANTS},
            "loss_abs_diff_vs_padded": {v: float(f"{abs(losses[v] - losses['padded']):.2e}") for v in VARIANTS[:2]},
            "grad_max_rel_diff_vs_padded": {v: float(f"{grad_gap(v):.2e}") for v in VARIANTS[:2]},
            "library_batch_loss_equals_grouped": library == losses["grouped"]}


def bench(name: str, args) -> dict:
    """`args.steps` training steps of each variant on the same random batches of `name`'s windows."""
    from layerwise.data import load_dataset
    from layerwise.models.factory import build_recommender
    from layerwise.training.train import TrainConfig, training_windows

    load_start = os.getloadavg()
    data = load_dataset(name, data_dir=args.data_dir, progress=False)
    config = TrainConfig(seed=args.seed, batch_size=args.batch)  # the default recipe: full softmax
    base = build_recommender(data, "llama", args.preset, max_len=config.max_len, dropout=0.1, seed=args.seed)
    inputs, targets = training_windows(data, config.max_len, base.causal)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(args.seed))
    batches = [order[i:i + args.batch] for i in range(0, len(order), args.batch)][:args.steps]
    check = _first_batch_check(base, inputs[batches[0]], targets[batches[0]], config)

    models = {v: copy.deepcopy(base).train() for v in VARIANTS}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=config.lr, weight_decay=config.weight_decay)
                  for v, m in models.items()}
    seconds, losses = {v: 0.0 for v in VARIANTS}, {v: 0.0 for v in VARIANTS}
    cells = {v: 0 for v in VARIANTS}
    n_groups = 0
    for step, idx in enumerate(batches):
        x, y = inputs[idx], targets[idx]
        for k in range(len(VARIANTS)):
            variant = VARIANTS[(step + k) % len(VARIANTS)]  # rotate who goes first
            model, optimizer = models[variant], optimizers[variant]
            started = time.perf_counter()
            loss = _loss(model, x, y, config, torch.Generator(), variant)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            seconds[variant] += time.perf_counter() - started
            losses[variant] += loss.item()
        for variant in VARIANTS:
            groups = _groups(x, y, variant)
            cells[variant] += sum(gx.numel() for _, gx, _ in groups)
            n_groups += len(groups) if variant == "grouped" else 0
        print(f"  {name} step {step + 1}/{len(batches)}: " + ", ".join(
            f"{v} {seconds[v]:.1f} s" for v in VARIANTS), file=sys.stderr, flush=True)
    steps = len(batches)
    real = sum(int((inputs[idx] != 0).sum()) for idx in batches)
    return {"dataset": data.name, "windows": len(inputs), "batch_size": args.batch, "steps": steps,
            "preset": args.preset, "first_batch": check,
            "s_per_step": {v: round(seconds[v] / steps, 4) for v in VARIANTS},
            "steps_per_s": {v: round(steps / seconds[v], 3) for v in VARIANTS},
            "speedup_grouped_vs_padded": round(seconds["padded"] / seconds["grouped"], 2),
            "speedup_grouped_vs_trimmed": round(seconds["trimmed"] / seconds["grouped"], 2),
            "speedup_trimmed_vs_padded": round(seconds["padded"] / seconds["trimmed"], 2),
            "cells_vs_padded": {v: round(cells[v] / cells["padded"], 3) for v in VARIANTS},
            "real_cell_fraction_padded": round(real / cells["padded"], 3),
            "groups_per_batch": round(n_groups / steps, 2),
            "mean_train_loss": {v: round(losses[v] / steps, 4) for v in VARIANTS},
            "load_avg_start": [round(a, 2) for a in load_start],
            "load_avg_end": [round(a, 2) for a in os.getloadavg()]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder of the benchmark files (default $LAYERWISE_DATA_DIR)")
    p.add_argument("--datasets", default="beauty,ml-100k", help="comma-separated load_dataset names")
    p.add_argument("--preset", default="small", help="LLaMA preset (the pipeline's teacher is small)")
    p.add_argument("--steps", type=int, default=30, help="batches per variant")
    p.add_argument("--batch", type=int, default=128, help="windows per batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here (under the key 'exact_grouping'; the "
                   "file's other keys are kept)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {name: bench(name, args) for name in args.datasets.split(",")}
    for r in results.values():
        print(f"{r['dataset']}: {r['steps']} steps of {r['batch_size']}: s/step " + ", ".join(
            f"{v} {r['s_per_step'][v]}" for v in VARIANTS) + f"; grouped {r['speedup_grouped_vs_padded']}x "
            f"padded, {r['speedup_grouped_vs_trimmed']}x trimmed; cells vs padded {r['cells_vs_padded']}; "
            f"first-batch loss {r['first_batch']['loss']}; load {r['load_avg_start'][0]}-{r['load_avg_end'][0]}")
    if args.json:
        report = json.loads(args.json.read_text()) if args.json.exists() else {}
        report["exact_grouping"] = {"what": __doc__.splitlines()[0], "command": " ".join(sys.argv),
                                    "torch_threads": args.threads, "cpus": os.cpu_count(), "runs": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
