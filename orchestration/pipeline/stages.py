"""Resumable stages: each one writes into its own folder, named by the hash of what determines its
outputs, and is marked done only when complete. `layerwise run` and every seed of `layerwise study` are
sequences of such stages, so an interrupted run resumes where it stopped.

    stages = Stages(Path("runs/default"))
    teacher_dir = stages.run("teacher", stage_hash(config.teacher), lambda out: train(out))
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from orchestration.pipeline import interrupts

console = Console()


class Stages:
    """Stage directories with done-markers: `run(name, key, fn)` calls fn(dir) only if not done yet.

    fn returns False when its outputs are not final (a benchmark that stayed disturbed): they are used by
    this run, and the stage is not marked done, so the next run does it again.
    """

    def __init__(self, root: Path, on_done: Callable[[str, Path, bool], None] | None = None):
        self.root = root
        self.on_done = on_done
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def run(self, name: str, key: str, fn: Callable[[Path], Any]) -> Path:
        interrupts.check()  # a Ctrl-C swallowed during the last stage stops the run here
        out = self.root / f"{name}-{key}"
        marker = out / "_DONE"
        if marker.exists():
            console.print(f"[dim]- {name}: done earlier ({out}), skipped[/dim]")
            self.skipped.append(name)
        else:
            out.mkdir(parents=True, exist_ok=True)
            console.print(f"[bold]> {name}[/bold] -> {out}")
            started = time.perf_counter()
            final = fn(out) is not False
            seconds = time.perf_counter() - started
            (out / "_seconds.json").write_text(json.dumps({"seconds": seconds}))
            if final:
                marker.write_text("")
            else:
                console.print(f"[yellow]- {name}: outputs kept but not final; the next run does it again[/yellow]")
            self.ran.append(name)
            interrupts.check()  # the stage's outputs are complete and kept; what follows it is not run
        if self.on_done:
            self.on_done(name, out, name in self.skipped)
        return out
