"""The dependency stage of a study's first seed: the teacher's inter-layer dependency matrix, for the report's
heatmap. Mixed into orchestration.study.seed.SeedRun, whose teacher, importance stage and calibration batches
it uses.

It is the costliest estimate: 1 + L + L(L-1)/2 evaluations, an hour or more for a 30-layer LLM on 2 cores. So
it runs after the baselines and noise, not in the importance stage, which would hold back our model and every
row after it. The beam selector is the exception: it selects with the matrix, so its importance stage makes
one, and this stage reuses it when it was made on the same users.
"""

from __future__ import annotations

import json
from pathlib import Path

from orchestration.outputs import write_json
from orchestration.pipeline.config import stage_hash
from orchestration.pipeline.stages import RESUME


class DependencyStage:
    """`dependency_stage(imp_key)`: the (name, key, stage function) of the dependency stage in SeedRun's plan;
    `dependency_matrix(state)`: the matrix on the importance stage's users, for the beam selector."""

    def dependency_users(self) -> int | None:
        """The validation users the matrix is measured on: `dependency_users`, else the importance stage's
        `compress.ablation_users` (None: all of them)."""
        return self.config.dependency_users or self.config.compress.ablation_users

    def dependency_stage(self, imp_key: str):
        # An unset dependency_users leaves out of the key, which keeps the key the stage had before it existed.
        users = [self.config.dependency_users] if self.config.dependency_users else []
        return "dependency", stage_hash(imp_key, "dependency", *users), self._dependency

    def dependency_matrix(self, state: Path, users: int | None = None) -> list[list[float]]:
        """The validation-loss dependency matrix (layerwise.compression.dependency) on `users` sampled
        validation users (None: the importance stage's ablation_users), its sums so far kept in `state` after
        each chunk of users, so a stopped stage resumes there."""
        from layerwise.compression.dependency import dependency_matrix

        users = users or self.config.compress.ablation_users
        return dependency_matrix(self.teacher, self._batches(), metric="loss", data=self.data,
                                 max_users=users, seed=self.seed, state=state).tolist()

    def _dependency(self, out: Path) -> None:
        """Write dependency.json. An importance stage that holds the matrix already (the beam selector's, or one
        made before this stage existed) gives it without computing it again, if it used the same users."""
        users = self.dependency_users()
        made = None
        if users == self.config.compress.ablation_users:
            made = json.loads((self.dirs["importance"] / "importance.json").read_text()).get("dependency_loss")
        write_json(out / "dependency.json", {
            "ablation_users": users,
            "dependency_loss": made or self.dependency_matrix(out / RESUME / "removal_losses.json", users)})
