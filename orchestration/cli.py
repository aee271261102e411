"""The `layerwise` command. Each subcommand has --help; heavy imports happen inside the subcommand.

Smallest CPU run of the whole foundation (a few seconds):
    layerwise data synth --users 300 --items 60 --interactions 6000 --out /tmp/synth
    layerwise train --dataset /tmp/synth --family llama --preset tiny --out /tmp/teacher
    layerwise evaluate --model /tmp/teacher --dataset /tmp/synth --json /tmp/metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestration import commands
from orchestration.pipeline import interrupts

DEFAULT_DATASET = "ml-100k"


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="ml-100k, a directory of RecBole atomic files, a .csv/.parquet file, or "
                             "synthetic:USERS:ITEMS:INTERACTIONS:SEED (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="where to look for ml-100k before the RecBole wheel copy and the download")
    parser.add_argument("--cache-dir", default="runs/data_cache",
                        help="Parquet cache of prepared splits (default: %(default)s)")
    parser.add_argument("--min-core", type=int, default=0, help="k-core filter; 0 disables it")


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="inspect, prepare or generate interaction data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    stats = data_sub.add_parser("stats", help="print users, items, interactions, history lengths")
    _add_data_args(stats)
    stats.add_argument("--json", default=None, help="also write the stats to this JSON file")
    prepare = data_sub.add_parser("prepare", help="read, filter, split and cache a data set")
    _add_data_args(prepare)
    synth = data_sub.add_parser("synth", help="write a learnable synthetic data set as RecBole atomic files")
    synth.add_argument("--users", type=int, default=100_000)
    synth.add_argument("--items", type=int, default=10_000)
    synth.add_argument("--interactions", type=int, default=1_000_000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--name", default="synthetic", help="file stem of the atomic files")


def _train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a teacher recommender (plain torch, CPU or GPU)")
    _add_data_args(train)
    train.add_argument("--family", default="llama", choices=["llama", "qwen3", "gpt2", "bert", "t5"])
    train.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    train.add_argument("--pretrained", default=None,
                       help="local pretrained backbone directory instead of a preset (e.g. MiniLM)")
    train.add_argument("--text-features", action="store_true",
                       help="add frozen MiniLM embeddings of item titles and genres")
    train.add_argument("--causal", action="store_true",
                       help="train a BERT as a decoder (causal mask, next item at every position) instead "
                            "of by cloze, which learns from ~20%% of positions and needs far more epochs")
    train.add_argument("--out", required=True, help="output model directory")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--max-len", type=int, default=50)
    train.add_argument("--dropout", type=float, default=None)
    train.add_argument("--loss", choices=["full", "sampled"], default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-minutes", type=float, default=None, help="wall-clock training budget")


def _evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="ranking metrics of a saved model (or mostpop) on a split")
    _add_data_args(ev)
    ev.add_argument("--model", required=True, help="model directory, or 'mostpop'")
    ev.add_argument("--json", default=None, help="write mean metrics and the protocol here")
    ev.add_argument("--per-user", default=None, help="write per-user metrics to this Parquet file")
    ev.add_argument("--stage", default="test", choices=["valid", "test"])
    ev.add_argument("--keep-seen", action="store_true",
                    help="rank already-seen items too (RecBole's sequential full sort); default excludes them")
    ev.add_argument("--sampled", type=int, default=0,
                    help="rank among N sampled negatives instead of the full catalogue (0 = full)")
    ev.add_argument("--sampling", choices=["uniform", "popularity"], default="uniform")
    ev.add_argument("--max-len", type=int, default=50)


def _score_parser(sub) -> None:
    score = sub.add_parser("score", help="layer importance of a trained model, every estimator")
    _add_data_args(score)
    score.add_argument("--model", required=True, help="trained model directory")
    score.add_argument("--methods", nargs="+", default=None,
                       help="estimators (default: all local ones plus ablation and ablation_loss)")
    score.add_argument("--json", required=True, help="write scores (method -> per-layer list) here")
    score.add_argument("--calib-batches", type=int, default=8)
    score.add_argument("--calib-batch-size", type=int, default=64)
    score.add_argument("--seed", type=int, default=0)


def _compress_parser(sub) -> None:
    comp = sub.add_parser("compress", help="keep the best k layers, bridge the gaps, heal by distillation")
    _add_data_args(comp)
    comp.add_argument("--teacher", required=True, help="trained teacher directory")
    comp.add_argument("--keep", type=float, default=0.25,
                      help="fraction of layers to keep (<= 1) or a layer count (default: %(default)s)")
    comp.add_argument("--selector", default="beam", help="layer selector (default: %(default)s)")
    comp.add_argument("--method", default=None, help="importance estimator the selector ranks by")
    comp.add_argument("--bridge-rank", type=int, default=0,
                      help="bridge adapter rank at the gaps; 0 = no bridges (default: %(default)s, measured best)")
    comp.add_argument("--trainable", choices=["bridges", "lora", "all"], default="all")
    comp.add_argument("--heal-epochs", type=int, default=20)
    comp.add_argument("--no-heal", action="store_true", help="only remove layers (bridges stay identity)")
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--out", required=True, help="output compact model directory")


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="interleaved latency, throughput, memory, FLOPs and the Amdahl bound")
    bench.add_argument("--models", nargs="+", required=True,
                       help="model directories; the first is the reference (the teacher)")
    bench.add_argument("--json", required=True, help="write the full result here")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    bench.add_argument("--runs", type=int, default=30)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")


def _plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="parameters, memory per GPU under ZeRO 0-3, importance shards and the "
                                       "DeepSpeed config of a published model shape, full and compact")
    plan.add_argument("--family", required=True, choices=["llama", "qwen3", "bert", "t5"])
    plan.add_argument("--size", required=True,
                      help="llama: 1b 3b 8b 13b; qwen3: 1.7b 4b 8b 14b; bert: base large; t5: 3b 11b")
    plan.add_argument("--keep", type=float, default=0.25,
                      help="fraction of layers to keep (<= 1) or a layer count (default: %(default)s)")
    plan.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs, ZeRO's N (default: %(default)s)")
    plan.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (default: %(default)s)")
    plan.add_argument("--n-items", type=int, default=10_000, help="catalogue size (default: %(default)s)")
    plan.add_argument("--seq-len", type=int, default=50)
    plan.add_argument("--micro-batch", type=int, default=8, help="micro batch per GPU (default: %(default)s)")
    plan.add_argument("--bridge-rank", type=int, default=16, help="bridge adapter rank; 0 = no bridges")
    plan.add_argument("--stage", type=int, default=3, choices=[0, 1, 2, 3],
                      help="ZeRO stage of the emitted DeepSpeed config (default: %(default)s)")
    plan.add_argument("--json", default=None, help="also write the plan to this JSON file")


def _baselines_parser(sub) -> None:
    base = sub.add_parser("baselines", help="every baseline under our budget, measured alike, in one table")
    _add_data_args(base)
    base.add_argument("--teacher", required=True, help="trained teacher directory")
    base.add_argument("--keep", type=float, default=0.25,
                      help="fraction of layers to keep (<= 1) or a layer count (default: %(default)s)")
    base.add_argument("--json", required=True, help="write the full table (and benchmark) here")
    base.add_argument("--md", default=None, help="also write the Markdown table here")
    base.add_argument("--only", nargs="+", default=None, metavar="NAME",
                      help="baselines to run (default: all); ours and the teacher always run")
    base.add_argument("--heal-epochs", type=int, default=20)
    base.add_argument("--trainable", choices=["bridges", "lora", "all"], default="all")
    base.add_argument("--bridge-rank", type=int, default=0, help="as `layerwise compress` (default: %(default)s)")
    base.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                      help="random-layer draws; the first seeds every other method")
    base.add_argument("--runs", type=int, default=30, help="interleaved benchmark rounds")
    base.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")


def _tune_parser(sub) -> None:
    from orchestration.search.tuning import add_arguments  # light: yaml + rich, no torch/ray

    add_arguments(sub.add_parser("tune", help="search depth, bridges, selector and healing with Ray Tune + "
                                              "Optuna; register the Pareto front and promote a champion"))


def _serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="deploy a compact recommender over HTTP with Ray Serve")
    srv.add_argument("--model", default=None,
                     help="model directory or MLflow URI (default: models:/layerwise-compact@champion)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1)
    srv.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per replica")
    srv.add_argument("--dataset", default=None, help="catalogue data set (default: the model's own)")
    srv.add_argument("--tracking-uri", default="runs",
                     help="MLflow store for models:/ URIs: a run directory or a URI (default: %(default)s)")


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="the main job: data -> teacher -> evaluate, next to MostPop")
    run.add_argument("config", nargs="?", default=None, help="YAML config (default: embedded defaults)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=20")


def _study_parser(sub) -> None:
    study = sub.add_parser(
        "study", help="ours vs every baseline over seeds, with ablation, k sweep, noise, slices and a report",
        description="Seeds run in parallel as Ray tasks; every stage resumes. Writes runs/<name>/report/"
                    "report.md and report.html and logs them to MLflow. Example at tiny size: layerwise study "
                    "seeds=[0,1] data.dataset=synthetic:300:60:6000:0 teacher.preset=tiny "
                    "teacher.train.epochs=3 compress.heal.epochs=1 sweep.heal_epochs=1")
    study.add_argument("config", nargs="?", default=None,
                       help="YAML config (default: embedded defaults: ml-100k, small LLaMA, 5 seeds)")
    study.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1] sweep.ks=[1,2]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Layer-wise depth compression of transformer recommenders, measured honestly.")
    sub = parser.add_subparsers(dest="command", required=True)
    _data_parser(sub)
    _train_parser(sub)
    _evaluate_parser(sub)
    _score_parser(sub)
    _compress_parser(sub)
    _bench_parser(sub)
    _serve_parser(sub)
    _plan_parser(sub)
    _baselines_parser(sub)
    _tune_parser(sub)
    sub.add_parser("bench-serve", add_help=False,
                   help="load benchmark of the served compact model against the teacher "
                        "(see `layerwise bench-serve --help`)")
    _run_parser(sub)
    _study_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-serve"]:
        from serve.loadtest import main as loadtest_main

        return loadtest_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler = {
        "data": commands.data, "train": commands.train, "evaluate": commands.evaluate,
        "score": commands.score, "compress": commands.compress, "bench": commands.bench,
        "serve": commands.serve, "plan": commands.plan, "baselines": commands.baselines,
        "tune": commands.tune,
        "run": commands.run, "study": commands.study,
    }[args.command]
    if args.command in ("run", "study"):  # resumable stage runs: a Ctrl-C must stop them (see interrupts)
        interrupts.install()
    try:
        return handler(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"layerwise {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
