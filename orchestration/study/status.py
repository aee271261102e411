"""Where a study stands, running nothing: every seed's stages in running order, each done here, reused
(finished in an archive or another run that the config's `reuse` names), started (running now, or stopped
mid-stage: it says which where it can tell) or pending; the time the finished ones took, and what the rest
should take by the same stage on the seeds where it has finished. A study on 2 cores spans working sessions;
this says what remains.

    layerwise study status studies/beauty-llama.yaml
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from orchestration.study.config import StudyConfig, load_study_data

STATES = ("done", "reused", "started", "pending")


def study_status(config: StudyConfig, data=None) -> dict:
    """{"run_dir", "stages": one row a stage (_row), "counts": per state, "cpu_hours_done",
    "cpu_hours_left": the estimate, "unestimated": stages left that no seed has finished}. `data` is the
    study's data set, loaded here when not given (the stage keys hold its fingerprint)."""
    from orchestration.study.seed import SeedRun

    data = data if data is not None else load_study_data(config)
    root = Path(config.run_dir) / config.name
    rows = []
    for seed in config.seeds:
        run = SeedRun(config, seed, root / "seeds" / f"seed-{seed}", data)
        rows += [_row(seed, name, *run.stages.state(name, key)) for name, key in run.planned()]
    finished = defaultdict(list)  # stage name -> CPU seconds on the seeds where it finished
    for row in rows:
        if row["state"] in ("done", "reused") and row["cpu_seconds"] is not None:
            finished[row["stage"]].append(row["cpu_seconds"])
    left = [row for row in rows if row["state"] in ("started", "pending")]
    for row in left:
        row["cpu_seconds_estimate"] = mean(finished[row["stage"]]) if finished[row["stage"]] else None
    _estimate_by_runs([row for row in left if row["cpu_seconds_estimate"] is None], rows,
                      {"baseline-random": config.random_draws})
    return {"run_dir": str(root), "stages": rows,
            "counts": {state: sum(row["state"] == state for row in rows) for state in STATES},
            "cpu_hours_done": sum(sum(v) for v in finished.values()) / 3600,
            "cpu_hours_left": sum(row["cpu_seconds_estimate"] or 0 for row in left) / 3600,
            "wall_hours_left_by_runs": sum(row.get("wall_seconds_estimate") or 0 for row in left) / 3600,
            "unestimated": [f"seed-{row['seed']}/{row['stage']}" for row in left
                            if row["cpu_seconds_estimate"] is None and row.get("wall_seconds_estimate") is None]}


def unfinished(status: dict) -> list[dict]:
    """The stages of a `study_status` that have not finished, in running order: {"seed", "stage", "state"}
    (started or pending)."""
    return [{"seed": row["seed"], "stage": row["stage"], "state": row["state"]} for row in status["stages"]
            if row["state"] in ("started", "pending")]


def _estimate_by_runs(unestimated: list[dict], rows: list[dict], runs_per_stage: dict[str, int]) -> None:
    """A stage no seed has finished, but whose training runs have (a random draw of the `random` baseline,
    which trains `random_draws` of them): what is left of it, in wall seconds, from the mean wall time of
    its finished runs on any seed, less what each row's own saved runs have done. Sets
    row["wall_seconds_estimate"]; rows of a stage with no finished run get none."""
    for row in unestimated:
        done = [r["minutes"] for other in rows if other["stage"] == row["stage"]
                for r in other.get("saved") or [] if r["finished"]]
        if done:
            total = runs_per_stage.get(row["stage"], 1) * mean(done)
            spent = sum(r["minutes"] for r in row.get("saved") or [])
            row["wall_seconds_estimate"] = 60 * max(0.0, total - spent)


def _row(seed: int, stage: str, state: str, folder: Path | None) -> dict:
    """A stage and where it stands (Stages.state), with the seconds a finished one took and the epochs a
    started one has saved."""
    timing = folder / "_seconds.json" if folder is not None else None
    seconds = json.loads(timing.read_text()) if timing is not None and timing.exists() else {}
    started = state == "started" and folder is not None
    return {"seed": seed, "stage": stage, "state": state, "folder": str(folder or ""),
            "seconds": seconds.get("seconds"), "cpu_seconds": seconds.get("cpu_seconds"),
            "peak_rss_gb": seconds.get("peak_rss_gb"),
            "saved": saved_runs(folder) if started else [], "running": running(folder) if started else None}


def running(folder: Path) -> bool | None:
    """Whether a started stage runs now: its process (orchestration.pipeline.stages.RUNNING) is alive on this
    host, or gone (killed). None where this cannot tell: no marker (a stage stopped by Ctrl-C removes its
    own, and stages started by versions before markers have none) or one from another host."""
    import socket

    import psutil

    from orchestration.pipeline.stages import running_marker

    marker = running_marker(folder)
    if marker is None or marker.get("host") != socket.gethostname():
        return None
    try:
        return psutil.Process(marker["pid"]).create_time() <= marker["since"] + 1  # not a later process's pid
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False


def saved_runs(folder: Path) -> list[dict]:
    """The training runs a started stage has checkpointed (its teacher's `model-checkpoint/`, each healing
    or trained student in `heal-checkpoint/heal-N/`, a draw's in `heal-checkpoint/draw-D/heal-1/`) or kept
    as finished draws (`resume/draw-D.json`, orchestration.study.seed): {"run": path inside the stage,
    "epoch": the last saved, "minutes": its wall time so far, "finished": a healing or draw that ended and
    waits for its stage}."""
    from layerwise.training.resume import saved_progress
    from orchestration.pipeline.stages import RESUME

    runs = []
    for path in sorted((folder / RESUME).glob("draw-*.json")):
        try:
            kept = json.loads(path.read_text())
            epochs = max((row.get("training") or {}).get("epochs_run") or 0 for row in kept["rows"])
            runs.append({"run": path.relative_to(folder).as_posix(), "epoch": epochs,
                         "minutes": kept["seconds"] / 60, "finished": True})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a file this version did not write: nothing to count
    for directory in sorted({p.parent.parent for p in folder.rglob("epoch-*/progress.json")}):
        progress = saved_progress(directory)
        if progress is not None:
            runs.append({"run": directory.relative_to(folder).as_posix(), "epoch": progress["epoch"],
                         "minutes": progress["elapsed"] / 60,
                         "finished": bool((progress.get("extra") or {}).get("finished"))})
    return runs


def format_status(status: dict) -> str:
    """The status as text: a line per stage, grouped by seed, then the totals."""
    lines = []
    for seed in sorted({row["seed"] for row in status["stages"]}):
        lines.append(f"seed {seed}")
        for row in (r for r in status["stages"] if r["seed"] == seed):
            if row["state"] in ("done", "reused"):
                took = _minutes(row["seconds"], row["cpu_seconds"])
                if row.get("peak_rss_gb") is not None:  # the stage process's own (stages recorded before: none)
                    took += f", peak RSS {row['peak_rss_gb']:.1f} GB"
            elif row.get("cpu_seconds_estimate") is not None:
                took = f"about {row['cpu_seconds_estimate'] / 60:.0f} CPU min (other seeds)"
            elif row.get("wall_seconds_estimate") is not None:
                took = f"about {row['wall_seconds_estimate'] / 60:.0f} wall min left (its finished training runs)"
            else:
                took = ""
            now = {True: "running now", False: "not running (its process was killed)", None: ""}[row.get("running")]
            saved = "; ".join(f"{r['run']}: {'finished' if r['finished'] else 'epoch ' + str(r['epoch']) + ' saved'}"
                              f" ({r['minutes']:.0f} min)" for r in row.get("saved") or [])
            took = "; ".join(part for part in (now, saved, took) if part)
            lines.append(f"  {row['stage']:<28} {row['state']:<8} {took}")
    c = status["counts"]
    lines.append(f"{status['run_dir']}: {c['done'] + c['reused']} of {len(status['stages'])} stages finished "
                 f"({c['reused']} reused), {c['started']} started, {c['pending']} pending; "
                 f"{status['cpu_hours_done']:.1f} CPU-hours done, about {status['cpu_hours_left']:.1f} left "
                 f"by the same stages on other seeds"
                 + (f", about {status['wall_hours_left_by_runs']:.1f} wall hours by the finished training runs "
                    f"of stages no seed has finished" if status.get("wall_hours_left_by_runs") else "")
                 + (f", and {len(status['unestimated'])} stages with no estimate yet"
                    if status["unestimated"] else ""))
    return "\n".join(lines)


def _minutes(seconds: float | None, cpu_seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds / 60:.1f} min" + (f" (CPU {cpu_seconds / 60:.1f} min)" if cpu_seconds is not None else "")
