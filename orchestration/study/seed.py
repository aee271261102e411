"""One seed of a study: teacher, importance, our compact model, the baselines, the noise curves, the
dependency matrix (first seed: orchestration.study.dependency), the ablation (orchestration.study.ablation)
and the k sweep; the baselines' stages are orchestration.study.baseline_stages. Each is a resumable stage under <study>/seeds/seed-<s>/<stage>-<hash>/.

The seed sets the teacher's initialisation and data order, the calibration draw, the bridges' init and
the healing order (and the first random-layer draw). Every model a stage evaluates leaves one row in the
stage's rows.json and its per-user test metrics (full ranking, seen items excluded) in eval/<row>.parquet;
the driver (orchestration.study.driver) reads nothing else. On the first seed, the baseline stages also save one
model per architecture under timing/ so that the driver can time them all in one interleaved benchmark.

Every model of a seed is placed on the study's device (`device:`, layerwise.device) and the library's loops
follow it; models a stage builds afresh (students, scratch) start on the CPU, the same weights everywhere,
and are moved there. INT8 and INT4 quantization have CPU kernels only: those rows run on the CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from layerwise.device import autocast_for, resolve_device
from orchestration.pipeline.config import stage_hash
from orchestration.pipeline.stages import RESUME, Stages, stripped_models
from orchestration.outputs import slug, write_json
from orchestration.pipeline.steps import load_importance
from orchestration.study.ablation import ABLATION_BRIDGE_RANK, AblationStages, heal_record
from orchestration.study.baseline_stages import BaselineStages, save_timing_model, timing_path
from orchestration.study.config import StudyConfig, extras_seeds
from orchestration.study.dependency import DependencyStage
from orchestration.study.rows import ROWS
from orchestration.study.teacher import train_teacher

PARTS = ("all", "base", "core", "extras")  # how a seed's stages split into tasks (SeedRun.run)

# The stages that read our compact model's weights (quantizing it, its noise curves); the rest need only its
# parameter count.
OURS_WEIGHTS = ("baseline-ours-int8", "noise")


class SeedRun(AblationStages, BaselineStages, DependencyStage):
    """The stages of one seed. `run()` executes (or resumes) them all and returns their directories."""

    def __init__(self, config: StudyConfig, seed: int, root: Path, data, progress: bool = False):
        self.config, self.seed, self.root, self.data, self.progress = config, seed, root, data, progress
        self.max_len = config.data.max_len
        self.stages = Stages(root, reuse=tuple(Path(r) / "seeds" / root.name for r in config.reuse))
        self.dirs: dict[str, Path] = {}
        # Resolved by run() (_place): planned() reads the stages on any machine, with a GPU or not.
        self._place(torch.device("cpu"))

    # --- the sequence ---------------------------------------------------------------------------------
    def run(self, part: str = "all") -> dict[str, str]:
        """Run (or resume) the seed's stages and return the directories of those it went through.

        `part` splits a seed that also runs the ablation and the k sweep into two tasks that can run at
        once: "base" is the teacher, its importance and our compact model; "core" and "extras" go through
        "base" (done by then) and run the baselines and noise, or the ablation and the sweep. "all" is all.
        """
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
        from layerwise.baselines.budget import n_parameters
        from layerwise.compression.compact import load_compact
        from layerwise.compression.compress import n_kept
        from layerwise.models.checkpoint import read_manifest

        c = self.config
        self._place(resolve_device(c.device))
        teacher_key, imp_key, ours_key = self._keys()
        self._stage("teacher", teacher_key, self._teacher)
        self.n_layers = read_manifest(self.dirs["teacher"] / "model")["n_layers"]
        self.k = n_kept(c.compress.keep, self.n_layers)
        rest = self._plan(part, imp_key, ours_key)
        # The teacher's and our model's weights are read only by stages still to run. From an archive that
        # stripped them (too big to keep), they are made again when needed, and must come out the same
        # (Stages.run). The "base" task makes them for the seed's other two tasks, which must not both make
        # them at once.
        pending = [name for name, key, _ in (self._plan("all", imp_key, ours_key) if part == "base" else rest)
                   if not self.stages.done(name, key)]
        if pending or not (self.stages.done("importance", imp_key) and self.stages.done("ours", ours_key)):
            self._stage("teacher", teacher_key, self._teacher, complete=True)
            self.teacher = load_compact(self.dirs["teacher"] / "model").eval().requires_grad_(False).to(self.device)
        self._stage("importance", imp_key, self._importance)
        self.scores = load_importance(self.dirs["importance"])
        # Few stages read our model's weights (OURS_WEIGHTS), and they run right after it: an LLM compact model
        # is too big to archive, so a study that spans machines finishes them on the machine that made it.
        needs_ours = [name for name in pending if name in OURS_WEIGHTS]
        self._stage("ours", ours_key, self._ours, complete=bool(needs_ours))
        if pending:
            ours = self.dirs["ours"] / "model"
            self.compact = load_compact(ours).eval().to(self.device) if needs_ours else None
            self.compact_parameters = n_parameters(load_compact(ours, architecture_only=True))  # the budget's
        for name, key, fn in sorted(rest, key=lambda stage: stage[0] not in OURS_WEIGHTS):
            self._stage(name, key, fn)
        order = ["teacher", "importance", "ours", *(name for name, _, _ in rest)]  # the plan's, for the report
        return {name: str(self.dirs[name]) for name in order if name in self.dirs}

    def planned(self) -> list[tuple[str, str]]:
        """(name, key) of every stage of the seed in running order, running nothing (orchestration.study.status).
        The k sweep's stages are listed once the teacher's depth is known, unless `sweep.ks` names them."""
        from layerwise.models.checkpoint import read_manifest

        teacher_key, imp_key, ours_key = self._keys()
        state, teacher = self.stages.state("teacher", teacher_key)
        self.n_layers = read_manifest(teacher / "model")["n_layers"] if state in ("done", "reused") else None
        return [("teacher", teacher_key), ("importance", imp_key), ("ours", ours_key),
                *((name, key) for name, key, _ in self._plan("all", imp_key, ours_key))]

    def _keys(self) -> tuple[str, str, str]:
        """The keys of the teacher, importance and our-model stages; every later stage's key derives from them."""
        c = self.config
        teacher_key = stage_hash(c.data, self.data.fingerprint, c.teacher, self.seed)
        users = [c.compress.ablation_users] if c.compress.ablation_users else []  # hashed only when set
        imp_key = stage_hash(teacher_key, c.compress.calib_batches, c.compress.calib_batch_size, *users)
        return teacher_key, imp_key, stage_hash(imp_key, c.compress)

    def _plan(self, part: str, imp_key: str, ours_key: str) -> list[tuple[str, str, Callable[[Path], Any]]]:
        """The stages of `part` after our compact model: (name, key, stage function) in running order."""
        c = self.config
        plan = []
        if part in ("all", "core"):
            plan += [(f"baseline-{slug(name)}", stage_hash(ours_key, name, c.random_draws), self.baseline_stage(name))
                     for name in c.baselines]
            plan.append(("noise", stage_hash(ours_key, c.noise), self._noise))
            if self.seed == c.seeds[0]:  # the report's heatmap, after the rows that answer the question
                plan.append(self.dependency_stage(imp_key))
        if part in ("all", "extras") and self.seed in extras_seeds(c):
            for component in c.ablation:
                # The pre-fitting ablation's key names its bridge rank (it once ran, as a no-op, with none).
                rank = [c.compress.bridge_rank or ABLATION_BRIDGE_RANK] if component == "prefit" else []
                plan.append((ablation_stage(component), stage_hash(ours_key, component, *rank),
                             self._ablation(component)))
            for selector in c.sweep.selectors:
                for k in self._sweep_ks():
                    key = stage_hash(imp_key, c.compress, selector, k, c.sweep.heal_epochs)
                    plan.append((sweep_stage(selector, k), key, self._sweep(selector, k)))
        return plan

    def _place(self, device: torch.device) -> None:
        """Run the seed's models on `device`. Every stage's timing records its machine (Stages.run), the device
        and the precision the study trains in there (on CUDA an unset autocast is bf16 where the card has it:
        layerwise.device.autocast_for)."""
        c = self.config
        self.device = device
        self.stages.context = {"device": str(device), "precision": {
            "teacher": autocast_for(c.teacher.train.autocast, device) or "float32",
            "heal": autocast_for(c.compress.heal.autocast, device) or "float32"}}

    def _stage(self, name: str, key: str, fn: Callable[[Path], Any], complete: bool = False) -> None:
        self.dirs[name] = self.stages.run(name, key, fn, complete=complete)

    def _sweep_ks(self) -> list[int]:
        n = self.n_layers
        if n is None:  # planned() before the teacher exists: only the ks the config names are known
            return list(self.config.sweep.ks)
        ks = self.config.sweep.ks or tuple(range(1, n))
        bad = [k for k in ks if k >= n]
        if bad:
            raise ValueError(f"sweep.ks {bad} must be below the teacher's {n} layers")
        return list(ks)

    # --- stages ---------------------------------------------------------------------------------------
    def _teacher(self, out: Path) -> None:
        archived = self.stages.archived("teacher", self._keys()[0])
        reproduce = archived / "model" if archived is not None and "model" in stripped_models(archived) else None
        model, result = train_teacher(self.config.teacher, self.data, self.config.data.dataset, self.seed,
                                      self.max_len, out / "model", self.progress, reproduce=reproduce,
                                      device=self.device)
        rows = [self._evaluate(model, out, "teacher", "teacher", "headline",
                               n_layers=model.n_layers, training=heal_record(result))]
        write_json(out / ROWS, rows)

    def _importance(self, out: Path) -> None:
        """Every estimator's scores. Each part is kept under resume/ once made (the ablations take half an
        hour or more on a 30-layer LLM), so that a stage stopped midway, here or on the machine of an archive
        that carried them, makes only the rest."""
        from layerwise.compression.importance import IMPORTANCE, LOCAL_METHODS, compute_importance

        c = self.config.compress
        users = {"data": self.data, "max_users": c.ablation_users, "seed": self.seed}
        parts = {"local": lambda: compute_importance(self.teacher, self._batches(), methods=LOCAL_METHODS),
                 "ablation": lambda: {"ablation": IMPORTANCE["ablation"](self.teacher, self._batches(), **users)},
                 "ablation_loss": lambda: {"ablation_loss": IMPORTANCE["ablation_loss"](self.teacher,
                                                                                       self._batches(), **users)}}
        scores, cpu = {}, {}
        for part, make in parts.items():
            path = out / RESUME / f"importance-{part}.json"
            timing = out / RESUME / f"importance-{part}.cpu.json"  # kept apart: parts made before have none
            if not path.exists():
                started = time.process_time()
                made = {m: v.tolist() for m, v in make().items()}
                write_json(timing, {"cpu_seconds": time.process_time() - started})
                write_json(path, made)
            scores.update(json.loads(path.read_text()))
            cpu[part] = json.loads(timing.read_text())["cpu_seconds"] if timing.exists() else None
        # Each part's CPU seconds, made here or in an earlier invocation (the stage's _seconds.json times only
        # its last one): the equal-compute view charges them to ours (orchestration.study.compute).
        record = {"n_layers": self.teacher.n_layers, "ablation_users": c.ablation_users, "scores": scores,
                  "cpu_seconds": cpu}
        if c.selector == "beam":  # it selects with the dependency matrix; otherwise only the report reads it
            record["dependency_loss"] = self.dependency_matrix(out / RESUME / "removal_losses.json")
            cpu["dependency"] = None  # not timed apart: its chunks resume across invocations
        write_json(out / "importance.json", record)

    def _ours(self, out: Path) -> None:
        from layerwise.compression.compact import build_compact, save_compact
        from layerwise.compression.compress import compress

        config = self._compress_config()
        result = compress(self.teacher, self.data, config, progress=self.progress, precomputed=self.scores)
        save_compact(result.model, out / "model", {"dataset": self.config.data.dataset,
                                                   "data_fingerprint": self.data.fingerprint,
                                                   "max_len": self.max_len, **result.manifest(config)})
        unhealed = build_compact(self.teacher, result.kept, config.bridge_rank, seed=config.seed).eval()
        write_json(out / ROWS, [
            self._evaluate(result.model, out, "ours", "ours", "headline", n_layers=result.model.n_layers,
                           kept=result.kept, training=heal_record(result.heal)),
            self._evaluate(unhealed, out, "ours, unhealed", "ablation", "ablation", kept=result.kept,
                           n_layers=unhealed.n_layers, component="heal"),
        ])

    def _ablation(self, component: str) -> Callable[[Path], None]:
        def stage(out: Path) -> None:
            write_json(out / ROWS, self.ablation_rows(component, out))

        return stage

    def _sweep(self, selector: str, k: int) -> Callable[[Path], None]:
        def stage(out: Path) -> None:
            real = self.config.compress.selector if selector == "ours" else selector
            heal = replace(self.config.compress.heal, epochs=self.config.sweep.heal_epochs)
            config = self._compress_config(keep=k / self.teacher.n_layers, selector=real, heal=heal,
                                           method=self.config.compress.method if selector == "ours" else None)
            # Our model at each other k is timed too (the same architecture as any selector's at that k).
            timing = f"ours k={k}" if selector == "ours" and k != self.k else None
            write_json(out / ROWS, [self._compress_row(config, out, f"{selector} k={k}", "sweep", timing=timing,
                                                        selector=selector, k=k)])

        return stage

    def _noise(self, out: Path) -> None:
        from layerwise.device import device_scorer
        from layerwise.evaluation.evaluate import evaluate
        from layerwise.evaluation.noise import NoisyData

        models = {"teacher": self.teacher, "compact": self.compact}
        rows = []
        for level in self.config.noise.levels:
            for kind in self.config.noise.kinds:
                view = self.data if level == 0 else NoisyData(self.data, kind, level, seed=self.seed)
                for model_name, model in models.items():
                    result = evaluate(device_scorer(model), view, stage="test", exclude_seen=True,
                                      max_len=self.max_len)
                    rows.append({"model": model_name, "kind": kind, "level": level, "means": result.means})
                if level == 0:  # clean data: the same for every kind
                    rows += [{**r, "kind": k} for r in rows[-len(models):] for k in self.config.noise.kinds
                             if k != kind]
                    break
        write_json(out / "noise.json", rows)

    # --- helpers --------------------------------------------------------------------------------------
    def _batches(self):
        from layerwise.compression.compress import calibration_batches

        c = self.config.compress
        return calibration_batches(self.teacher, self.data, c.calib_batches, c.calib_batch_size, self.max_len,
                                   self.seed)

    def _compress_config(self, **changes):
        from layerwise.compression.compress import CompressConfig

        s = self.config.compress
        heal = changes.pop("heal", s.heal)
        base = dict(keep=s.keep, selector=s.selector, method=s.method, bridge_rank=s.bridge_rank,
                    calib_batches=s.calib_batches, calib_batch_size=s.calib_batch_size, seed=self.seed,
                    ablation_users=s.ablation_users)
        return CompressConfig(**{**base, **changes}, heal=replace(heal, max_len=self.max_len, seed=self.seed))

    def _compress_row(self, config, out: Path, row: str, table: str, timing: str | None = None, **extra) -> dict:
        """Compress and heal with `config`, evaluate; with `timing` (first seed only), also save the model
        under out/timing/ for the driver's speed benchmark."""
        from layerwise.compression.compress import compress

        result = compress(self.teacher, self.data, config, progress=self.progress, precomputed=self.scores)
        h = config.heal
        recipe = {"bridge_rank": config.bridge_rank, "bridges": len(result.model.bridges),
                  "prefit_steps": h.prefit_steps, "kd_weight": h.kd_weight, "hidden_weight": h.hidden_weight,
                  "heal_epochs": h.epochs}
        evaluated = self._evaluate(result.model, out, row, table, table, kept=result.kept, recipe=recipe,
                                   n_layers=result.model.n_layers, training=heal_record(result.heal), **extra)
        if timing and self.seed == self.config.seeds[0]:
            save_timing_model(result.model, out, timing, {"kind": "compact", "row": row})
            evaluated.update(timing=timing, timing_model=timing_path(timing))
        return evaluated

    def _evaluate(self, model, out: Path, row: str, group: str, table: str, file: str | None = None,
                  **extra) -> dict:
        """Test metrics of `model` (a recommender, scored where it is: layerwise.device.device_scorer; or a
        scorer baseline's function) as a row of the stage, its per-user table under out/eval/."""
        from layerwise.device import device_scorer
        from layerwise.evaluation.evaluate import evaluate

        scorer = device_scorer(model) if isinstance(model, torch.nn.Module) else model
        result = evaluate(scorer, self.data, stage="test", exclude_seen=True, max_len=self.max_len)
        path = out / "eval" / f"{file or slug(row)}.parquet"
        result.to_parquet(path)
        return {"row": row, "group": group, "table": table, "seed": self.seed,
                "per_user": str(path.relative_to(out)), "means": result.means, **extra}


def ablation_stage(component: str) -> str:
    """The stage folder's name (before its key) of one ablation component."""
    return f"ablation-{component}"


def sweep_stage(selector: str, k: int) -> str:
    """The stage folder's name (before its key) of one point of the k sweep."""
    return f"sweep-{selector}-k{k}"


def run_seed(config_dict: dict, seed: int, root: str, threads: int = 1, part: str = "all",
             after: Any = None) -> dict[str, str]:
    """Entry point of a seed's Ray task: rebuild the config, load the (cached) data, run the stages of
    `part` (SeedRun.run). `after` is unused: passing a task's result there makes Ray start this one after it."""
    from orchestration.pipeline.config import _build
    from orchestration.study.config import StudyConfig
    from layerwise.data import load_dataset

    torch.set_num_threads(max(1, threads))
    config = _build(StudyConfig, config_dict, "")
    d = config.data
    data = load_dataset(d.dataset, data_dir=d.data_dir, cache_dir=d.cache_dir, min_core=d.min_core)
    return SeedRun(config, seed, Path(root), data).run(part)
