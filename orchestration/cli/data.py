"""`layerwise data stats|prepare|synth`, and the data-set arguments every command that reads data shares.

    layerwise data synth --users 300 --items 60 --interactions 6000 --out /tmp/synth
    layerwise data stats --dataset /tmp/synth
    layerwise data stats --benchmarks --data-dir ../shared/data/amazon-yelp --json /tmp/benchmarks.json
"""

from __future__ import annotations

import argparse
import sys
import time

from orchestration.outputs import write_json

DEFAULT_DATASET = "ml-100k"


def add_device_arg(parser) -> None:
    """`--device auto|cpu|cuda[:N]` (layerwise.device), the same on every command that runs a model. The
    help is written out here: importing layerwise.device would import torch for every --help."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="where models run: auto (CUDA when a GPU is visible, else CPU), cpu, cuda or "
                             "cuda:N; on CUDA the layers take bf16 autocast where the card has it "
                             "(default: %(default)s)")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """--dataset, --data-dir, --cache-dir and --min-core, read back by `load_data`."""
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="ml-100k; beauty, sports, toys or yelp (the sequential benchmarks of S3Rec, "
                             "ICLRec, DuoRec); seqfile:PATH (one line per user: user item item ...); a "
                             "directory of RecBole atomic files; a .csv/.parquet file; or "
                             "synthetic:USERS:ITEMS:INTERACTIONS:SEED (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="a local folder searched first for ml-100k and for beauty|sports|toys|yelp "
                             "(their files, or an amazon-yelp/ subfolder), and for a relative seqfile:PATH "
                             "(default: $LAYERWISE_DATA_DIR); then a cache or the RecBole wheel, then a "
                             "download")
    parser.add_argument("--cache-dir", default="runs/data_cache",
                        help="Parquet cache of prepared splits (default: %(default)s)")
    parser.add_argument("--min-core", type=int, default=0, help="k-core filter; 0 disables it")


def load_data(args: argparse.Namespace):
    """The data set named by `add_data_args`' arguments (a `layerwise.data.SequenceData`)."""
    from layerwise.data import load_dataset

    return load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                        min_core=args.min_core)


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="inspect, prepare or generate interaction data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser("stats", help="print users, items, interactions, history lengths")
    add_data_args(stats)
    stats.add_argument("--benchmarks", action="store_true",
                       help="instead of --dataset: the table of beauty, sports, toys and yelp (users, items, "
                            "interactions as read, checked against the published figures)")
    stats.add_argument("--json", default=None, help="also write the stats to this JSON file")
    prepare = data_sub.add_parser("prepare", help="read, filter, split and cache a data set")
    add_data_args(prepare)
    synth = data_sub.add_parser("synth", help="write a learnable synthetic data set as RecBole atomic files")
    synth.add_argument("--users", type=int, default=100_000)
    synth.add_argument("--items", type=int, default=10_000)
    synth.add_argument("--interactions", type=int, default=1_000_000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--name", default="synthetic", help="file stem of the atomic files")


def data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from layerwise.data import generate_synthetic, write_atomic

        started = time.perf_counter()
        inter = generate_synthetic(args.users, args.items, args.interactions, seed=args.seed)
        path = write_atomic(inter, args.out, args.name)
        print(f"wrote {len(inter.user):,} interactions to {path} in {time.perf_counter() - started:.1f}s")
        return 0
    if getattr(args, "benchmarks", False):
        return benchmark_stats(args)
    from layerwise.data import dataset_stats

    dataset = load_data(args)
    stats = dataset_stats(dataset)
    for key, value in stats.items():
        print(f"{key:>24}: {value}")
    if getattr(args, "json", None):
        write_json(args.json, stats)
    return 0


def benchmark_stats(args: argparse.Namespace) -> int:
    """`data stats --benchmarks`: the four files' table; exit status 1 if one differs from the papers."""
    from layerwise.data import benchmark_stats as read_stats, format_stats_table

    rows = read_stats(data_dir=args.data_dir)
    print(format_stats_table(rows))
    for row in rows:
        if not row["matches"]:
            print(f"{row['file']}: read {row['users']:,}/{row['items']:,}/{row['interactions']:,} users/items/"
                  f"interactions, the papers give {row['published']}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"benchmarks": rows})
    return 0 if all(row["matches"] for row in rows) else 1


HANDLERS = {"data": data}
