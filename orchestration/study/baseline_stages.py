"""The baseline stages of a seed: each compression baseline (orchestration.baselines) under our model's
budget, its models evaluated as rows. Mixed into orchestration.study.seed.SeedRun, whose teacher, compact
model and `_evaluate` they use.

A baseline that makes a model per draw (random layers: three draws, each healed for half an hour on a
30-layer LLM) keeps every finished draw under resume/, so a stage stopped between draws makes only the
draws it lacks. On the first seed, one model of each architecture is saved under the stage's timing/ for the
driver's interleaved speed benchmark (`save_timing_model`; compact models of the k sweep use it too).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from orchestration.outputs import slug, write_json
from orchestration.pipeline.stages import RESUME
from orchestration.study.rows import ROWS


class BaselineStages:
    """`baseline_stage(name)`: the stage function of baseline `name` in SeedRun's plan."""

    def baseline_stage(self, name: str) -> Callable[[Path], None]:
        def stage(out: Path) -> None:
            from layerwise.baselines import PER_DRAW_BASELINES
            from orchestration.baselines.method import run_method

            budget = self._budget()
            if name in PER_DRAW_BASELINES:  # one draw at a time, each kept once made
                rows = []
                for draw in budget.seeds:
                    rows += self._draw_rows(name, replace(budget, seeds=(draw,)), out, first=len(rows))
            else:
                variants = run_method(name, self.data, self.teacher, budget, self.compact, self.progress)
                rows = self._variant_rows(name, variants, out)
            if self.seed == self.config.seeds[0]:  # a draw made on another machine left its timing model there
                for row in (r for r in rows if r.get("timing")):
                    found = (out / timing_path(row["timing"]) / "manifest.json").exists()
                    row["timing_model"] = timing_path(row["timing"]) if found and not row.get("quantized") else None
            write_json(out / ROWS, rows)

        return stage

    def _variant_rows(self, name: str, variants: list, out: Path, first: int = 0) -> list[dict]:
        """Evaluate a baseline's variants as rows of its stage (their per-user tables numbered from `first`:
        draws of a randomised baseline share a row name, not a file). On the first seed, the first model of
        each architecture is saved for the driver's speed benchmark."""
        from layerwise.baselines import is_quantized

        rows = []
        for i, v in enumerate(variants, start=first):
            timing = v.timing or None
            row = self._evaluate(v.model, out, v.row, _group(name), "baselines", file=f"{i:02d}-{slug(v.row)}",
                                 method=name, timing=timing,
                                 n_layers=getattr(v.model, "n_layers", None), training=v.training,
                                 kept=v.info.get("kept"), draw=v.info.get("seed"))
            if timing and self.seed == self.config.seeds[0]:
                if is_quantized(v.model):
                    row["quantized"] = name  # rebuilt for timing: int8/int4 of the teacher or of ours
                elif not (out / timing_path(timing) / "manifest.json").exists():
                    save_timing_model(v.model, out, timing, {"kind": "baseline", "row": v.row})
            rows.append(row)
        return rows

    def _draw_rows(self, name: str, budget, out: Path, first: int) -> list[dict]:
        """The rows of one draw (`budget.seeds`: that draw alone) of a baseline that makes a pair per draw.
        Once made, they and their per-user tables are kept under resume/ with the draw's wall and CPU
        seconds, so that a stage stopped between draws (the end of a machine's session: a random draw of
        SmolLM2 takes 35 minutes), here or on the machine of an archive that carried them, makes only the
        draws it lacks. Each draw's healing keeps its epochs in a checkpoint folder of its own."""
        from layerwise.training.resume import stage_checkpoints
        from orchestration.baselines.method import run_method

        draw = budget.seeds[0]
        path = out / RESUME / f"draw-{draw}.json"
        if not path.exists():
            started, cpu = time.monotonic(), time.process_time()
            with stage_checkpoints(out / "heal-checkpoint" / f"draw-{draw}"):
                variants = run_method(name, self.data, self.teacher, budget, self.compact, self.progress)
            rows = self._variant_rows(name, variants, out, first)
            for row in rows:
                (out / RESUME / row["per_user"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / row["per_user"], out / RESUME / row["per_user"])
            write_json(path, {"draw": draw, "rows": rows, "seconds": time.monotonic() - started,
                              "cpu_seconds": time.process_time() - cpu})
        rows = json.loads(path.read_text())["rows"]
        for row in rows:  # made in an earlier invocation, maybe on another machine
            if not (out / row["per_user"]).exists():
                (out / row["per_user"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / RESUME / row["per_user"], out / row["per_user"])
        return rows

    def _budget(self):
        """Our model's budget as the baselines get it: its depth and parameters, the healing recipe, the
        random draws' seeds, and the teacher's own training recipe and build (for students and scratch)."""
        from layerwise.baselines import Budget
        from layerwise.baselines.budget import n_parameters
        from layerwise.models.checkpoint import read_manifest
        from orchestration.baselines.method import teacher_build, teacher_train_config

        heal = replace(self.config.compress.heal, max_len=self.max_len, seed=self.seed)
        draws = tuple(self.seed + 1000 * i for i in range(self.config.random_draws))
        manifest = read_manifest(self.dirs["teacher"] / "model")
        return Budget(k=self.k, heal=heal, bridge_rank=self.config.compress.bridge_rank,
                      removed=n_parameters(self.teacher) - self.compact_parameters, seeds=draws,
                      train=teacher_train_config(manifest), build=teacher_build(manifest),
                      ablation_users=self.config.compress.ablation_users)


def timing_path(timing: str) -> str:
    """Where, relative to its stage, the model timed as `timing` is saved."""
    return f"timing/{slug(timing)}"


def save_timing_model(model, out: Path, timing: str, manifest: dict) -> None:
    """Save a model for the driver's speed benchmark under the stage's timing/ folder."""
    from layerwise.models.checkpoint import save_recommender

    save_recommender(model, out / timing_path(timing), manifest)


def _group(name: str) -> str:
    """The report's group of a baseline's rows."""
    return {"mostpop": "popularity", "nas": "search", "magnitude": "pruning", "width": "pruning",
            "int8": "quantization", "int4": "quantization", "ours+int8": "quantization",
            "distilbert": "students", "tinybert": "students", "scratch": "students"}.get(name, "depth")
