"""Archive a study's finished stages in a folder small enough for the repository, so that a study longer than
one machine's life goes on from another machine:

    layerwise study archive runs/study-beauty-llama --out studies/archive/study-beauty-llama

and, on the next machine, the study run with the archive among its `reuse` roots:

    layerwise study studies/beauty-llama.yaml 'reuse=[studies/archive/study-beauty-llama]'

What a stage keeps in the archive:
- everything its report reads: rows.json, importance.json, noise.json, _seconds.json, and each per-user
  table cut to the columns the report tests (`user` and the study's metric);
- the weights of the models that stages still to run build on (the teacher and our compact model:
  KEEP_WEIGHTS_OF), up to `max_weight_bytes` a stage and no file over 3 MB (MAX_FILE_BYTES, the
  repository's rule: a Beauty teacher's 3.1 MB head, 12k items, is over it);
- every other model stripped of its weights (layerwise.models.checkpoint.strip_weights): the manifest, the
  backbone's config and, for every weight file, its SHA-256 and tensor shapes.
- of a teacher trained with LoRA on a pretrained LLM, too big to keep whole (425 MB for SmolLM2-135M), its
  adapters and own weights when they fit (11.2 MB in float16 for SmolLM2-135M on ml-100k; the one exception
  to the repository's 3 MB rule): the merged backbone is made again from them and the pretrained model, with
  the same bits on any CPU (layerwise.models.rebuild), so the teacher goes to any machine.

- nothing of a compact model too big to keep (a fully healed LLM one) while a stage that reads its weights
  (ours+int8, the noise curves) has not finished after it: the next machine could not make the same bits
  again for them, so it makes the model afresh and runs its readers after it;
- of a stage left unfinished, only its resume files when there are some and they are small (the sums a
  dependency matrix has made so far, an importance stage's finished estimators): the next machine goes on
  from them (orchestration.pipeline.stages.RESUME).

On the next machine a stage found in the archive is not run again. A teacher or compact model whose weights
the archive kept is read from there; a LoRA teacher with its adapters kept is rebuilt. Any other too big to keep
(a fully healed LLM compact model's) is trained again when a stage still to run needs it, and the weights it
makes must have the archived digests or the study stops (orchestration.pipeline.stages). That needs the same
bits, and the same bits need the same packages, thread count and CPU kernels, and in practice the same CPU:
with every kernel pinned to AVX2 (ray.portable_numerics), an Intel Xeon and an AMD EPYC still trained
different Beauty teachers (epoch-1 loss 8.834266071969813 against 8.834267215295272), whichever MKL code path
was pinned. Keeping the weights is what lets a study move between them. The speed stage times the archived
models' architectures with fresh values, which costs the same.
Stages already in the archive are kept as they are (a stage's folder name is the hash of its inputs), except
that a stripped teacher or compact model gets its weights once a run has them with the archived digests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from orchestration.outputs import write_json
from orchestration.pipeline.stages import ARCHIVED, RESUME, cpuinfo, stripped_models

MAX_STAGE_BYTES = 3 * 2**20  # a stage's files besides kept weights: more means weights slipped through
KEEP_WEIGHTS_OF = ("teacher", "ours")  # the stages whose models later stages load (SeedRun.run, complete=True)
MAX_WEIGHT_BYTES = 16 * 2**20  # a stage's kept weights at most; a bigger model is stripped (and trained again)
MAX_FILE_BYTES = 3_000_000  # the repository takes no file over 3 MB but a LoRA teacher's own weights, so a model
                            # with a bigger weight file is stripped (a finished study's: nothing still reads it)
MAX_RESUME_BYTES = 2**20  # an unfinished stage's resume files at most (a 30-layer dependency matrix's: 30 kB)

def archive_study(run_dir: str | Path, out: str | Path, metric: str | None = None,
                  max_weight_bytes: int = MAX_WEIGHT_BYTES) -> dict:
    """Add the finished stages of the study in `run_dir` that `out` lacks, and give a stripped teacher or
    compact model in `out` its weights where `run_dir` has them with the archived digests; returns what was
    added, filled (weights given) and kept, the stages left out unfinished (and those of them whose progress
    was carried), those held back with a compact model whose readers have not run, and the archive's size."""
    from layerwise.models.checkpoint import atomic_directory
    from orchestration.study.rows import METRIC

    run_dir, out, metric = Path(run_dir), Path(out), metric or METRIC
    seeds = run_dir / "seeds"
    if not seeds.is_dir():
        raise FileNotFoundError(f"{run_dir} holds no seeds/ folder: not a study run folder")
    from orchestration.study.seed import OURS_WEIGHTS

    added, filled, kept, unfinished, carried, held = [], [], [], [], [], []
    # A seed whose compact model would be stripped before the stages that read its weights have: that model
    # and those of its readers that finished are left out together.
    waiting = {}
    for ours in seeds.glob("seed-*/ours-*/_DONE"):
        pending = _readers_pending(ours.parent, max_weight_bytes)
        if pending and not (out / "seeds" / ours.parent.parent.name / ours.parent.name / "_DONE").exists():
            waiting[ours.parent.parent] = pending
    for stage in sorted(p for p in seeds.glob("seed-*/*") if p.is_dir()):
        name = f"{stage.parent.name}/{stage.name}"
        target = out / "seeds" / stage.parent.name / stage.name
        if not (stage / "_DONE").exists():
            unfinished.append(name)
            if not (target / "_DONE").exists() and _carry_resume(stage, target):
                carried.append(name)
            continue
        keep = max_weight_bytes if _weights_needed(stage) else 0
        if stage.parent in waiting and not (target / "_DONE").exists() and \
                stage.name.rsplit("-", 1)[0] in ("ours", *OURS_WEIGHTS):
            held.append(name)  # with its seed's compact model (below), made afresh on the next machine
            continue
        if (target / "_DONE").exists():
            if keep and _fill_weights(stage, target, keep):
                filled.append(name)
            else:
                kept.append(name)
            continue
        with atomic_directory(target) as tmp:
            stripped, weights = _copy_stage(stage, tmp, metric, keep)
            write_json(tmp / ARCHIVED, {"from": f"{run_dir.resolve().name}/{name}", "stripped": stripped,
                                        "weights_kept": weights, "table_columns": ["user", metric]})
            size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file() and f.suffix != ".safetensors")
            if size > MAX_STAGE_BYTES:
                raise ValueError(f"{name} would take {size / 2**20:.1f} MB in the archive besides its weights "
                                 f"(limit {MAX_STAGE_BYTES / 2**20:.0f} MB): something other than tables and "
                                 f"JSON is in it")
        added.append(name)
    for stage in sorted(p for p in run_dir.glob("speed-*") if (p / "_DONE").is_file()):
        # the study's timing (JSON alone): the next machine renders the report from the same figures
        if not (out / stage.name / "_DONE").exists():
            with atomic_directory(out / stage.name) as tmp:
                for f in stage.iterdir():
                    if f.is_file() and f.suffix in (".json", "") and f.stat().st_size <= MAX_STAGE_BYTES:
                        shutil.copy2(f, tmp / f.name)
            added.append(stage.name)
    runs = merge_invocations(out / "invocations.json", run_dir / "invocations.json")
    if runs:  # every run of the study, on whichever machine: the report's wall time and invocations
        write_json(out / "invocations.json", runs)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else None
    if config is not None:  # what the archived stages were run with (no machine's paths)
        base = _study_cwd(run_dir, config.get("run_dir", "runs"))
        reuse = [os.path.relpath(r, base) if os.path.isabs(r) else r for r in config.get("reuse", [])]
        write_json(out / "config.json", {**config, "reuse": reuse})
    if added:  # the machine that made them: another one may not reproduce the weights (Stages.run checks)
        ray = (config or {}).get("ray", {})
        write_json(out / "environment.json", environment(ray.get("portable_numerics", False),
                                                         seed_threads(ray.get("cpus_per_seed", 1.0)),
                                                         ray.get("portable_isa", "avx2")))
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    held = [f"{name} (its seed's compact model is too big to keep and {', '.join(waiting[seeds / name.split('/')[0]])} "
            f"have not read it yet)" for name in held]
    return {"added": added, "filled": filled, "kept": kept, "unfinished": unfinished, "carried": carried,
            "held": held, "bytes": total}


def merge_invocations(*paths: Path) -> list[dict]:
    """The runs that the invocations.json files at `paths` record (orchestration.study.driver), each once,
    in the order they started; a run with its wall time wins over the same run noted without one."""
    runs: dict[str, dict] = {}
    for path in paths:
        for run in json.loads(path.read_text()) if path.is_file() else []:
            if run["started"] not in runs or runs[run["started"]].get("seconds") is None:
                runs[run["started"]] = run
    return sorted(runs.values(), key=lambda run: run["started"])


def _carry_resume(stage: Path, target: Path) -> bool:
    """Put the unfinished `stage`'s resume files (orchestration.pipeline.stages.RESUME) in the archive at
    `target`, in place of any earlier ones (the run went on from those), when there are some and they are
    small; the folder gets nothing else and no done marker, so a study resumed from the archive runs the
    stage, from there. Returns whether it did."""
    from layerwise.models.checkpoint import atomic_directory

    files = [f for f in (stage / RESUME).rglob("*") if f.is_file()] if (stage / RESUME).is_dir() else []
    if not files or sum(f.stat().st_size for f in files) > MAX_RESUME_BYTES:
        return False
    with atomic_directory(target / RESUME) as tmp:
        shutil.copytree(stage / RESUME, tmp, dirs_exist_ok=True)
    return True


def _study_cwd(run_dir: Path, configured: str) -> Path:
    """The folder the study ran from (its config's `run_dir` is relative to it), so that the archived config
    names the reused folders as the study's YAML did (studies/archive/...), not by this machine's paths. Runs
    record them as the YAML names them; older ones recorded absolute paths, which this makes relative."""
    base = run_dir.resolve().parent
    if Path(configured).is_absolute():
        return base
    for _ in Path(configured).parts:
        base = base.parent
    return base


def cpu_has(isa: str) -> bool:
    """Whether this CPU has the instructions of orchestration.study.config PORTABLE_NUMERICS[isa] (from
    /proc/cpuinfo's flags; True where that cannot be read)."""
    flags = cpuinfo("flags")
    return flags is None or {"avx2": {"avx2"}, "avx512_bf16": {"avx512f", "avx512_bf16"}}[isa] <= set(flags.split())


def seed_threads(cpus_per_seed: float) -> int:
    """The torch threads of a seed task with `ray.cpus_per_seed` CPUs."""
    return max(1, int(cpus_per_seed))


def environment(portable: bool = False, threads: int = 1, isa: str = "avx2") -> dict:
    """What decides whether a machine trains a seed's models to the same bits as another: the packages, the
    seed tasks' torch threads (sums split by thread), and the CPU kernels: the pinned instruction set `isa`
    for seeds run with its PORTABLE_NUMERICS, else the CPU's own."""
    import platform

    import torch
    import transformers

    cpu = cpuinfo("model name") or platform.processor()
    kernels = f"portable ({isa.upper()})" if portable else torch.backends.cpu.get_cpu_capability()
    return {"torch": torch.__version__, "transformers": transformers.__version__, "cpu_kernels": kernels,
            "torch_threads": threads, "cpu": cpu, "python": platform.python_version()}


def environment_differences(archive: str | Path, portable: bool = False, threads: int = 1,
                            isa: str = "avx2") -> dict[str, tuple]:
    """{what: (the archive's, this machine's)} where they differ in what may decide the trained bits; empty
    for a folder that is no archive. The CPU's name counts: pinned kernels did not make an Intel and an AMD
    CPU agree (the module's docstring)."""
    path = Path(archive) / "environment.json"
    if not path.exists():
        return {}
    theirs, ours = json.loads(path.read_text()), environment(portable, threads, isa)
    return {k: (theirs[k], ours.get(k)) for k in theirs if theirs[k] != ours.get(k)}


def stripped_needed(archive: str | Path) -> list[str]:
    """The archived stages (seed-N/<name>-<key>) whose models later stages load but whose weights were
    stripped, and cannot be rebuilt from adapters: a study resumed from the archive trains those again where
    it needs them."""
    from layerwise.models.rebuild import rebuildable

    seeds = Path(archive) / "seeds"
    stages = sorted(p for p in seeds.glob("seed-*/*") if p.is_dir()) if seeds.is_dir() else []
    return [f"{s.parent.name}/{s.name}" for s in stages
            if _weights_needed(s) and any(not rebuildable(s / m) for m in stripped_models(s))]


def _weights_needed(stage: Path) -> bool:
    """Whether later stages load the models of this stage folder (<name>-<12 hex key>)."""
    return stage.name.rsplit("-", 1)[0] in KEEP_WEIGHTS_OF


def _in_checkpoint(rel: Path) -> bool:
    """Whether a path inside a stage lies in a training run's or the stage's resume state (never archived
    with a finished stage)."""
    return any(part.endswith("-checkpoint") for part in rel.parts) or rel.parts[:1] == (RESUME,)


def _model_dirs(stage: Path) -> list[Path]:
    return sorted(p.parent for p in stage.rglob("manifest.json") if not _in_checkpoint(p.relative_to(stage)))


def _fits_whole(models: list[Path], max_weight_bytes: int) -> bool:
    """Whether the models' weights may be kept whole: at most `max_weight_bytes` in all, no file over
    MAX_FILE_BYTES."""
    files = [f.stat().st_size for m in models for f in m.rglob("*.safetensors")]
    return 0 < sum(files) <= max_weight_bytes and max(files) <= MAX_FILE_BYTES


def _what_is_kept(models: list[Path], max_weight_bytes: int) -> tuple[bool, dict[Path, list[str]]]:
    """(whether the models are kept whole, {model: the files kept of it} for LoRA models rebuilt from their
    adapters) within `max_weight_bytes` (and, kept whole, no file over MAX_FILE_BYTES); neither: the models
    are stripped."""
    from layerwise.models.rebuild import kept_files

    whole = _fits_whole(models, max_weight_bytes)
    # A LoRA-trained model too big to keep whole keeps its adapters and own weights, from which it is rebuilt
    # (layerwise.models.rebuild), when those fit.
    small = {m: kept_files(m) for m in models} if max_weight_bytes and not whole else {}
    if not small or any(files is None for files in small.values()) or \
            sum((m / f).stat().st_size for m, files in small.items() for f in files) > max_weight_bytes:
        small = {}
    return whole, small


def _readers_pending(stage: Path, max_weight_bytes: int) -> list[str]:
    """For our compact model's stage, when the archive would strip it (a model healed in full, too big to
    keep): the stages that read its weights (orchestration.study.seed.OURS_WEIGHTS) that have not finished
    after it in its seed folder. Archived without them, the model would be trained again on the next machine,
    which in practice gives other bits (ArchiveMismatch); left out, it is made afresh there with its readers.
    The ours+int8 baseline counts only if the study's config lists it."""
    from orchestration.study.seed import OURS_WEIGHTS

    models = _model_dirs(stage)
    if stage.name.rsplit("-", 1)[0] != "ours" or not models or any(_what_is_kept(models, max_weight_bytes)):
        return []
    config = stage.parents[2] / "config.json"
    baselines = json.loads(config.read_text()).get("baselines", []) if config.exists() else ["ours+int8"]
    readers = [r for r in OURS_WEIGHTS if r != "baseline-ours-int8" or "ours+int8" in baselines]
    made = (stage / "_DONE").stat().st_mtime
    finished = {p.parent.name.rsplit("-", 1)[0] for p in stage.parent.glob("*/_DONE") if p.stat().st_mtime >= made}
    return [r for r in readers if r not in finished]


def _copy_stage(stage: Path, out: Path, metric: str, max_weight_bytes: int = 0) -> tuple[list[str], list[str]]:
    """Copy one finished stage folder into `out` as the archive keeps it: its models whole when their
    weights come to at most `max_weight_bytes`, else stripped. Returns (stripped, kept whole) model folders."""
    from layerwise.models.checkpoint import strip_weights

    models = _model_dirs(stage)
    whole, small = _what_is_kept(models, max_weight_bytes)
    stripped, weights = [], []
    for path in sorted(stage.rglob("*")):
        rel = path.relative_to(stage)
        if _in_checkpoint(rel):
            continue
        model = next((m for m in models if m == path or m in path.parents), None)
        if model is not None:
            if model == path:
                if whole:
                    shutil.copytree(model, out / rel)
                    weights.append(rel.as_posix())
                else:
                    strip_weights(model, out / rel, keep=small.get(model, ()))
                    stripped.append(rel.as_posix())
            continue
        if path.is_dir():
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            columns = [c for c in ("user", metric) if c in table.column_names]
            pq.write_table(table.select(columns), out / rel, compression="zstd")
        else:
            shutil.copy2(path, out / rel)
    return stripped, weights


def _fill_weights(stage: Path, target: Path, max_weight_bytes: int) -> bool:
    """Give the archived stage `target` the weights of its stripped models from the run's `stage`, when the
    run has them all, they fit in `max_weight_bytes`, and every file has its archived digest (a run that
    trained them again was checked so by Stages.run; one that trained them afresh on another machine was
    not, and is refused). Returns whether it did."""
    from layerwise.models.checkpoint import STRIPPED, atomic_directory, is_stripped, weight_digests

    record = json.loads((target / ARCHIVED).read_text()) if (target / ARCHIVED).exists() else {}
    missing = record.get("stripped", [])
    sources = [stage / rel for rel in missing]
    if not missing or any(not (s / "manifest.json").exists() or is_stripped(s) for s in sources):
        return False
    if not _fits_whole(sources, max_weight_bytes):
        return False
    for rel, source in zip(missing, sources):
        if weight_digests(source) != weight_digests(target / rel):
            raise ValueError(f"{stage}: {rel} has other weights than the archived {target / rel}; the archive's "
                             f"stages were computed from those. Archive this run into a new folder instead")
    for rel, source in zip(missing, sources):  # the weight files only: the manifest stays the archived run's
        with atomic_directory(target / rel) as tmp:
            shutil.copytree(target / rel, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STRIPPED))
            for weights in source.rglob("*.safetensors"):
                (tmp / weights.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(weights, tmp / weights.relative_to(source))
    write_json(target / ARCHIVED, {**record, "stripped": [],
                                   "weights_kept": sorted([*record.get("weights_kept", []), *missing])})
    return True
