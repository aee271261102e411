"""The pipeline's stages. Each takes the run context and writes its outputs into the directory it is given.

The library does the work; this module decides where it runs (Ray tasks, Ray Train + DeepSpeed, or the
driver) and what MLflow records.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from orchestration.pipeline import interrupts
from orchestration.pipeline.config import PipelineConfig
from orchestration.outputs import METRIC_COLUMNS, print_metrics_table, write_json


@dataclass
class Context:
    """What every stage needs: the config, the run root, and the MLflow parent run."""

    config: PipelineConfig
    root: Path
    parent_run_id: str | None = None
    logged: set[str] = field(default_factory=set)
    device: torch.device = torch.device("cpu")  # config.device resolved once, where every stage runs

    def log_stage(self, name: str, out: Path, skipped: bool) -> None:
        """Log a finished stage's JSON outputs to MLflow (also for stages skipped on resume)."""
        from orchestration import tracking

        timing = json.loads((out / "_seconds.json").read_text())
        tracking.log_metrics({"stage_seconds": {name: timing["seconds"]},
                              "stage_cpu_seconds": {name: timing.get("cpu_seconds")}})
        tracking.log_metrics({"stage_skipped": {name: float(skipped)}})
        for path in sorted(out.glob("*.json")):
            if not path.name.startswith("_"):
                tracking.log_json(json.loads(path.read_text()), f"{name}/{path.name}")
        for path in sorted(out.glob("*.parquet")):
            tracking.log_table_parquet(path, artifact_path=f"{name}/tables")


@contextlib.contextmanager
def pipeline_context(config: PipelineConfig, root: Path):
    """Start (or join) Ray and open the MLflow parent run; a crash ends the run FAILED."""
    from orchestration import tracking
    from orchestration.distributed.ray_runtime import ray_session

    tracking.ensure_experiment(config.tracking.experiment, config.tracking.uri or root.parent)
    if config.threads:
        torch.set_num_threads(config.threads)
    from layerwise.device import resolve_device

    device = resolve_device(config.device)
    with ray_session(address=config.ray.address):
        with tracking.tracked_run(config.name, params=asdict(config), tags={"stage": "pipeline"}) as run:
            yield Context(config, root, parent_run_id=run.info.run_id, device=device)


def load_data(config: PipelineConfig):
    from layerwise.data import load_dataset

    c = config.data
    return load_dataset(c.dataset, data_dir=c.data_dir, cache_dir=c.cache_dir, min_core=c.min_core)


def train_teacher(ctx: Context, data, out: Path) -> None:
    """Train the teacher in the driver, or through Ray Train + DeepSpeed when configured."""
    from dataclasses import replace

    from layerwise.models.checkpoint import save_recommender
    from layerwise.models.factory import build_recommender
    from layerwise.training.train import train_recommender

    c, t = ctx.config, ctx.config.teacher
    train_config = replace(t.train, seed=c.seed, max_len=c.data.max_len)
    if c.ray.distributed_training:
        from orchestration.distributed.specs import DataSpec, ModelSpec
        from orchestration.distributed.training import train_teacher_distributed

        if t.text_features or t.causal:
            raise ValueError("text features and causal BERT are not wired into distributed training yet; "
                             "set ray.distributed_training=false")
        data_spec = DataSpec(c.data.dataset, cache_dir=c.data.cache_dir, data_dir=c.data.data_dir,
                             min_core=c.data.min_core)
        model_spec = ModelSpec(family=t.family, preset=t.preset, max_len=c.data.max_len,
                               dropout=t.dropout, pretrained=t.pretrained, seed=c.seed, head=t.head,
                               llm=asdict(t.llm) if t.llm else None)
        result = train_teacher_distributed(data_spec, model_spec, train_config, out_dir=str(out / "model"),
                                           num_workers=c.ray.workers, zero_stage=c.ray.zero_stage,
                                           storage_path=str(ctx.root / "ray_train"),
                                           use_gpu=ctx.device.type == "cuda")
        _check_model(out)
        history = result["history"]
        write_json(out / "train.json", {"best": result["best"], "history": history,
                                        "stop_reason": history[-1].get("stop_reason", "epochs") if history else None,
                                        "epochs_run": len(history), "zero_stage": result["zero_stage"],
                                        "world_size": result["world_size"]})
        return
    model = build_recommender(data, t.family, t.preset, pretrained=t.pretrained,
                              text_features=t.text_features, max_len=c.data.max_len,
                              dropout=t.dropout, seed=c.seed, causal=t.causal, head=t.head, llm=t.llm)
    model.to(ctx.device)  # built on the CPU (the same weights everywhere), trained where the stage runs
    result = train_recommender(model, data, train_config, checkpoint=out / "checkpoint",
                               stop=lambda _: interrupts.requested())  # resumes mid-training
    save_recommender(model, out / "model", {
        "kind": "teacher", "preset": t.preset, "pretrained": t.pretrained, "dataset": c.data.dataset,
        "llm": getattr(model, "llm_info", None),
        "data_fingerprint": data.fingerprint, "max_len": c.data.max_len, "train": result.config,
        "best_epoch": result.best_epoch, "valid": result.best_valid,
    })
    write_json(out / "train.json", {"best_epoch": result.best_epoch, "valid": result.best_valid,
                                    "stop_reason": result.stop_reason, "epochs_run": result.epochs_run,
                                    "torch_threads": torch.get_num_threads(), "history": result.history})


def _check_model(out: Path) -> None:
    if not (out / "model" / "manifest.json").exists():
        raise RuntimeError(f"distributed training wrote no model to {out / 'model'}")


def evaluate_models(ctx: Context, data, models: dict[str, Path], out: Path, with_mostpop: bool) -> None:
    """Test-split metrics (full ranking, seen items excluded) with per-user Parquet tables."""
    from layerwise.baselines import BASELINES
    from layerwise.device import device_scorer
    from layerwise.evaluation.evaluate import evaluate
    from orchestration.loading import load_model_for

    scorers = {"mostpop": BASELINES["mostpop"](data)} if with_mostpop else {}
    for name, model_dir in models.items():
        model_dir = model_dir / "model" if (model_dir / "model").is_dir() else model_dir
        scorers[name] = device_scorer(load_model_for(str(model_dir), data, ctx.device))
    rows = {}
    for name, scorer in scorers.items():
        result = evaluate(scorer, data, stage="test", exclude_seen=True,
                          max_len=ctx.config.data.max_len, progress=True)
        result.to_parquet(out / f"{name}_per_user.parquet")
        write_json(out / f"{name}.json", result.to_dict())
        rows[name] = result.means
    print_metrics_table(rows, METRIC_COLUMNS, title="test split, full ranking, seen items excluded")


EVALUATIONS = ("dependency", "ablation_loss", "ablation")  # every_score's tasks, each a model evaluation per layer


def importance_evaluations(selector: str, method: str | None) -> tuple[str, ...]:
    """The evaluation tasks the selection needs beside the local estimators (which are cheap, one pass, and
    fill the report's heatmap): the ablation it ranks by, and the loss dependency matrix for `beam` only. That
    matrix is the costly one: 1 + L + L(L-1)/2 evaluations, 466 for a 30-layer LLM, hours on 2 cores."""
    from layerwise.compression.compress import SELECTOR_METHOD

    method = method or SELECTOR_METHOD.get(selector)
    needed = {"dependency"} if selector == "beam" else set()
    needed |= {method} & {"ablation", "ablation_loss"}
    return tuple(e for e in EVALUATIONS if e in needed)


def importance(ctx: Context, data, teacher_dir: Path, out: Path) -> None:
    """The local estimators sharded over Ray tasks; the ablation and dependency tasks the selector needs
    (`importance_evaluations`), one task each."""
    from layerwise.compression.compress import calibration_batches
    from orchestration.loading import load_model_for
    from orchestration.distributed.shards import every_score

    c = ctx.config
    teacher = load_model_for(str(teacher_dir / "model"), data, ctx.device)
    batches = calibration_batches(teacher, data, c.compress.calib_batches, c.compress.calib_batch_size,
                                  c.data.max_len, c.seed)
    evaluations = importance_evaluations(c.compress.selector, c.compress.method)
    scores, dependency = every_score(teacher, batches, data, n_shards=c.ray.shards,
                                     max_users=c.compress.ablation_users, device=str(ctx.device),
                                     evaluations=evaluations)
    write_json(out / "importance.json", {
        "n_layers": teacher.n_layers, "shards": c.ray.shards,
        "scores": {k: v.tolist() for k, v in scores.items()},
        **({"dependency_loss": dependency.tolist()} if dependency is not None else {}),
    })


def load_importance(imp_dir: Path) -> dict[str, torch.Tensor]:
    """The scores an importance stage wrote, with its loss dependency matrix as "dependency" (what
    `compress(precomputed=...)` takes)."""
    raw = json.loads((imp_dir / "importance.json").read_text())
    scores = {k: torch.tensor(v, dtype=torch.float64) for k, v in raw["scores"].items()}
    if "dependency_loss" in raw:  # a study computes it on its first seed only, unless the selector needs it
        scores["dependency"] = torch.tensor(raw["dependency_loss"], dtype=torch.float64)
    return scores


def compress(ctx: Context, data, teacher_dir: Path, imp_dir: Path, out: Path) -> None:
    """Select with the stored scores, build the compact model, heal it (locally or distributed)."""
    from dataclasses import replace

    from layerwise.compression.compact import save_compact
    from layerwise.compression.compress import CompressConfig, compress as run_compress
    from orchestration.loading import load_model_for

    c = ctx.config
    s = c.compress
    teacher = load_model_for(str(teacher_dir / "model"), data, ctx.device)
    config = CompressConfig(keep=s.keep, selector=s.selector, method=s.method,
                            bridge_rank=s.bridge_rank, calib_batches=s.calib_batches,
                            calib_batch_size=s.calib_batch_size, seed=c.seed, ablation_users=s.ablation_users,
                            heal=replace(s.heal, max_len=c.data.max_len, seed=c.seed))
    result = run_compress(teacher, data, config, precomputed=load_importance(imp_dir))
    manifest = {"teacher": str(teacher_dir / "model"), "dataset": c.data.dataset,
                "data_fingerprint": data.fingerprint, "max_len": c.data.max_len,
                **result.manifest(config)}
    save_compact(result.model, out / "model", manifest)
    write_json(out / "compress.json", {"kept": result.kept, **manifest,
                                       "heal_history": result.heal.history if result.heal else []})


def bench(ctx: Context, teacher_dir: Path, compact_dir: Path, out: Path) -> bool:
    """Teacher vs compact, interleaved, re-measured while disturbed (layerwise.perf.guard). Returns whether
    the result is final: a disturbed one is not, so the next run measures again."""
    from layerwise.perf.bench import bench_dirs
    from layerwise.perf.table import format_table

    b = ctx.config.bench
    threads = torch.get_num_threads()
    if b.threads:
        torch.set_num_threads(b.threads)
    try:
        result = bench_dirs([str(teacher_dir / "model"), str(compact_dir)], batch_sizes=b.batch_sizes,
                            runs=b.runs, warmup=b.warmup, max_len=ctx.config.data.max_len,
                            remeasures=b.remeasures, device=ctx.device)
    finally:
        torch.set_num_threads(threads)
    (out / "bench.md").write_text(format_table(result))
    write_json(out / "bench.json", result)
    print(format_table(result))
    return result["status"] != "disturbed"


def headline(ctx: Context, teacher_dir: Path, base_dir: Path, eval_dir: Path, bench_dir: Path,
             comp_dir: Path) -> dict:
    """Teacher vs compact: NDCG@10, MRR, retention, speedup and efficiency against the Amdahl bound;
    logged to MLflow, the compact model registered and promoted to `champion`."""
    from orchestration import tracking
    from orchestration.pipeline.headline import build_headline, print_headline

    head = build_headline(teacher_dir, base_dir, eval_dir, bench_dir, comp_dir)
    print_headline(head)
    tracking.log_metrics({"headline": head["metrics"]})
    tracking.log_json(head, "headline.json")
    version = tracking.log_compact_model(str(comp_dir / "model"), ctx.config.tracking.registered_model)
    tracking.promote(ctx.config.tracking.registered_model, version, alias="champion")
    head["registered"] = {"name": ctx.config.tracking.registered_model, "version": version,
                          "alias": "champion"}
    paths = write_run_report(ctx, head, comp_dir)
    tracking.log_artifacts(paths["markdown"].parent, artifact_path="report")
    return head


def write_run_report(ctx: Context, head: dict, comp_dir: Path) -> dict:
    """The run's Markdown/HTML report with the importance and dependency heatmaps."""
    from layerwise.report import write_report

    importance = _importance_json(ctx.root)
    quality, speed = head["metrics"]["quality"]["ndcg@10"], head["metrics"]["speed"]
    results = {
        "title": f"layerwise run '{ctx.config.name}'",
        "protocol": {"data set": ctx.config.data.dataset, "teacher": ctx.config.teacher.family,
                     "ranking": "full, seen items excluded", "max_len": ctx.config.data.max_len},
        "headline": {
            "metric": "NDCG@10", "k": head["layers"]["compact"], "n_layers": head["layers"]["teacher"],
            "teacher": {"mean": quality["teacher"], "ci95": None},
            "compact": {"mean": quality["compact"], "ci95": None},
            "retention": {"mean": quality["retention"], "ci95": quality["retention_ci95"]},
            "speedup": {f"batch={b}": {"mean": v.get("speedup"), "ci95": v.get("speedup_ci95"),
                                       "status": v["status"]} for b, v in speed.items()},
        },
        "importance": {"scores": importance["scores"], "kept": head["layers"]["kept"],
                       "dependency": importance.get("dependency_loss"),  # beam's only (importance_evaluations)
                       "dependency_unit": "validation loss interaction"},
    }
    return write_report(results, ctx.root / "report")


def _importance_json(root: Path) -> dict:
    found = sorted(root.glob("importance-*/importance.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no importance stage output under {root}")
    return json.loads(found[-1].read_text())
