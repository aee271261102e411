"""Resumable stages: each one writes into its own folder, named by the hash of what determines its
outputs, and is marked done only when complete. `layerwise run` and every seed of `layerwise study` are
sequences of such stages, so an interrupted run resumes where it stopped.

    stages = Stages(Path("runs/default"))
    teacher_dir = stages.run("teacher", stage_hash(config.teacher), lambda out: train(out))
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

import psutil
from rich.console import Console

from orchestration.outputs import write_json
from orchestration.pipeline import interrupts

console = Console()
ARCHIVED = "_archived.json"  # in an archived stage: what the archive left out (orchestration.study.archive)
# In a stage's folder: small files it keeps as it goes (sums so far, scores made so far), from which a rerun
# goes on. The archive carries an unfinished stage's (orchestration.study.archive), and a run that starts the
# stage afresh takes them from there, so a stage longer than a working session spans sessions too.
RESUME = "resume"
# In a stage's folder while it runs: {"since": epoch seconds, "pid", "host"} of the process running it, and the
# wall and CPU "seconds"/"cpu_seconds" it has spent, rewritten every HEARTBEAT_SECONDS. A stage stopped by force
# keeps it, so a reader tells a stage running now from one left unfinished by the start
# (orchestration.study.driver.stage_progress) or by whether that process lives (study_status), and the
# invocation that finishes the stage counts the killed one's time (to within one heartbeat).
RUNNING = "_RUNNING"
HEARTBEAT_SECONDS = 30.0


def running_marker(folder: Path) -> dict | None:
    """The RUNNING marker a stage folder holds ({"since", "pid", "host"}), or None if it holds none."""
    try:
        marker = json.loads((folder / RUNNING).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


class Stages:
    """Stage directories with done-markers: `run(name, key, fn)` calls fn(dir) only if not done yet.

    fn returns False when its outputs are not final (a benchmark that stayed disturbed): they are used by
    this run, and the stage is not marked done, so the next run does it again.

    reuse: other runs' stage roots, searched in order for a finished stage of the same name and key when
    this root has none. Such a stage is used where it is (read only, nothing is copied), so a variant of a
    study (another healing recipe, say) trains no teacher that the study already has. A root may be an
    archive (orchestration.study.archive): some of its stages' models are stripped of their weights. A caller
    that needs a stage's weights asks for `complete=True`; such a stripped stage then runs again here, and
    the weights it makes must be the archived ones, digest for digest, or the run stops (ArchiveMismatch).
    A stage whose stripped models are LoRA models that kept their adapters is not run again: it is copied
    here and its models rebuilt from their pretrained base (rebuild_stage), the same bits on any machine.
    """

    def __init__(self, root: Path, on_done: Callable[[str, Path, bool], None] | None = None,
                 reuse: tuple[Path, ...] = (), context: dict | None = None):
        self.root = root
        self.context = context or {}  # recorded with every stage's timing (a study's precision, say)
        self.on_done = on_done
        self.reuse = tuple(reuse)
        self.skipped: list[str] = []
        self.ran: list[str] = []
        self.timings: dict[str, dict] = {}  # name -> _seconds.json of the stage (this run's or the earlier one)
        self.heartbeat_s = HEARTBEAT_SECONDS

    def done(self, name: str, key: str) -> bool:
        """Whether the stage is finished here or in a reused root (archived counts as finished)."""
        return self._find(f"{name}-{key}") is not None

    def state(self, name: str, key: str) -> tuple[str, Path | None]:
        """Where the stage stands: ("done", folder) here, ("reused", folder) finished in a reused root,
        ("started", folder) here without its done marker (running now, or stopped mid-stage), or
        ("pending", None)."""
        found = self._find(f"{name}-{key}")
        if found is not None:
            return ("done" if found.parent == self.root else "reused"), found
        folder = self.root / f"{name}-{key}"
        return ("started", folder) if folder.is_dir() else ("pending", None)

    def archived(self, name: str, key: str) -> Path | None:
        """The stage finished in a reused root whose models were stripped of their weights (an archive's), or
        None: run with `complete=True`, the stage is made again here and must reproduce it."""
        found = self._find(f"{name}-{key}", self.reuse)
        return found if found is not None and stripped_models(found) else None

    def _find(self, folder: str, roots: tuple[Path, ...] | None = None) -> Path | None:
        roots = (self.root, *self.reuse) if roots is None else roots
        return next((root / folder for root in roots if (root / folder / "_DONE").exists()), None)

    def _carry_resume(self, name: str, out: Path) -> None:
        """Give a stage that has no resume files here those of the same stage left unfinished in a reused
        root (an archive carries them), so that it goes on from there."""
        if (out / RESUME).exists():
            return
        for root in self.reuse:
            found = root / out.name
            if (found / RESUME).is_dir() and not (found / "_DONE").exists():
                shutil.copytree(found / RESUME, out / RESUME)
                console.print(f"[dim]  {name}: going on from the unfinished stage's progress in {found}[/dim]")
                return

    def run(self, name: str, key: str, fn: Callable[[Path], Any], complete: bool = False) -> Path:
        """The stage's folder, after running fn(folder) unless it is done here or in a reused root.
        complete: the caller needs the stage's weights, so an archived stage whose weights were stripped runs
        again."""
        interrupts.check()  # a Ctrl-C swallowed during the last stage stops the run here
        out = self.root / f"{name}-{key}"
        found = self._find(out.name)
        archived = found if found is not None and stripped_models(found) else None  # never one of this root's
        if found is not None and not (complete and archived):
            out = found
        marker = out / "_DONE"
        if marker.exists():
            console.print(f"[dim]- {name}: done earlier ({out}), skipped[/dim]")
            self.skipped.append(name)
        elif complete and archived is not None and rebuildable_stage(archived):
            console.print(f"[bold]> {name}[/bold] -> {out}: the archived stage, its LoRA models rebuilt")
            rebuild_stage(name, archived, out)
            self.skipped.append(name)  # its results are the archived run's; only its weights were made here
        else:
            out.mkdir(parents=True, exist_ok=True)
            console.print(f"[bold]> {name}[/bold] -> {out}")
            self._carry_resume(name, out)
            # A healing inside keeps its state after every epoch in the stage folder (as a teacher keeps its
            # own; the archive leaves out "*-checkpoint" folders), so that a stage stopped midway (the end of
            # a machine's session) goes on from there when run again here.
            from layerwise.training.resume import stage_checkpoints

            _count_killed(out)  # an invocation here killed outright left its last heartbeat in the marker
            with _Heartbeat(out / RUNNING, self.heartbeat_s) as beat:
                try:
                    with stage_checkpoints(out / "heal-checkpoint"):
                        final, timing = _timed(fn, out)
                except BaseException:  # stopped: what it spent counts when a later invocation here finishes it
                    _add_spent(out, *beat.spent())
                    raise
            timing = _with_earlier(out, timing)
            timing.update(machine(), **self.context)
            if archived is not None:  # made again because its weights were archived away: they must match
                check_against_archive(name, out, archived)
            (out / "_seconds.json").write_text(json.dumps(timing))
            console.print(f"[dim]  {name}: {timing['seconds']:.1f} s wall, {timing['cpu_seconds']:.1f} s CPU, "
                          f"load average {timing['load_avg_start']:.1f} -> {timing['load_avg_end']:.1f}[/dim]")
            if final:
                marker.write_text("")
            else:
                console.print(f"[yellow]- {name}: outputs kept but not final; the next run does it again[/yellow]")
            self.ran.append(name)
            interrupts.check()  # the stage's outputs are complete and kept; what follows it is not run
        self.timings[name] = json.loads((out / "_seconds.json").read_text())
        if self.on_done:
            self.on_done(name, out, name in self.skipped)
        return out


class ArchiveMismatch(RuntimeError):
    """A stage made again gave other weights than the archived run that the study resumes from."""


def stripped_models(stage: Path) -> list[str]:
    """The model folders (relative to the stage) that an archive stripped of their weights."""
    path = stage / ARCHIVED
    return json.loads(path.read_text())["stripped"] if path.exists() else []


def rebuildable_stage(archived: Path) -> bool:
    """Whether every model an archive stripped from this stage is a LoRA model that its kept adapters and
    its pretrained base make again (layerwise.models.rebuild), so that the stage need not run again."""
    from layerwise.models.rebuild import rebuildable

    models = stripped_models(archived)
    return bool(models) and all(rebuildable(archived / m) for m in models)


def rebuild_stage(name: str, archived: Path, out: Path) -> None:
    """Copy the archived stage to `out` (done, as it was) and rebuild its LoRA models' merged backbones; every
    weight file must have the digest the archive lists (rebuild_backbone checks them; ArchiveMismatch), or
    nothing stands at `out`. Unlike a training run again, this gives the same bits on any CPU
    (layerwise.models.lora.merged_weight)."""
    import shutil

    from layerwise.models.checkpoint import atomic_directory
    from layerwise.models.rebuild import rebuild_backbone

    with atomic_directory(out) as tmp:
        shutil.copytree(archived, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ARCHIVED))
        for model in stripped_models(archived):
            try:
                rebuild_backbone(tmp / model)
            except ValueError as error:
                raise ArchiveMismatch(f"stage {name}: {error}") from error


def check_against_archive(name: str, out: Path, archived: Path) -> None:
    """Raise ArchiveMismatch unless every model the archive stripped from stage `name` came out of this
    run with the same weights (SHA-256 of each file). The stage stays unfinished here, so the next run
    checks again instead of mixing these weights with results computed from the archived ones."""
    from layerwise.models.checkpoint import weight_digests

    for model in stripped_models(archived):
        ours, theirs = weight_digests(out / model), weight_digests(archived / model)
        if ours != theirs:
            differ = sorted(f for f in set(ours) | set(theirs) if ours.get(f) != theirs.get(f))
            raise ArchiveMismatch(
                f"stage {name}: {model} made again differs from the archived one in {archived} "
                f"({', '.join(differ)}). The archive's later stages were computed from the archived weights, "
                f"so they cannot be mixed with these. Resume on a machine that reproduces them (the same "
                f"packages, thread count and CPU kernels), or remove {archived.parent} from the archive "
                f"so that its stages run again here")


def _timed(fn: Callable[[Path], Any], out: Path) -> tuple[bool, dict]:
    """Run a stage: (whether its outputs are final, {"seconds", "cpu_seconds", "load_avg_start",
    "load_avg_end", "peak_rss_gb"}). Wall time alone cannot tell work from waiting on a shared machine; CPU
    time and the 1-minute load average beside it can. The peak resident memory is the stage process's own
    (Ray tasks it starts are not counted), None where the kernel cannot reset it: what two stages side by
    side would need is known before they are run so."""
    load, cpu, started = os.getloadavg()[0], tree_cpu_seconds(), time.perf_counter()
    reset = reset_peak_rss()
    final = fn(out) is not False
    peak = peak_rss_bytes() if reset else None
    return final, {"seconds": time.perf_counter() - started, "cpu_seconds": tree_cpu_seconds() - cpu,
                   "load_avg_start": load, "load_avg_end": os.getloadavg()[0],
                   "peak_rss_gb": None if peak is None else round(peak / 2**30, 3)}


# In a stage's folder: the wall and CPU seconds of its invocations that were stopped (or killed: RUNNING's last
# heartbeat) before it finished. They are this machine's: the training checkpoints that let a later invocation
# go on from that work stay here too.
# The archive does not carry it; a stage that goes on from carried resume files on another machine counts
# only that machine's time (an importance part or a random draw records its own).
SPENT = "_seconds.stopped.json"


class _Heartbeat:
    """The RUNNING marker of a stage for a block: written at its start and every `period` seconds with the
    time spent so far (from a daemon thread), removed at its end."""

    def __init__(self, path: Path, period: float):
        import threading

        self.path, self.period = path, period
        self.runner = {"since": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
        self.wall, self.cpu = time.perf_counter(), tree_cpu_seconds()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="stage-heartbeat", daemon=True)

    def spent(self) -> tuple[float, float]:
        """Wall and CPU seconds since the block began."""
        return time.perf_counter() - self.wall, tree_cpu_seconds() - self.cpu

    def _write(self) -> None:
        seconds, cpu_seconds = self.spent()
        write_json(self.path, {**self.runner, "seconds": seconds, "cpu_seconds": cpu_seconds})  # atomic

    def _beat(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self._write()
            except (OSError, psutil.Error):
                pass  # a missed beat costs at most one period of the record

    def __enter__(self) -> _Heartbeat:
        self._write()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.path.unlink(missing_ok=True)


def _count_killed(out: Path) -> None:
    """Count the time of an invocation on this host that was killed while running the stage (its RUNNING
    marker is left, with its last heartbeat) as spent on the stage, and remove the marker."""
    marker = running_marker(out)
    if marker and marker.get("host") == socket.gethostname() and marker.get("seconds") is not None:
        _add_spent(out, marker["seconds"], marker.get("cpu_seconds") or 0.0)
    (out / RUNNING).unlink(missing_ok=True)


def _add_spent(out: Path, seconds: float, cpu_seconds: float) -> None:
    """Add a stopped invocation's seconds to the stage's SPENT record."""
    try:
        spent = json.loads((out / SPENT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        spent = {"seconds": 0.0, "cpu_seconds": 0.0, "invocations": 0}
    spent = {"seconds": spent["seconds"] + seconds, "cpu_seconds": spent["cpu_seconds"] + cpu_seconds,
             "invocations": spent["invocations"] + 1}
    write_json(out / SPENT, spent)


def _with_earlier(out: Path, timing: dict) -> dict:
    """The finishing invocation's timing with the stopped ones' seconds added ("seconds", "cpu_seconds": the
    stage's whole cost on this machine; "stopped_invocations", "last_invocation_seconds" say how it is made
    up). An invocation killed outright (kill -9, Ray's shutdown after a Ctrl-C) counts up to its last
    heartbeat: the sum is a floor, short by at most a heartbeat per killed invocation."""
    try:
        spent = json.loads((out / SPENT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return timing
    (out / SPENT).unlink()
    return {**timing, "seconds": timing["seconds"] + spent["seconds"],
            "cpu_seconds": timing["cpu_seconds"] + spent["cpu_seconds"],
            "stopped_invocations": spent["invocations"], "last_invocation_seconds": timing["seconds"]}


def reset_peak_rss() -> bool:
    """Set this process's peak resident set size (Linux's VmHWM) back to its current size, so that
    `peak_rss_bytes` then gives the peak of what follows. False where that cannot be done (not Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size since it started or since `reset_peak_rss`, or None."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), None)


def machine() -> dict:
    """The machine a stage ran on, as its timing records it: the CPU's model name, the kernels torch picked
    for it, and torch's thread count."""
    import torch

    return {"cpu": cpuinfo("model name"), "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo, or None where there is none."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process, its waited-for children and its live descendants (the
    embedded Ray's workers are among them). A descendant that exits unwaited takes its CPU time along."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:4])  # user, system, children_user, children_system
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            continue
    return total
