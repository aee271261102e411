"""What the `ablation` estimator (validation NDCG@10 lost when each layer goes) costs on the SmolLM2-135M
recommender (30 layers) on ml-100k, gated against prefix reuse (`layerwise.compression.dependency.removal_ndcg`), and
whether the two give the same values. The study's importance stage runs it on 512 validation users.

    PYTHONPATH=. .venv/bin/python benchmarks/ablation_prefix.py --users 128 \
        --json benchmarks/results/ablation_prefix.json

Gated: for each layer, the layer gated off and `evaluate` run on the users (31 evaluations of 30 layers).
Prefix reuse: per batch of users one full forward that keeps each layer's input, then for each layer the
run from its input without it (about half the layer forwards). The model is the pretrained backbone,
untrained as a recommender, with title-initialised item vectors (so that its ranks carry signal and the
values compared are not all zero; training changes the weights, not the cost); float32, the torch threads
given by --threads. The two are timed one after the other in one process, the load average
recorded at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def measure(users: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from layerwise.data import load_dataset
    from layerwise.compression.dependency import removal_ndcg
    from layerwise.models.factory import build_recommender
    from layerwise.models.llm import LLMSetup
    from layerwise.compression.tracing import metric_with_removed, sample_users

    data = load_dataset("ml-100k")
    model = build_recommender(data, "llama", pretrained="smollm2-135m", dropout=0.0,
                              llm=LLMSetup(finetune="frozen", item_init="title_tokens")).eval()
    picked = sample_users(data, users, seed=0)
    load_start = os.getloadavg()
    started = time.perf_counter()
    gated = {frozenset(): metric_with_removed(model, [], "ndcg@10", data=data, users=picked)}
    for layer in range(model.n_layers):
        gated[frozenset({layer})] = metric_with_removed(model, [layer], "ndcg@10", data=data, users=picked)
    gated_s = time.perf_counter() - started
    started = time.perf_counter()
    reused = removal_ndcg(model, data, picked)
    reused_s = time.perf_counter() - started
    differ = sorted(sorted(k) for k in gated if gated[k] != reused[k])
    return {"model": "smollm2-135m", "layers": model.n_layers, "users": users, "threads": threads,
            "gated_seconds": gated_s, "prefix_reuse_seconds": reused_s, "speedup": gated_s / reused_s,
            "identical_values": not differ, "differing_removals": differ,
            "ndcg@10_full": gated[frozenset()], "distinct_values": len(set(gated.values())),
            "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=128, help="validation users evaluated (the study: 512)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.users < 1 or args.threads < 1:
        parser.error("--users and --threads must be at least 1")
    row = measure(args.users, args.threads)
    print(json.dumps(row, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
