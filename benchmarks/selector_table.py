"""NDCG@10 of every selector at one keep ratio, unhealed and healed with the same budget.

    python benchmarks/selector_table.py --teacher runs/default/teacher-*/model --keep 0.25 \
        --json runs/selectors.json --md runs/selectors.md

Importance scores and the dependency matrix are computed once on the teacher and shared by every
selector, so the selectors differ only in how they pick. Each compact model is healed with exactly the
same HealConfig (epochs, data, trainable set) and evaluated on the test split (full ranking, seen items
excluded). `random` is drawn with several seeds and reported as mean and spread. With --heal-seeds N,
every selector is healed N times (seeds 0..N-1: bridge initialisation and healing order), and each one is
compared with the first selector by a paired t-test over those seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from layerwise.compression.compact import build_compact
from layerwise.compression.compress import SELECTOR_METHOD, calibration_batches, n_kept, select_layers
from layerwise.data import load_dataset
from layerwise.compression.dependency import dependency_matrix
from layerwise.compression.distill import HealConfig, heal
from layerwise.evaluation.evaluate import evaluate
from layerwise.compression.importance import IMPORTANCE, LOCAL_METHODS, compute_importance
from layerwise.models.checkpoint import load_recommender, read_manifest

SELECTORS = ("beam", "greedy", "topk", "contiguous", "uniform", "first", "last", "random")


def shared_scores(teacher, data, batches) -> dict[str, torch.Tensor]:
    """Every estimator the selectors use, computed once."""
    scores = compute_importance(teacher, batches, LOCAL_METHODS)
    scores["ablation"] = IMPORTANCE["ablation"](teacher, batches, data=data)
    scores["ablation_loss"] = IMPORTANCE["ablation_loss"](teacher, batches, data=data)
    scores["dependency"] = dependency_matrix(teacher, batches, data=data, metric="loss")
    return scores


def test_metrics(model, data, max_len: int) -> dict[str, float]:
    means = evaluate(model.eval().score, data, stage="test", max_len=max_len).means
    return {k: means[k] for k in ("ndcg@10", "mrr", "hr@10")}


def run_selector(teacher, data, selector: str, k: int, seed: int, scores, batches, heal_config,
                 bridge_rank: int, max_len: int) -> dict:
    kept, _ = select_layers(teacher, data, k, selector, None, batches, seed=seed, precomputed=scores)
    student = build_compact(teacher, kept, bridge_rank, seed=seed)
    row = {"selector": selector, "seed": seed, "kept": kept,
           "unhealed": test_metrics(build_compact(teacher, kept, 0), data, max_len)}
    started = time.perf_counter()
    result = heal(student, teacher, data, replace(heal_config, seed=seed), progress=False)
    row.update(healed=test_metrics(student, data, max_len), heal_epochs=result.best_epoch,
               heal_seconds=time.perf_counter() - started)
    print(f"{selector:>10} seed {seed}: kept {kept} unhealed {row['unhealed']['ndcg@10']:.4f} "
          f"healed {row['healed']['ndcg@10']:.4f}", flush=True)
    return row


def markdown(rows: list[dict], teacher: dict) -> str:
    from layerwise.evaluation.stats import seed_test

    lines = [f"teacher test NDCG@10 {teacher['ndcg@10']:.4f}, MRR {teacher['mrr']:.4f}", "",
             "| selector | kept | NDCG@10 unhealed | NDCG@10 healed | retention healed | MRR healed | "
             "p vs first row (paired t over seeds) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    by_selector: dict[str, list[dict]] = {}
    for row in rows:
        by_selector.setdefault(row["selector"], []).append(row)
    reference = {r["seed"]: r["healed"]["ndcg@10"] for r in next(iter(by_selector.values()))}
    for selector, group in by_selector.items():
        un = np.array([r["unhealed"]["ndcg@10"] for r in group])
        he = np.array([r["healed"]["ndcg@10"] for r in group])
        mrr = np.array([r["healed"]["mrr"] for r in group])
        spread = lambda a: f"{a.mean():.4f}" + (f" ± {a.std(ddof=1):.4f}" if len(a) > 1 else "")
        kept = group[0]["kept"] if len({tuple(r["kept"]) for r in group}) == 1 else f"{len(group)} draws"
        paired = [(reference[r["seed"]], r["healed"]["ndcg@10"]) for r in group if r["seed"] in reference]
        p = "-" if len(paired) < 2 or group is next(iter(by_selector.values())) else \
            f"{seed_test([a for a, _ in paired], [b for _, b in paired]).p_value:.3f}"
        lines.append(f"| {selector} | {kept} | {spread(un)} | {spread(he)} | "
                     f"{he.mean() / teacher['ndcg@10']:.1%} | {spread(mrr)} | {p} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--bridge-rank", type=int, default=16)
    parser.add_argument("--heal-epochs", type=int, default=20)
    parser.add_argument("--random-draws", type=int, default=5)
    parser.add_argument("--heal-seeds", type=int, default=1, help="heal every selector with seeds 0..N-1")
    parser.add_argument("--selectors", nargs="+", default=list(SELECTORS))
    parser.add_argument("--cache-dir", default="runs/data_cache")
    parser.add_argument("--data-dir", default=None, help="local data folder (default $LAYERWISE_DATA_DIR)")
    parser.add_argument("--json", required=True)
    parser.add_argument("--md", default=None)
    args = parser.parse_args(argv)
    manifest = read_manifest(args.teacher)
    data = load_dataset(manifest["dataset"], data_dir=args.data_dir, cache_dir=args.cache_dir)
    teacher = load_recommender(args.teacher).eval()
    max_len = manifest.get("max_len", 50)
    k = n_kept(args.keep, teacher.n_layers)
    batches = calibration_batches(teacher, data, 8, 64, max_len, seed=0)
    # Selectors that rank by nothing (uniform, first, last, random) need no scores at all.
    needs_scores = any(SELECTOR_METHOD[s] for s in args.selectors)
    scores = shared_scores(teacher, data, batches) if needs_scores else {}
    heal_config = HealConfig(epochs=args.heal_epochs, max_len=max_len)
    teacher_metrics = test_metrics(teacher, data, max_len)
    rows = []
    for selector in args.selectors:
        seeds = range(max(args.random_draws, args.heal_seeds)) if selector == "random" else range(args.heal_seeds)
        for seed in seeds:
            rows.append(run_selector(teacher, data, selector, k, seed, scores, batches, heal_config,
                                     args.bridge_rank, max_len))
    out = {"teacher": teacher_metrics, "k": k, "n_layers": teacher.n_layers, "bridge_rank": args.bridge_rank,
           "heal": asdict(heal_config), "scores": {n: v.tolist() for n, v in scores.items()}, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    table = markdown(rows, teacher_metrics)
    print(table)
    if args.md:
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
