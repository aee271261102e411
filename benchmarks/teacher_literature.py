"""Train a teacher on one of the literature's data sets and report its test metrics beside MostPop's, both
from the same evaluation code (full ranking, history excluded, HR and NDCG@5/10/20).

    PYTHONPATH=. .venv/bin/python benchmarks/teacher_literature.py --dataset beauty \
        --data-dir ../shared/data/amazon-yelp --recipe studies/recipes/beauty.yaml \
        --json benchmarks/results/teacher-beauty.json
    PYTHONPATH=. .venv/bin/python benchmarks/teacher_literature.py --dataset toys teacher.train.epochs=2  # smoke

The recipe is a pipeline config's `teacher` section (`layerwise run` reads the same file): without
--recipe, the pipeline's default small LLaMA (8 layers, 64 wide, dropout 0.1, full softmax, AdamW lr 1e-3,
batch 128, histories of 50). key=value overrides change it (teacher.dropout=0.3, teacher.train.lr=3e-3).
Training has an epoch budget (teacher.train.epochs) and early stopping on validation NDCG@10 (every
eval_every epochs, patience validations); never a wall-clock cap, so a busy machine changes the time and
not the model. Choose between recipes by `best_valid` only; the test metrics are reported, not tuned on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from layerwise.baselines.popularity import mostpop_scorer
from layerwise.data import LITERATURE_METRICS, dataset_stats, load_dataset
from layerwise.evaluation.evaluate import evaluate
from layerwise.perf.memory import peak_rss_bytes
from layerwise.models.checkpoint import save_recommender
from layerwise.models.factory import build_recommender
from layerwise.training.train import train_recommender
from orchestration.pipeline.config import load_config

REPORTED = (*LITERATURE_METRICS, "mrr")


def test_metrics(scorer, data, max_len: int) -> dict[str, float]:
    """The literature's metrics on the test split: full ranking over all items, the history excluded."""
    result = evaluate(scorer, data, stage="test", max_len=max_len)
    return {k: round(result.means[k], 5) for k in REPORTED}


def timed_test(model, data, max_len: int) -> dict:
    """The teacher's test metrics, with the wall time of that full-ranking pass over all users and the
    process's peak RSS so far (training included: an upper bound on the evaluation's own)."""
    started = time.perf_counter()
    metrics = test_metrics(model.score, data, max_len)
    return {"teacher_test": metrics, "test_eval_s": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)}


def run(args) -> dict:
    data = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, progress=False)
    teacher = load_config(args.recipe, args.overrides).teacher
    max_len = 50
    config = replace(teacher.train, seed=args.seed, max_len=max_len, max_minutes=None)
    model = build_recommender(data, teacher.family, teacher.preset, max_len=max_len, dropout=teacher.dropout,
                              seed=args.seed)
    load_before, started = os.getloadavg()[0], time.perf_counter()
    # With --out, an interrupted run resumes from its last epoch (OUT-checkpoint/; layerwise.training.resume), and the
    # training time is then the epochs' own (train_s counts only this call).
    checkpoint = args.out.parent / f"{args.out.name}-checkpoint" if args.out else None
    result = train_recommender(model, data, config, progress=not args.quiet, checkpoint=checkpoint)
    train_s = time.perf_counter() - started
    if result.resumed_after is not None:
        train_s = result.seconds
    epochs = len(result.history)
    model.eval()
    report = {
        "dataset": args.dataset, "data": {k: v for k, v in dataset_stats(data).items() if k != "protocol"},
        "recipe": {"file": args.recipe, "overrides": args.overrides, "family": teacher.family,
                   "preset": teacher.preset, "dropout": teacher.dropout, "train": asdict(config)},
        "threads": torch.get_num_threads(), "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "train_s": round(train_s, 1), "epochs": epochs, "s_per_epoch": round(train_s / max(epochs, 1), 1),
        "best_epoch": result.best_epoch, "best_valid": result.best_valid,
        "stopped_by": "epoch budget" if epochs >= config.epochs else "early stopping (patience)",
        **timed_test(model, data, max_len),
        "mostpop_test": test_metrics(mostpop_scorer(data), data, max_len),
        "history": result.history,
    }
    if args.out:
        save_recommender(model, args.out, {"kind": "teacher", "preset": teacher.preset, "dataset": args.dataset,
                                           "data_fingerprint": data.fingerprint, "max_len": max_len,
                                           "train": result.config, "best_epoch": result.best_epoch})
    return report


def print_report(report: dict) -> None:
    print(f"{report['dataset']}: {report['epochs']} epochs in {report['train_s'] / 60:.1f} min "
          f"({report['s_per_epoch']} s/epoch incl. validation), best validation epoch {report['best_epoch']} "
          f"(NDCG@10 {report['best_valid']['ndcg@10']:.4f}), stopped by {report['stopped_by']}")
    print(f"{'':<10}" + "".join(f"{k:>10}" for k in REPORTED))
    for row in ("teacher_test", "mostpop_test"):
        print(f"{row.split('_')[0]:<10}" + "".join(f"{report[row][k]:>10.4f}" for k in REPORTED))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="beauty", help="beauty, sports, toys, yelp, or seqfile:PATH")
    p.add_argument("--data-dir", default=None, help="folder of the files (default $LAYERWISE_DATA_DIR)")
    p.add_argument("--cache-dir", default=None, help="split cache (default $LAYERWISE_CACHE_DIR; none if unset)")
    p.add_argument("--recipe", default=None, help="a pipeline YAML whose `teacher` section is the recipe")
    p.add_argument("overrides", nargs="*", help="key=value changes to the recipe, e.g. teacher.dropout=0.3")
    p.add_argument("--seed", type=int, default=0)
    # One thread: on 2 cores shared with other work, two threads wait on each other (bench_scale.py).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="save the trained teacher here")
    p.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args)
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
