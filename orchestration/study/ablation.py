"""The ablation's stages of a seed: our compact model made again with one part of the method left out or
changed (healing, the KD terms, the bridges and their pre-fitting, the estimators, the items' start), on the
same teacher, seed and layer budget. Mixed into orchestration.study.seed.SeedRun, whose teacher, importance
scores and helpers they use; each returns the rows its stage writes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from orchestration.study.teacher import train_teacher

# The rank of the bridges the ablation adds when the default compresses without any.
ABLATION_BRIDGE_RANK = 16


def heal_record(result) -> dict | None:
    """What a row records of a training or healing run: its best epoch, how many it ran, why it stopped
    (a teacher's or student's layerwise.training.train.STOP_REASONS; healing records none), and its training
    curve (minutes and validation NDCG@10 after each epoch)."""
    from layerwise.baselines.budget import training_curve

    if result is None:
        return None
    reason = getattr(result, "stop_reason", None)
    return {"best_epoch": result.best_epoch, "epochs_run": len(result.history), **training_curve(result),
            **({"stop_reason": reason} if reason else {})}


class AblationStages:
    """`ablation_rows(component, out)`: the rows of the ablation stage of `component` (SeedRun's plan)."""

    def ablation_rows(self, component: str, out: Path) -> list[dict]:
        if component == "heal":  # the unhealed model is evaluated in the `ours` stage
            return []
        if component == "estimators":
            return self._estimator_ablation(out)
        if component == "items":
            return self._items_ablation(out)
        heal, rank = self.config.compress.heal, self.config.compress.bridge_rank
        # Bridges are off by default (measured no better), so their ablation adds rank-16 bridges then,
        # and the pre-fitting ablation is made on rank-16 bridges (with none there is nothing to pre-fit).
        changed = {"bridges": ({"bridge_rank": 0 if rank else ABLATION_BRIDGE_RANK}, {}),
                   "kd": ({}, {"kd_weight": 0.0}),
                   "hidden": ({}, {"hidden_weight": 0.0}),
                   "prefit": ({"bridge_rank": rank or ABLATION_BRIDGE_RANK}, {"prefit_steps": 0})}[component]
        config = self._compress_config(**changed[0], heal=replace(heal, **changed[1]))
        name = {"bridges": "ours without bridges" if rank else f"ours with rank-{ABLATION_BRIDGE_RANK} bridges",
                "kd": "ours without the KD term", "hidden": "ours without the hidden-state term",
                "prefit": "ours without bridge pre-fitting" if rank else
                f"ours with rank-{ABLATION_BRIDGE_RANK} bridges, not pre-fitted"}
        return [self._compress_row(config, out, name[component], "ablation", component=component)]

    def _estimator_ablation(self, out: Path) -> list[dict]:
        """Top-k by `combined` over every local estimator, then with each estimator left out; a kept set
        seen before is healed once (the same layers, seed and recipe give the same model)."""
        from layerwise.compression.compact import build_compact
        from layerwise.compression.distill import heal
        from layerwise.compression.importance import LOCAL_METHODS, combined
        from layerwise.compression.select import SELECTORS

        config = self._compress_config()
        local = {m: self.scores[m] for m in LOCAL_METHODS}
        choices = {"combined (all estimators)": local}
        choices.update({f"combined without {m}": {n: v for n, v in local.items() if n != m} for m in LOCAL_METHODS})
        healed: dict[tuple[int, ...], dict] = {}
        rows = []
        for row_name, scores in choices.items():
            ranking = combined(self.teacher, None, self.data, self.k, scores=scores, max_len=self.max_len,
                               seed=self.seed)
            kept = tuple(SELECTORS["topk"](ranking, self.k))
            if kept not in healed:
                student = build_compact(self.teacher, list(kept), config.bridge_rank, seed=self.seed)
                result = heal(student, self.teacher, self.data, config.heal, progress=self.progress)
                healed[kept] = self._evaluate(student.eval(), out, f"kept {list(kept)}", "ablation",
                                              "ablation", kept=list(kept), training=heal_record(result))
            row = {**healed[kept], "row": row_name, "component": "estimators",
                   "weights": ranking.combination.weights}
            rows.append(row)
        return rows

    def _items_ablation(self, out: Path) -> list[dict]:
        """Ours on a teacher whose item vectors started at random (at the token-embedding scale) instead of
        from the titles: the same seed, recipe, selection and healing. Its own teacher is trained here."""
        from layerwise.compression.compact import load_compact
        from layerwise.compression.compress import compress

        t = self.config.teacher
        _, result = train_teacher(replace(t, llm=replace(t.llm, item_init="random")), self.data,
                                 self.config.data.dataset, self.seed, self.max_len, out / "teacher", self.progress,
                                 device=self.device)
        teacher = load_compact(out / "teacher").eval().requires_grad_(False).to(self.device)  # as saved: LoRA merged
        compressed = compress(teacher, self.data, self._compress_config(), progress=self.progress)
        own = self._evaluate(teacher, out, "teacher, items started at random", "ablation", "ablation",
                             component="items", n_layers=teacher.n_layers,
                             training={"best_epoch": result.best_epoch, "epochs_run": len(result.history)})
        ours = self._evaluate(compressed.model, out, "ours, items started at random", "ablation",
                              "ablation", component="items", kept=compressed.kept,
                              n_layers=compressed.model.n_layers, training=heal_record(compressed.heal),
                              teacher_means=own["means"])
        return [ours]
