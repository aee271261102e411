"""`layerwise study`: our method against every baseline over several seeds, with the ablation, the k sweep,
noise robustness and scenario slices, in one Markdown/HTML report with significance tests.

Smallest CPU run (tiny synthetic data, tiny model, 2 seeds; a few minutes on 2 cores):
    layerwise study seeds=[0,1] data.dataset=synthetic:300:60:6000:0 teacher.preset=tiny \
        teacher.train.epochs=3 compress.heal.epochs=1 sweep.heal_epochs=1 baselines=[mostpop,first,int8]

How it runs:
1. Each seed is one Ray task (`ray.cpus_per_seed` CPUs), so seeds run in parallel; a seed with the ablation
   and the k sweep splits them into a task of their own once its compact model exists. Inside, every stage
   (teacher, importance, ours, each baseline, each ablation, each k of the sweep, noise) is resumable: an
   interrupted study restarts where it stopped (orchestration.study.seed).
2. Speed: one interleaved benchmark in the driver, after every seed is done (so no training competes with
   it), times the first seed's teacher, our compact model and one model per baseline architecture.
3. Statistics and report (orchestration.study.results, layerwise.report), logged to MLflow with every table.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from orchestration.outputs import write_json
from orchestration.pipeline import interrupts
from orchestration.pipeline.config import stage_hash
from orchestration.pipeline.stages import Stages, running_marker
from orchestration.study.archive import merge_invocations, seed_threads
from orchestration.study.config import PORTABLE_NUMERICS, StudyConfig, config_dict, extras_seeds, load_study_data
from orchestration.study.rows import ROWS
from orchestration.study.seed import run_seed

PROGRESS_SECONDS = 30  # how often the driver's progress line re-reads the seeds' stage folders


def run_study(config: StudyConfig, progress: bool = True) -> dict:
    """Run (or resume) the whole study; returns the results dict the report was written from."""
    from layerwise.report import write_report
    from orchestration import tracking
    from orchestration.distributed.ray_runtime import ray_session
    from orchestration.study.results import build_results
    from orchestration.study.status import study_status, unfinished

    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    root = Path(config.run_dir).resolve() / config.name
    given = config.reuse  # as the YAML names them: the run's config.json (archived, published) keeps these
    config = replace(config, reuse=tuple(str(Path(r).resolve()) for r in config.reuse))  # seed tasks' cwd differs
    root.mkdir(parents=True, exist_ok=True)
    _warn_about_numerics(config)
    write_json(root / "config.json", {**asdict(config), "reuse": list(given)})
    _record_invocation(root, started_at, None, config.reuse)
    data = load_study_data(config)  # also fills the Parquet cache the seed tasks read
    tracking.ensure_experiment(config.tracking.experiment, config.tracking.uri or root.parent)
    with ray_session(address=config.ray.address):
        with tracking.tracked_run(config.name, params=config_dict(config), tags={"stage": "study"}):
            seed_dirs = run_seeds(config, root, progress)
            rows = collect_rows(seed_dirs)
            speed = _speed(config, data, seed_dirs[config.seeds[0]], rows, root)
            walls = _record_invocation(root, started_at, time.perf_counter() - started)
            left = unfinished(study_status(config, data))  # none after a whole run; checked, not assumed
            results = build_results(config, data, seed_dirs, rows, speed, walls, left)
            write_json(root / "results.json", results)
            paths = write_report(results, root / "report")
            _log(results, paths)
    print(f"[study] report: {paths['markdown']} and {paths['html']}", file=sys.stderr)
    return results


def run_seeds(config: StudyConfig, root: Path, progress: bool = True) -> dict[int, dict[str, Path]]:
    """The seeds as Ray tasks, all submitted at once; Ray runs as many as the CPUs allow. A seed that also
    runs the ablation and the k sweep (`extras_seeds`) is three tasks: its teacher, importance and compact
    model first, then its baselines and its extras side by side, so that they share the CPUs the other
    seeds leave when they finish instead of running one after the other at the end. A failed seed is
    reported after the others finish, so their finished stages are kept for the resume."""
    import ray
    from tqdm.auto import tqdm

    threads = seed_threads(config.ray.cpus_per_seed)
    options = seed_task_options(config)
    if options["num_gpus"] and not ray.cluster_resources().get("GPU"):  # else the tasks would wait forever
        raise RuntimeError(f"device {config.device!r}: the seed tasks ask Ray for a GPU share, and its cluster "
                           f"has no GPU")
    task = ray.remote(run_seed).options(**options)
    raw = seed_task_config(config, options)
    refs, bases, since = {}, {}, time.time()
    for seed, part in seed_tasks(config):
        args = (raw, seed, str(root / "seeds" / f"seed-{seed}"), threads, part)
        if part == "base":
            bases[seed] = task.remote(*args)
        else:
            refs[task.remote(*args, bases.get(seed))] = seed
    done_dirs: dict[int, dict[str, Path]] = {}
    failed, pending = {}, list(refs)
    with tqdm(total=len(refs), desc="seed tasks", unit="task", disable=not progress) as bar:
        while pending:
            interrupts.check()
            ready, pending = ray.wait(pending, num_returns=1, timeout=PROGRESS_SECONDS)
            bar.set_postfix_str(stage_progress(root / "seeds", since), refresh=True)
            if not ready:
                continue
            seed = refs[ready[0]]
            try:  # a split seed's two tasks each return the base stages and their own
                done_dirs.setdefault(seed, {}).update({k: Path(v) for k, v in ray.get(ready[0]).items()})
            except Exception as error:  # noqa: BLE001 - reported with its seed below (a failed base fails both)
                failed.setdefault(seed, error)
                # Said now, not only at the end: the other seeds may run for hours (Ray's memory monitor kills
                # a seed task when the machine runs short, for one).
                tqdm.write(f"[study] seed {seed} failed: {_reason(error)}; the other seeds go on, and a rerun "
                           f"resumes it from its finished stages", file=sys.stderr)
            bar.update()
    if failed:
        first = min(failed)
        raise RuntimeError(f"seeds {sorted(failed)} failed (finished stages are kept; rerun to resume). "
                           f"Seed {first}: {failed[first]}") from failed[first]
    return done_dirs


def _reason(error: Exception) -> str:
    """One line on why a seed task failed: the exception raised in the task (Ray wraps it, with the task's
    traceback, in a RayTaskError), or Ray's own (a worker killed for memory, for one)."""
    cause = getattr(error, "cause", None) or error
    line = next((text for text in str(cause).splitlines() if text.strip()), "")
    return f"{type(cause).__name__}: {line.strip()[:300]}"


def seed_task_options(config: StudyConfig) -> dict:
    """The Ray options of every seed task: `ray.cpus_per_seed` CPUs, a share of a GPU when the study's device
    asks for one (orchestration.distributed.ray_runtime.gpu_request: four seed tasks to a card; `auto` asks
    only where this driver sees a GPU), no retries, and the pinned kernels' environment when asked for."""
    from orchestration.distributed.ray_runtime import gpu_request

    # Portable numerics are environment variables read when torch loads: Ray starts fresh workers for them.
    env = {"env_vars": PORTABLE_NUMERICS[config.ray.portable_isa]} if config.ray.portable_numerics else None
    return {"num_cpus": config.ray.cpus_per_seed, "num_gpus": gpu_request(config.device), "max_retries": 0,
            "runtime_env": env}


def seed_task_config(config: StudyConfig, options: dict) -> dict:
    """The config a seed task runs (`run_seed`), as plain data. A task given a share of a GPU sees that GPU
    alone (Ray sets CUDA_VISIBLE_DEVICES), as `cuda`; one given none sees none, and runs on the CPU. The device
    is in no stage's key, so the task's stages are the study's."""
    return config_dict(replace(config, device="cuda" if options["num_gpus"] else "cpu"))


def seed_tasks(config: StudyConfig) -> list[tuple[int, str]]:
    """(seed, part) of each seed task in submission order (parts: orchestration.study.seed.SeedRun.run).
    A seed with extras is "base", then "core" and "extras", which start once its "base" is done."""
    split = set(extras_seeds(config)) if (config.ablation or config.sweep.selectors) else set()
    return [(seed, part) for seed in config.seeds
            for part in (("base", "core", "extras") if seed in split else ("all",))]


def stage_progress(seeds_dir: Path, since: float = 0.0) -> str:
    """What the seed tasks have done, read from their stage folders: how many stages are done, which are
    running (started at or after `since`, this invocation's start in epoch seconds), and which are
    unfinished (a folder without its _DONE marker that no task of this invocation has started yet: left by
    an earlier invocation, waiting for its seed's task). Seeds run quietly, so this is the driver's view."""
    stages = [p for p in seeds_dir.glob("seed-*/*") if p.is_dir()]
    running, unfinished = [], []
    for p in sorted(stages):
        if (p / "_DONE").exists():
            continue
        name = f"{p.parent.name}/{p.name.rsplit('-', 1)[0]}"
        (running if _running_since(p) >= since else unfinished).append(name)
    done = len(stages) - len(running) - len(unfinished)
    return "; ".join([f"{done} stages done", *([f"running {', '.join(running)}"] if running else []),
                      *([f"unfinished {', '.join(unfinished)}"] if unfinished else [])])


def _running_since(stage: Path) -> float:
    """When the stage's current run started (its RUNNING marker), or -inf if none is."""
    since = (running_marker(stage) or {}).get("since")
    return float(since) if isinstance(since, (int, float)) else float("-inf")


def collect_rows(seed_dirs: dict[int, dict[str, Path]]) -> list[dict]:
    """Every row every stage wrote, with its per-user file made absolute and its stage named."""
    rows = []
    for seed, dirs in seed_dirs.items():
        for stage, path in dirs.items():
            if not (path / ROWS).exists():
                continue
            for row in json.loads((path / ROWS).read_text()):
                rows.append({**row, "seed": seed, "stage": stage, "per_user": str(path / row["per_user"]),
                             "timing_model": str(path / row["timing_model"]) if row.get("timing_model") else None})
    # Baseline rows never share a table (the estimator ablation does, on purpose: same kept layers, one model).
    files = [r["per_user"] for r in rows if r["table"] == "baselines"]
    shared = {f for f in files if files.count(f) > 1}
    if shared:  # two rows reading one table would silently report the same numbers
        raise RuntimeError(f"per-user tables shared by different rows: {sorted(shared)[:3]}")
    return rows


def _speed(config: StudyConfig, data, dirs: dict[str, Path], rows: list[dict], root: Path) -> dict:
    """The first seed's models in one interleaved benchmark (a resumable stage of its own). Its key names the
    stages it times by their folders' names (stage and input hash), not by where they lie, so an archive
    carries a finished timing to the next machine, and the report renders there from the same figures."""
    key = stage_hash(sorted(f"{p.parent.name}/{p.name}" for p in dirs.values()), config.bench)
    out = Stages(root, reuse=tuple(Path(r) for r in config.reuse)).run(
        "speed", key, lambda out: _time_models(config, data, dirs, rows, out))
    return json.loads((out / "speed.json").read_text())


def _time_models(config: StudyConfig, data, dirs: dict[str, Path], rows: list[dict], out: Path) -> bool:
    """Benchmark the models on the study's device; returns whether the timing is final (a disturbed one is
    redone next run). INT8/INT4 models have CPU kernels only: on a GPU they are left out, and say so.

    The float models are timed first, in one benchmark, before any quantized model exists in the process;
    the quantized ones after it, in a second benchmark against the same teacher (`speed["quantized"]` keeps
    its guard and the teacher's time there). In the SmolLM2 study's first timing they were interleaved, and
    a diagnostic then saw the fp32 teacher's batch-1 median go from 126 to 175 ms after INT8 models had run
    in its process. So the rows the guard judges against a bound are timed where no INT8 kernel has run.
    Only ratios within one benchmark are compared: on a 2-core AMD EPYC the same teacher's batch-1 median
    was 116 ms in one process and 150 to 158 ms in others (2 threads; 2026-12-07)."""
    import torch

    from layerwise.baselines import BASELINES, Budget
    from layerwise.device import resolve_device
    from layerwise.perf.bench import benchmark
    from layerwise.compression.compact import load_compact
    from layerwise.models.checkpoint import is_stripped

    b = config.bench
    if b.threads:
        torch.set_num_threads(b.threads)
    device = resolve_device(config.device)
    sources = {}

    def load(name: str, path: Path):
        """A model to time; one from an archive (weights stripped) is its architecture with fresh values."""
        if is_stripped(path):
            sources[name] = f"{path}: architecture only (weights archived away), fresh values"
        return load_compact(path, architecture_only=is_stripped(path)).eval().to(device)

    teacher, compact = load("teacher", dirs["teacher"] / "model"), load("ours", dirs["ours"] / "model")
    models, quantized = {"teacher": teacher, "ours": compact}, {}
    first = config.seeds[0]
    for row in rows:
        key = row.get("timing")
        if row["seed"] != first or not key or key in models or key in quantized:
            continue
        if row.get("quantized") and device.type != "cpu":
            sources[key] = f"not timed: {row['quantized']} runs on the CPU only, the study on {device}"
        elif row.get("quantized"):
            quantized[key] = row["quantized"]
        elif row.get("timing_model"):
            sources[key] = row["timing_model"]
            models[key] = load(key, Path(row["timing_model"]))
    settings = {"batch_sizes": b.batch_sizes, "runs": b.runs, "warmup": b.warmup, "max_len": config.data.max_len,
                "reference": "teacher", "remeasures": b.remeasures}
    result = benchmark(models, **settings)
    if quantized:  # int8/int4 have no stock save format: quantize the same weights again, after the float timing
        apart = {"teacher": teacher}
        for key, kind in quantized.items():
            apart[key] = BASELINES[kind](data, teacher=teacher, budget=Budget(k=compact.n_layers),
                                         compact=compact)[0].model
            sources[key] = f"re-quantized ({kind}), timed after the float models" + (
                " from the teacher's architecture, fresh values" if "teacher" in sources else "")
        second = benchmark(apart, **settings)
        result["models"].update({key: second["models"][key] for key in quantized})
        result["quantized"] = {"models": sorted(quantized), "guard": second["guard"], "status": second["status"],
                               "teacher": second["models"]["teacher"], "env": second["env"]}
        if second["status"] == "disturbed":
            result["status"] = "disturbed"
    result["sources"] = sources
    write_json(out / "speed.json", result)
    return result["status"] != "disturbed"


def _warn_about_numerics(config: StudyConfig) -> None:
    """Say early when the seeds' bits may not be those of another machine: the pinned instruction set is
    missing here, or an archive comes from a machine unlike this one and keeps a teacher or compact model
    without its weights (a seed that needs it trains it again here, may not reproduce it, and then stops
    at the end of that training: ArchiveMismatch)."""
    from orchestration.study.archive import cpu_has, environment_differences, stripped_needed

    r = config.ray
    if r.portable_numerics and not cpu_has(r.portable_isa):
        print(f"[study] warning: this CPU lacks the {r.portable_isa} instructions that ray.portable_isa pins; "
              f"its models will not have the bits of a machine that has them", file=sys.stderr)
    for root in config.reuse:
        differ = environment_differences(root, r.portable_numerics, seed_threads(r.cpus_per_seed), r.portable_isa)
        stripped = stripped_needed(root)
        if differ and stripped:
            listed = "; ".join(f"{k}: {a} there, {b} here" for k, (a, b) in differ.items())
            print(f"[study] warning: {root} was archived on another kind of machine ({listed}) and keeps "
                  f"{len(stripped)} teacher or compact model(s) without weights ({stripped[0]}...); a seed "
                  f"that trains one again here may not reproduce the archived weights", file=sys.stderr)


def _record_invocation(root: Path, started_at: str, seconds: float | None,
                       reuse: tuple[str, ...] = ()) -> list[dict]:
    """Note this run in <study>/invocations.json: at its start with no time, at its end with its wall time.
    A study resumed after an interruption is several runs; an interrupted one keeps `seconds: null`. A new
    run folder starts from the runs its reused archives record (orchestration.study.archive)."""
    path = root / "invocations.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    if not runs:  # a run folder made afresh from archives goes on from their runs' record
        runs = merge_invocations(*(Path(r) / "invocations.json" for r in reuse))
    if runs and runs[-1]["started"] == started_at:
        runs[-1]["seconds"] = round(seconds, 1)
    else:
        runs.append({"started": started_at, "seconds": seconds})
    write_json(path, runs)
    return runs


def _log(results: dict, paths: dict) -> None:
    from orchestration import tracking

    head = results["headline"]
    tracking.log_metrics({"headline": {"retention": head["retention"]["mean"],
                                       "teacher": head["teacher"]["mean"], "compact": head["compact"]["mean"],
                                       **{f"speedup_{b}": e["mean"] for b, e in head.get("speedup", {}).items()
                                          if e and e.get("mean") is not None}},
                          "wall_seconds": results["protocol"]["wall time (s)"],
                          "stage_seconds": results["protocol"]["stage time summed over seeds (s)"]})
    for table in ("headline", "baselines", "ablation", "k_sweep", "robustness", "scenarios", "importance"):
        if results.get(table) is not None:
            tracking.log_json(results[table], f"tables/{table}.json")
    tracking.log_json(results, "results.json")
    tracking.log_artifacts(Path(paths["markdown"]).parent, artifact_path="report")
