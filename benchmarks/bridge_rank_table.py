"""Test NDCG@10 of one kept layer set healed with bridges of several ranks (0 = no bridge), same budget.

    python benchmarks/bridge_rank_table.py --teacher runs/default/teacher-*/model --kept 0 3 \
        --ranks 0 4 16 32 --json runs/bridge_ranks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layerwise.compression.compact import build_compact
from layerwise.data import load_dataset
from layerwise.compression.distill import HealConfig, heal
from layerwise.evaluation.evaluate import evaluate
from layerwise.models.checkpoint import load_recommender, read_manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--kept", type=int, nargs="+", required=True)
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 4, 16, 32])
    parser.add_argument("--heal-epochs", type=int, default=6)
    parser.add_argument("--cache-dir", default="runs/data_cache")
    parser.add_argument("--data-dir", default=None, help="local data folder (default $LAYERWISE_DATA_DIR)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    manifest = read_manifest(args.teacher)
    data = load_dataset(manifest["dataset"], data_dir=args.data_dir, cache_dir=args.cache_dir)
    teacher = load_recommender(args.teacher).eval()
    max_len = manifest.get("max_len", 50)
    teacher_ndcg = evaluate(teacher.score, data, stage="test", max_len=max_len).means["ndcg@10"]
    rows = []
    for rank in args.ranks:
        student = build_compact(teacher, args.kept, rank)
        result = heal(student, teacher, data, HealConfig(epochs=args.heal_epochs, max_len=max_len),
                      progress=False)
        ndcg = evaluate(student.eval().score, data, stage="test", max_len=max_len).means["ndcg@10"]
        rows.append({"rank": rank, "test_ndcg@10": ndcg, "retention": ndcg / teacher_ndcg,
                     "valid_ndcg@10": result.best_valid["ndcg@10"], "best_epoch": result.best_epoch})
        print(f"rank {rank:>3}: test NDCG@10 {ndcg:.4f} ({ndcg / teacher_ndcg:.1%} of the teacher)", flush=True)
    Path(args.json).write_text(json.dumps({"teacher_test_ndcg@10": teacher_ndcg, "kept": args.kept,
                                           "heal_epochs": args.heal_epochs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
