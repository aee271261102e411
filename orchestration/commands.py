"""Handlers of the `layerwise` subcommands: parse nothing, call the library, print and write results."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from orchestration.outputs import print_metrics_table, write_json

HEADLINE = ("ndcg@5", "ndcg@10", "ndcg@20", "mrr", "hr@10", "precision@5")


def load_data(args):
    from layerwise.data import load_dataset

    return load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                        min_core=args.min_core)


def data(args) -> int:
    if args.data_command == "synth":
        from layerwise.data import generate_synthetic, write_atomic

        started = time.perf_counter()
        inter = generate_synthetic(args.users, args.items, args.interactions, seed=args.seed)
        path = write_atomic(inter, args.out, args.name)
        print(f"wrote {len(inter.user):,} interactions to {path} in {time.perf_counter() - started:.1f}s")
        return 0
    from layerwise.data import dataset_stats

    dataset = load_data(args)
    stats = dataset_stats(dataset)
    for key, value in stats.items():
        print(f"{key:>24}: {value}")
    if getattr(args, "json", None):
        write_json(args.json, stats)
    return 0


def train(args) -> int:
    from layerwise.models.checkpoint import save_recommender
    from layerwise.train import TrainConfig, train_recommender
    from layerwise.models.factory import build_recommender

    dataset = load_data(args)
    config = TrainConfig(seed=args.seed, max_len=args.max_len)
    overrides = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "loss", "max_minutes")
                 if getattr(args, k) is not None}
    config = replace(config, **overrides)
    model = build_recommender(dataset, args.family, args.preset, pretrained=args.pretrained,
                              text_features=args.text_features, max_len=args.max_len,
                              dropout=args.dropout, seed=args.seed, causal=args.causal)
    started = time.perf_counter()
    result = train_recommender(model, dataset, config)
    minutes = (time.perf_counter() - started) / 60
    save_recommender(model, args.out, {
        "kind": "teacher", "preset": args.preset, "pretrained": args.pretrained,
        "dataset": args.dataset, "data_fingerprint": dataset.fingerprint, "max_len": args.max_len,
        "train": result.config, "best_epoch": result.best_epoch, "valid": result.best_valid,
        "train_minutes": minutes,
    })
    print(f"trained {args.family}/{args.preset} in {minutes:.1f} min; best epoch {result.best_epoch}, "
          f"valid NDCG@10 {result.best_valid['ndcg@10']:.4f}; saved to {args.out}")
    return 0


def evaluate(args) -> int:
    from orchestration.loading import scorer_for

    dataset = load_data(args)
    result = evaluate_scorer(scorer_for(args.model, dataset), dataset, args)
    print_metrics_table({args.model: result.means}, HEADLINE)
    if args.json:
        write_json(args.json, result.to_dict())
    if args.per_user:
        result.to_parquet(args.per_user)
    return 0


def evaluate_scorer(scorer, dataset, args):
    from layerwise.evaluate import SampledRanking, evaluate as run_eval

    sampled = SampledRanking(args.sampled, args.sampling) if args.sampled else None
    return run_eval(scorer, dataset, stage=args.stage, exclude_seen=not args.keep_seen,
                    max_len=args.max_len, sampled=sampled, progress=True)


def score(args) -> int:
    from layerwise.compress import calibration_batches
    from layerwise.importance import IMPORTANCE, LOCAL_METHODS, compute_importance
    from orchestration.loading import load_model_for

    dataset = load_data(args)
    model = load_model_for(args.model, dataset)
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


def compress(args) -> int:
    from layerwise.compact import save_compact
    from layerwise.compress import CompressConfig, compress as run_compress
    from layerwise.distill import HealConfig
    from orchestration.loading import load_model_for

    dataset = load_data(args)
    teacher = load_model_for(args.teacher, dataset)
    config = CompressConfig(keep=args.keep, selector=args.selector, method=args.method,
                            bridge_rank=args.bridge_rank, seed=args.seed, do_heal=not args.no_heal,
                            heal=HealConfig(epochs=args.heal_epochs, trainable=args.trainable))
    result = run_compress(teacher, dataset, config)
    manifest = {"teacher": str(Path(args.teacher).resolve()), "dataset": args.dataset,
                "data_fingerprint": dataset.fingerprint, "max_len": config.heal.max_len,
                **result.manifest(config)}
    save_compact(result.model, args.out, manifest)
    print(f"kept layers {result.kept} of {teacher.n_layers}; valid NDCG@10 unhealed "
          f"{result.unhealed_valid['ndcg@10']:.4f}, final {manifest['valid']['ndcg@10']:.4f}; "
          f"saved to {args.out}")
    return 0


def bench(args) -> int:
    import torch

    from layerwise.bench import bench_dirs, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_dirs(args.models, batch_sizes=tuple(args.batch_sizes), runs=args.runs,
                        warmup=args.warmup)
    print(format_table(result))
    write_json(args.json, result)
    return 0


def tune(args) -> int:
    from orchestration.search.tuning import tune_command

    return tune_command(args)


def baselines(args) -> int:
    from layerwise.distill import HealConfig
    from orchestration.baselines.table import format_markdown, run_baselines

    heal = HealConfig(epochs=args.heal_epochs, trainable=args.trainable)
    result = run_baselines(args.teacher, load_data(args), keep=args.keep, heal_config=heal,
                           seeds=tuple(args.seeds), out_json=args.json, out_md=args.md, which=args.only,
                           bridge_rank=args.bridge_rank, runs=args.runs, memory=not args.no_memory)
    print(format_markdown(result))
    return 0


def plan(args) -> int:
    from orchestration.scale.plan import plan_main

    return plan_main(args)


def serve(args) -> int:
    from orchestration.tracking import tracking_uri
    from serve.app import serve_main

    serve_main(args.model, host=args.host, port=args.port, replicas=args.replicas,
               num_cpus=args.num_cpus, dataset=args.dataset, tracking_uri=tracking_uri(args.tracking_uri))
    return 0


def run(args) -> int:
    from orchestration.pipeline.config import load_config
    from orchestration.pipeline.run import run_pipeline

    path, overrides = args.config, list(args.overrides)
    if path and "=" in path and not Path(path).exists():
        path, overrides = None, [path, *overrides]  # `layerwise run key=value ...` with no YAML file
    config = load_config(path, overrides)
    run_pipeline(config)
    return 0


def study(args) -> int:
    from orchestration.study.driver import command

    return command(args)
