"""Hyperparameter search over compact models: Ray Tune trials, Optuna's samplers, MLflow child runs.

Smallest CPU run (tiny teacher on tiny synthetic data, 3 trials, a few minutes on 2 cores):
    python -m orchestration.search.tuning tune_spaces/llama.yaml teacher.preset=tiny teacher.n_layers=4 \
        teacher.epochs=4 teacher.dataset=synthetic:300:60:6000:0 space.heal_epochs=1 protocol.bench_runs=5 \
        --samples 3 --objective pareto --run-dir /tmp/lw_tune --num-cpus 2 --object-store-mb 150
(`layerwise tune` takes the same arguments; key=value overrides follow the YAML path, before the options.)

The teacher is trained once in the driver (or given with --teacher) and shared by every trial. A trial
(orchestration.search.trial) selects k layers with its selector and estimator, builds the compact model
with rank-r bridges, heals it (in the trial, or on Ray Train + DeepSpeed with --distributed-heal), and
reports validation NDCG@10 retention and the speedup measured against the teacher in the same process
(interleaved rounds). TPE maximises retention ("single"); NSGA-II finds the retention/speed front
("pareto"), read back from the Optuna study. The front is then checked with nothing else running
(test-split retention, timed again alone), registered in MLflow, and its fastest model with retention
>= --min-retention becomes `champion`. Killed searches resume: finished trials stay finished, the rest
run. Every timing passes the bench guard (layerwise.perf.guard): a trial timed disturbed even after its
re-measures reports no speed (NaN, so Optuna records it failed), is on no front, and reads "disturbed" in
the table; a front model whose quiet timing stays disturbed cannot be the fastest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestration.outputs import write_json
from orchestration.search.space import SearchSpace, load_space
from orchestration.search.arguments import OBJECTIVES, SPEED_METRICS, add_arguments
from orchestration.search.results import conclude
from orchestration.search.trial import search_trial, valid_ndcg

EXPERIMENT_NAME = "tune"  # Tune's experiment folder inside the run directory


# --- the driver ----------------------------------------------------------------------------------------
def run_search(space_path: str | Path, samples: int = 16, objective: str = "single",
               teacher_dir: str | None = None, run_dir: str | Path = "runs/tune", *,
               overrides: list[str] | tuple[str, ...] = (), resume: bool = True,
               min_retention: float | None = None, distributed_heal: bool = False,
               speed_metric: str = "speedup", tracking_uri: str | None = None,
               experiment: str = "layerwise-tune", registered_model: str = "layerwise-compact",
               ray_options: dict | None = None, max_concurrent: int | None = None,
               device: str | None = None) -> dict[str, Any]:
    """Run (or resume) a search; returns {"rows", "front", "champion", "message", "report_dir", ...}.

    Args:
        space_path: a tune_spaces/*.yaml file; `overrides` change it (teacher.preset=tiny, space.lr=1e-3).
        samples: trials in all (a resumed search keeps the count it started with).
        objective: "single" (TPE, retention) or "pareto" (NSGA-II, retention and `speed_metric`).
        teacher_dir: a trained teacher to compress; default: train the YAML's teacher once, here.
        run_dir: everything goes here: teacher, Tune experiment, optuna.db, mlflow.db, trials, report.
        resume: continue an interrupted search in run_dir (else refuse to touch an existing one).
        min_retention: champion = the fastest front model (timed alone after the search) with at least
            this validation retention; None: the front model with the highest retention.
        distributed_heal: heal each trial on Ray Train + DeepSpeed (2 workers) instead of in the trial.
        speed_metric: "speedup" (max) or "latency_ms" (min) as the second objective.
        tracking_uri: MLflow store (default: sqlite in run_dir). ray_options: `ray_session` arguments.
        max_concurrent: trials at once (default: what the cluster's CPUs allow).
        device: where the teacher and the trials run (default: the YAML's `device:`, auto); one that asks
            for a GPU gives each trial a share of one (`gpu_request`).
    """
    from orchestration import tracking
    from orchestration.distributed.ray_runtime import ray_session

    _check_choices(objective, speed_metric, samples)
    space = load_space(space_path, list(overrides))
    if device is not None:
        from layerwise.device import check_device

        space = dataclasses.replace(space, device=check_device(device))
    run_dir = Path(run_dir).resolve()
    teacher_dir = str(Path(teacher_dir).resolve()) if teacher_dir else None
    state = _search_state(run_dir, space, objective, speed_metric, samples, resume, teacher_dir)
    # Tune saves its experiment state at most every 10 s by default; a kill inside that window would
    # re-run a trial that had finished. Trials take far longer than this small write.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    uri = tracking.tracking_uri(tracking_uri or run_dir)
    tracking.ensure_experiment(experiment, uri)
    with ray_session(**(ray_options or {})) as resources:
        data, teacher_path = _prepare_teacher(space, run_dir, teacher_dir)
        teacher_valid = valid_ndcg(_load_teacher(teacher_path, data, space), data, space.teacher.max_len)
        with _parent_run(state, run_dir, space, teacher_path, samples, objective) as parent_id:
            ctx = _context(space, run_dir, teacher_path, teacher_valid, uri, experiment, parent_id, state,
                           distributed_heal)
            grid = _fit(ctx, space, state, run_dir, resources, max_concurrent)
            outcome = conclude(grid, state, run_dir, data, teacher_path, space, min_retention, registered_model)
            tracking.log_metrics({"search": {"trials": len(outcome["rows"]), "front": len(outcome["front"]),
                                             "errors": outcome["errors"]}})
    return {**outcome, "run_dir": str(run_dir), "teacher_dir": teacher_path,
            "teacher_valid_ndcg_at_10": teacher_valid, "study": state["study"]}


class SearchInterrupted(RuntimeError):
    """The search stopped (Ctrl-C) before all its trials finished; running the same command resumes it."""


def _fit(ctx: dict, space: SearchSpace, state: dict, run_dir: Path, resources: dict,
         max_concurrent: int | None):
    """Run the trials (a new search or the restored one); the ResultGrid once every trial has ended."""
    from ray import tune

    from orchestration.distributed.ray_runtime import gpu_request

    per_trial = 0.5 if ctx["distributed_heal"] else 1.0
    concurrency = max_concurrent or _max_concurrent(resources, per_trial, ctx["distributed_heal"])
    gpus = gpu_request(ctx["device"])  # a share of a GPU per trial when the search runs on one
    trainable = tune.with_resources(tune.with_parameters(search_trial, ctx=ctx), {"cpu": per_trial, "gpu": gpus})
    grid = _tuner(trainable, space, state, run_dir, concurrency).fit()
    ended = grid.num_terminated + grid.num_errors
    if ended < state["samples"]:  # Tune returns normally after a Ctrl-C; the front would be partial
        raise SearchInterrupted(f"search interrupted with {ended} of {state['samples']} trials ended; "
                                f"run the same command again to resume it")
    return grid


def _check_choices(objective: str, speed_metric: str, samples: int) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if speed_metric not in SPEED_METRICS:
        raise ValueError(f"speed metric must be one of {sorted(SPEED_METRICS)}, got {speed_metric!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")


def _search_state(run_dir: Path, space: SearchSpace, objective: str, speed_metric: str, samples: int,
                  resume: bool, teacher_dir: str | None) -> dict:
    """search.json: what this run directory searches. A resume must search the same thing."""
    from orchestration.pipeline.config import stage_hash

    key = stage_hash(space.teacher, asdict(space.protocol), space.entries, objective, speed_metric,
                     teacher_dir)
    path = run_dir / "search.json"
    if path.exists():
        state = json.loads(path.read_text())
        if not resume:
            raise ValueError(f"{run_dir} already holds a search; resume it, or choose a new --run-dir")
        if state["key"] != key:
            raise ValueError(f"{run_dir} holds a different search (space, protocol, teacher, --teacher or "
                             f"objective changed); resume needs the same ones, or choose a new --run-dir")
        if state["samples"] != samples:
            print(f"resuming: the search keeps its original {state['samples']} samples (asked {samples})")
        return state
    family = space.teacher.family
    state = {"key": key, "objective": objective, "speed_metric": speed_metric, "samples": samples,
             "study": f"layerwise-{family}-{objective}-{key[:6]}", "space": space.path, "parent_run_id": None}
    write_json(path, state)
    return state


def _absolute(pretrained: str | None) -> str | None:
    """A path made absolute (trials run in their own working directories); a known name as it is."""
    if pretrained and Path(pretrained).expanduser().exists():
        return str(Path(pretrained).expanduser().resolve())
    return pretrained


def _data_spec(space: SearchSpace):
    """Absolute paths: trials run in their own working directories."""
    from orchestration.distributed.specs import DataSpec

    t = space.teacher
    name = str(Path(t.dataset).resolve()) if Path(t.dataset).exists() else t.dataset
    return DataSpec(name, cache_dir=str(Path(t.cache_dir).resolve()),
                    data_dir=str(Path(t.data_dir).resolve()) if t.data_dir else None, min_core=t.min_core)


def _prepare_teacher(space: SearchSpace, run_dir: Path, teacher_dir: str | None):
    """(data, teacher directory): the given one, the one trained here earlier, or a newly trained one."""
    from layerwise.device import resolve_device
    from layerwise.models.checkpoint import read_manifest, save_recommender
    from layerwise.training.train import TrainConfig, train_recommender
    from orchestration.pipeline.config import stage_hash
    from orchestration.distributed.specs import ModelSpec, build_model

    data = _data_spec(space).load()
    if teacher_dir:
        return data, teacher_dir
    t, target = space.teacher, run_dir / "teacher"
    key = stage_hash(t)  # the options added later count only once set, so earlier teachers stay reused
    if (target / "manifest.json").exists() and read_manifest(target).get("tune_teacher_key") == key:
        print(f"teacher: trained earlier, reusing {target}")
        return data, str(target)
    spec = ModelSpec(t.family, t.preset, n_layers=t.n_layers, max_len=t.max_len, dropout=t.dropout,
                     pretrained=_absolute(t.pretrained), seed=t.seed, head=t.head, llm=t.llm)
    model = build_model(spec, data).to(resolve_device(space.device))
    config = TrainConfig(epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, max_len=t.max_len, seed=t.seed,
                         max_minutes=t.max_minutes)
    # The search waits for this, often for longer than for its trials: say so, and show the epochs go by.
    print(f"teacher: no --teacher given, training {t.family} ({model.n_layers} layers, up to {t.epochs} "
          f"epochs) on {data.name} before the search", flush=True)
    result = train_recommender(model, data, config, progress=True)
    save_recommender(model, target, {
        "kind": "teacher", "model_spec": asdict(spec), "dataset": data.name, "data_fingerprint": data.fingerprint,
        "max_len": t.max_len, "train": result.config, "best_epoch": result.best_epoch, "valid": result.best_valid,
        "tune_teacher_key": key})
    print(f"teacher: trained {t.family} ({model.n_layers} layers), valid NDCG@10 "
          f"{result.best_valid['ndcg@10']:.4f}, saved to {target}")
    return data, str(target)


def _load_teacher(teacher_path: str, data, space: SearchSpace):
    """Load and check the teacher against the data, the space's family and its depth range."""
    from orchestration.loading import load_model_for

    teacher = load_model_for(teacher_path, data, space.device)
    if teacher.family.name != space.teacher.family:
        raise ValueError(f"{space.path} searches {space.teacher.family} models, but the teacher in "
                         f"{teacher_path} is {teacher.family.name}")
    key, _, top = space.depth_bounds()
    if key == "layers" and top >= teacher.n_layers:
        raise ValueError(f"{space.path}: space.layers reaches {top}, but the teacher has only "
                         f"{teacher.n_layers} layers; a compact model must have fewer")
    return teacher


def _parent_run(state: dict, run_dir: Path, space: SearchSpace, teacher_path: str, samples: int,
                objective: str):
    """The search's MLflow run: created on the first start, reopened (same id) on a resume."""
    import contextlib

    import mlflow

    from orchestration import tracking

    @contextlib.contextmanager
    def opened():
        if state["parent_run_id"]:
            with mlflow.start_run(run_id=state["parent_run_id"]) as run:  # trials already point at it
                yield run.info.run_id
            return
        params = {"space": space.entries, "teacher": asdict(space.teacher), "protocol": asdict(space.protocol),
                  "samples": samples, "objective": objective, "teacher_dir": teacher_path}
        with tracking.tracked_run(f"tune-{space.teacher.family}-{objective}", params=params,
                                  tags={"stage": "tune", "study": state["study"]}) as run:
            state["parent_run_id"] = run.info.run_id
            write_json(run_dir / "search.json", state)
            yield run.info.run_id
    return opened()


def _context(space: SearchSpace, run_dir: Path, teacher_path: str, teacher_valid: float, uri: str,
             experiment: str, parent_id: str, state: dict, distributed_heal: bool) -> dict:
    return {"data": asdict(_data_spec(space)), "teacher_dir": teacher_path, "teacher_valid_ndcg": teacher_valid,
            "max_len": space.teacher.max_len, "protocol": asdict(space.protocol), "run_dir": str(run_dir),
            "tracking_uri": uri, "experiment": experiment, "parent_run_id": parent_id, "study": state["study"],
            "distributed_heal": distributed_heal, "workers": 2, "zero_stage": 2, "threads": 1,
            "device": space.device}


def _max_concurrent(resources: dict, per_trial: float, distributed: bool) -> int:
    """Trials that fit at once. With Ray Train healing each trial also needs its 2 x 0.5-CPU workers, or
    trials would hold every CPU while their workers wait for one."""
    need = per_trial + (1.0 if distributed else 0.0)
    return max(1, int(resources.get("CPU", 1.0) // need))


def _searcher(space: SearchSpace, state: dict, run_dir: Path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed, samples = space.protocol.seed, state["samples"]
    storage = optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'optuna.db'}")
    if state["objective"] == "single":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, samples // 3)))
        return OptunaSearch(metric="retention", mode="max", sampler=sampler, storage=storage,
                            study_name=state["study"])
    # Several generations instead of one random one: the default population (50) exceeds most budgets.
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, samples // 4)))
    speed = state["speed_metric"]
    return OptunaSearch(metric=["retention", speed], mode=["max", SPEED_METRICS[speed]], sampler=sampler,
                        storage=storage, study_name=state["study"])


def _tuner(trainable, space: SearchSpace, state: dict, run_dir: Path, concurrency: int):
    """A new Tuner, or the interrupted one restored (finished trials kept, unfinished and errored re-run)."""
    from ray import tune

    path = str(run_dir / EXPERIMENT_NAME)
    if tune.Tuner.can_restore(path):
        print(f"resuming the search in {path}")
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    # No scheduler: early stopping would hand Optuna early values as final ones.
    return tune.Tuner(trainable, param_space=space.to_tune(), tune_config=tune.TuneConfig(
        search_alg=_searcher(space, state, run_dir), num_samples=state["samples"],
        max_concurrent_trials=concurrency), run_config=tune.RunConfig(
        name=EXPERIMENT_NAME, storage_path=str(run_dir), verbose=1))


# --- command line -----------------------------------------------------------------------------------------
def tune_command(args: argparse.Namespace) -> int:
    """Handler of `layerwise tune`: run the search, print the front and the champion decision."""
    run_dir = args.run_dir or f"runs/tune-{Path(args.space).stem}-{args.objective}"
    ray_options = {"address": args.address, "num_cpus": args.num_cpus, "object_store_mb": args.object_store_mb}
    try:
        result = run_search(args.space, args.samples, args.objective, args.teacher, run_dir,
                            overrides=args.overrides, resume=not args.fresh, min_retention=args.min_retention,
                            distributed_heal=args.distributed_heal, speed_metric=args.speed_metric,
                            tracking_uri=args.tracking_uri, registered_model=args.registered_model,
                            ray_options=ray_options, max_concurrent=args.max_concurrent,
                            device=args.device)
    except SearchInterrupted as stop:
        print(f"layerwise tune: {stop}")
        return 130  # the shell's code for an interrupted command
    print((Path(result["report_dir"]) / "trials.md").read_text())
    write_json(Path(result["run_dir"]) / "result.json", {k: v for k, v in result.items() if k != "rows"})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m orchestration.search.tuning",
                                                   description=__doc__.splitlines()[0]))
    return tune_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
