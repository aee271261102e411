"""`layerwise train|evaluate|score|compress|bench`: one step of the method on one model, in this process.

Smallest CPU run (tiny synthetic data, seconds):
    layerwise train --dataset synthetic:300:60:6000:0 --family llama --preset tiny --out /tmp/teacher
    layerwise evaluate --model /tmp/teacher --dataset synthetic:300:60:6000:0 --json /tmp/metrics.json
    layerwise compress --teacher /tmp/teacher --dataset synthetic:300:60:6000:0 --keep 0.5 --out /tmp/compact
    layerwise bench --models /tmp/teacher /tmp/compact --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from layerwise.perf.guard import REMEASURES
from orchestration.cli.data import add_data_args, add_device_arg, load_data
from orchestration.cli.teacher import Registry
from orchestration.outputs import METRIC_COLUMNS, print_metrics_table, write_json


def add_parsers(sub) -> None:
    _train_parser(sub)
    _evaluate_parser(sub)
    _score_parser(sub)
    _compress_parser(sub)
    _bench_parser(sub)


def _train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a teacher recommender (plain torch, on --device)")
    add_data_args(train)
    add_device_arg(train)
    train.add_argument("--family", default=None, metavar="FAMILY",
                       choices=Registry("layerwise.models.families", "FAMILIES"),
                       help="backbone architecture of a preset: %(choices)s (default: llama; with --pretrained "
                            "the checkpoint's own, which --family may only repeat)")
    train.add_argument("--preset", default=None, choices=["tiny", "small", "base"], help="(default: small)")
    train.add_argument("--pretrained", default=None,
                       help="a pretrained backbone instead of a preset: a known LLM name (`layerwise models "
                            "list`), a GGUF file, a local Hugging Face directory, or minilm. A decoder LLM "
                            "trains with its recipe (--recipe) unless a flag says otherwise")
    train.add_argument("--recipe", default=None,
                       help="the teacher settings of a recipe: a name in studies/recipes/ (smollm2, beauty) or "
                            "a YAML file; flags given still win. Default: a pretrained decoder LLM's own "
                            "recipe (smollm2 when none names it), else none; 'none' turns it off")
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
    train.add_argument("--head", choices=["dot", "cos"], default=None,
                       help="score items by dot product, or by cosine times a learned temperature "
                            "(default: the recipe's, else dot)")
    train.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                       help="learning-rate schedule over the planned epochs")
    train.add_argument("--warmup", type=float, default=None, help="linear warm-up, a fraction of the steps")
    train.add_argument("--autocast", choices=["bf16", "fp32"], default=None,
                       help="bf16 autocast of the layers (default: bf16 on a GPU that has it, else none); "
                            "fp32: never")
    _llm_args(train)


def _llm_args(parser) -> None:
    """The LLMSetup fields, for a pretrained decoder LLM (layerwise.models.llm)."""
    llm = parser.add_argument_group("pretrained LLM recommender (with --pretrained on a decoder LLM)")
    llm.add_argument("--finetune", choices=["lora", "full", "frozen"], default=None)
    llm.add_argument("--lora-rank", type=int, default=None)
    llm.add_argument("--llm-layers", type=int, default=None, dest="n_layers",
                     help="keep only the first N pretrained layers")
    llm.add_argument("--item-init", choices=["random", "title_hidden", "title_tokens"], default=None)
    llm.add_argument("--item-std", type=float, default=None)
    llm.add_argument("--item-scale", choices=["std", "row_norm"], default=None)
    llm.add_argument("--input-norm", choices=["none", "token"], default=None)
    llm.add_argument("--layer-init", choices=["pretrained", "random"], default=None)
    llm.add_argument("--gradient-checkpointing", action="store_true", default=None)


def _evaluate_parser(sub) -> None:
    ev = sub.add_parser("evaluate", help="ranking metrics of a saved model (or mostpop) on a split")
    add_data_args(ev)
    add_device_arg(ev)
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
    add_data_args(score)
    add_device_arg(score)
    score.add_argument("--model", required=True, help="trained model directory")
    score.add_argument("--methods", nargs="+", default=None,
                       help="estimators (default: all local ones plus ablation and ablation_loss)")
    score.add_argument("--json", required=True, help="write scores (method -> per-layer list) here")
    score.add_argument("--calib-batches", type=int, default=8)
    score.add_argument("--calib-batch-size", type=int, default=64)
    score.add_argument("--seed", type=int, default=0)


def _compress_parser(sub) -> None:
    comp = sub.add_parser("compress", help="keep the best k layers, bridge the gaps, heal by distillation")
    add_data_args(comp)
    add_device_arg(comp)
    comp.add_argument("--teacher", required=True, help="trained teacher directory")
    comp.add_argument("--keep", type=float, default=0.25,
                      help="fraction of layers to keep (<= 1) or a layer count (default: %(default)s)")
    comp.add_argument("--selector", default=None,
                      help="layer selector: topk, greedy, beam, contiguous, or the references uniform, random, "
                           "first, last. beam searches over the loss dependency matrix, which costs 1 + L + "
                           "L(L-1)/2 evaluations of the teacher on the validation users (466 for a 30-layer "
                           "LLM: hours on 2 CPU cores). Default: beam up to 12 layers, topk on combined scores "
                           "beyond (no dependency matrix)")
    comp.add_argument("--method", default=None,
                      help="importance estimator the selector ranks by (default: the selector's own; "
                           "combined for the default past 12 layers)")
    comp.add_argument("--ablation-users", type=int, default=None,
                      help="validation users that ablation, combined's weighting and the dependency matrix "
                           "evaluate on, a seeded sample (default: all)")
    comp.add_argument("--bridge-rank", type=int, default=0,
                      help="bridge adapter rank at the gaps; 0 = no bridges (default: %(default)s, measured best)")
    comp.add_argument("--trainable", choices=["bridges", "lora", "all"], default="all")
    comp.add_argument("--heal-epochs", type=int, default=20)
    comp.add_argument("--heal-lr", type=float, default=None, help="healing learning rate (default: 1e-3)")
    comp.add_argument("--cache-teacher", action="store_true",
                      help="run the frozen teacher once over the training windows instead of every epoch")
    comp.add_argument("--autocast", choices=["bf16", "fp32"], default=None,
                      help="heal with the layers in bf16 (default: bf16 on a GPU that has it, else none); fp32: never")
    comp.add_argument("--no-heal", action="store_true", help="only remove layers (bridges stay identity)")
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--out", required=True, help="output compact model directory")


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="interleaved latency, throughput, memory, FLOPs and the Amdahl bound")
    add_device_arg(bench)
    bench.add_argument("--models", nargs="+", required=True,
                       help="model directories; the first is the reference (the teacher)")
    bench.add_argument("--json", required=True, help="write the full result here")
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    bench.add_argument("--runs", type=int, default=30)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    bench.add_argument("--remeasures", type=int, default=REMEASURES,
                       help="times a disturbed speedup (above its Amdahl bound, efficiency over 110%%, or a CI "
                            "wider than itself) is timed again with twice the rounds before it is marked disturbed")


def train(args: argparse.Namespace) -> int:
    from layerwise.models.checkpoint import save_recommender
    from layerwise.models.factory import build_recommender
    from layerwise.training.train import train_recommender
    from orchestration.cli.teacher import check_family, model_name, teacher_setup

    dataset = load_data(args)
    setup = teacher_setup(args, dataset)
    print(setup.describe(), flush=True)
    model = build_recommender(dataset, **setup.build)
    check_family(args, model)
    from layerwise.device import resolve_device

    model.to(resolve_device(args.device))  # built on the CPU: the same initial weights on every device
    started = time.perf_counter()
    result = train_recommender(model, dataset, setup.train)
    minutes = (time.perf_counter() - started) / 60
    pretrained = setup.build["pretrained"]
    save_recommender(model, args.out, {
        "kind": "teacher", "preset": None if pretrained else setup.build["preset"], "pretrained": pretrained,
        "architecture": type(model.backbone).__name__, "recipe": setup.recipe,
        "dataset": args.dataset, "data_fingerprint": dataset.fingerprint, "max_len": args.max_len,
        "train": result.config, "best_epoch": result.best_epoch, "valid": result.best_valid,
        "train_minutes": minutes, "stop_reason": result.stop_reason, "epochs_run": result.epochs_run,
        "llm": getattr(model, "llm_info", None),
    })
    print(f"trained {model_name(model, setup)} in {minutes:.1f} min, {result.epochs_run} epochs (stopped by "
          f"{result.stop_reason.replace('_', ' ')}); best epoch {result.best_epoch}, "
          f"valid NDCG@10 {result.best_valid['ndcg@10']:.4f}; saved to {args.out}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from orchestration.loading import scorer_for

    dataset = load_data(args)
    result = evaluate_scorer(scorer_for(args.model, dataset, args.device), dataset, args)
    print_metrics_table({args.model: result.means}, METRIC_COLUMNS)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.per_user:
        result.to_parquet(args.per_user)
    return 0


def evaluate_scorer(scorer, dataset, args):
    from layerwise.evaluation.evaluate import SampledRanking, evaluate as run_eval

    sampled = SampledRanking(args.sampled, args.sampling) if args.sampled else None
    return run_eval(scorer, dataset, stage=args.stage, exclude_seen=not args.keep_seen,
                    max_len=args.max_len, sampled=sampled, progress=True)


def score(args: argparse.Namespace) -> int:
    from layerwise.compression.compress import calibration_batches
    from layerwise.compression.importance import IMPORTANCE, LOCAL_METHODS, compute_importance
    from orchestration.loading import load_model_for

    dataset = load_data(args)
    model = load_model_for(args.model, dataset, args.device)
    methods = args.methods or [*LOCAL_METHODS, "ablation", "ablation_loss"]
    unknown = [m for m in methods if m not in IMPORTANCE]
    if unknown:
        raise ValueError(f"unknown importance methods {unknown}; choose from {sorted(IMPORTANCE)}")
    batches = calibration_batches(model, dataset, args.calib_batches, args.calib_batch_size,
                                  seed=args.seed)
    local = [m for m in methods if m in LOCAL_METHODS]
    scores = {k: v.tolist() for k, v in compute_importance(model, batches, local).items()} if local else {}
    for method in (m for m in methods if m not in LOCAL_METHODS):
        scores[method] = IMPORTANCE[method](model, batches, data=dataset, k=None, seed=args.seed).tolist()
    for method, values in scores.items():
        print(f"{method:>16}: " + " ".join(f"{v:9.3g}" for v in values))
    write_json(args.json, {"model": args.model, "n_layers": model.n_layers, "scores": scores})
    return 0


def compress(args: argparse.Namespace) -> int:
    from layerwise.compression.compact import save_compact
    from layerwise.compression.compress import CompressConfig, compress as run_compress, default_selection, n_kept
    from layerwise.compression.distill import HealConfig
    from orchestration.loading import load_model_for

    dataset = load_data(args)
    teacher = load_model_for(args.teacher, dataset, args.device)
    selection = ({"selector": args.selector, "method": args.method} if args.selector
                 else {**default_selection(teacher.n_layers), **({"method": args.method} if args.method else {})})
    print(f"compress: keep {n_kept(args.keep, teacher.n_layers)} of {teacher.n_layers} layers, selector "
          f"{selection['selector']}" + (f" on {selection['method']}" if selection["method"] else "")
          + ("" if args.selector else " (the default at this depth)"), flush=True)
    config = CompressConfig(keep=args.keep, **selection, ablation_users=args.ablation_users,
                            bridge_rank=args.bridge_rank, seed=args.seed, do_heal=not args.no_heal,
                            heal=HealConfig(epochs=args.heal_epochs, trainable=args.trainable,
                                            cache_teacher=args.cache_teacher, autocast=args.autocast,
                                            **({"lr": args.heal_lr} if args.heal_lr else {})))
    result = run_compress(teacher, dataset, config)
    manifest = {"teacher": str(Path(args.teacher).resolve()), "dataset": args.dataset,
                "data_fingerprint": dataset.fingerprint, "max_len": config.heal.max_len,
                **result.manifest(config)}
    save_compact(result.model, args.out, manifest)
    print(f"kept layers {result.kept} of {teacher.n_layers}; valid NDCG@10 unhealed "
          f"{result.unhealed_valid['ndcg@10']:.4f}, final {manifest['valid']['ndcg@10']:.4f}; "
          f"saved to {args.out}")
    return 0


def bench(args: argparse.Namespace) -> int:
    import torch

    from layerwise.perf.bench import bench_dirs
    from layerwise.perf.table import format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_dirs(args.models, batch_sizes=tuple(args.batch_sizes), runs=args.runs,
                        warmup=args.warmup, remeasures=args.remeasures, device=args.device)
    print(format_table(result))
    write_json(args.json, result)
    return 0


HANDLERS = {"train": train, "evaluate": evaluate, "score": score, "compress": compress, "bench": bench}
