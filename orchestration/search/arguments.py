"""The `layerwise tune` command-line arguments, kept free of torch, Ray and MLflow so that building the
`layerwise` parser (and `--help`) stays fast; `orchestration.search.tuning` runs the search."""

from __future__ import annotations

import argparse

OBJECTIVES = ("single", "pareto")
SPEED_METRICS = {"speedup": "max", "latency_ms": "min"}  # the second Pareto objective and its direction


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `layerwise tune` arguments (also `python -m orchestration.search.tuning`)."""
    parser.add_argument("space", help="search space YAML, e.g. tune_spaces/llama.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value changes to the YAML, right after it (before the options), "
                             "e.g. teacher.preset=tiny space.heal_epochs=1")
    parser.add_argument("--samples", type=int, default=16, help="trials in all (default: %(default)s)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="single",
                        help="single: TPE on retention; pareto: NSGA-II on retention and speed")
    parser.add_argument("--speed-metric", choices=sorted(SPEED_METRICS), default="speedup",
                        help="the second Pareto objective (default: %(default)s)")
    parser.add_argument("--teacher", default=None, help="trained teacher directory (default: train the "
                                                        "YAML's teacher once before the search)")
    parser.add_argument("--min-retention", type=float, default=None,
                        help="champion = fastest front model with at least this NDCG@10 retention")
    parser.add_argument("--run-dir", default=None, help="default: runs/tune-<space name>-<objective>")
    parser.add_argument("--fresh", action="store_true", help="refuse to resume a search found in --run-dir")
    parser.add_argument("--distributed-heal", action="store_true",
                        help="heal every trial on Ray Train + DeepSpeed (2 CPU workers) instead of in the trial")
    parser.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: by CPUs)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="where the teacher and the trials run: auto, cpu, cuda or cuda:N; a GPU gives each "
                             "trial a share of one (default: the YAML's device:, auto)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite in --run-dir)")
    parser.add_argument("--registered-model", default="layerwise-compact")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: embedded Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray")
    parser.add_argument("--object-store-mb", type=int, default=None, help="object store of the embedded Ray")
    return parser
