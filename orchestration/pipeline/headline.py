"""The headline of a run: teacher vs compact on quality, speed and memory, read from the stage outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from layerwise.perf.guard import judge
from layerwise.evaluation.stats import ratio_ci
from orchestration.outputs import METRIC_COLUMNS


def retention_ci(teacher: np.ndarray, compact: np.ndarray, seed: int = 0, n_boot: int = 2000
                 ) -> tuple[float, float]:
    """Paired bootstrap 95% CI of mean(compact) / mean(teacher) over users (resampled together)."""
    lo, hi = ratio_ci(compact, teacher, n_boot=n_boot, seed=seed)
    return float(lo), float(hi)


def build_headline(teacher_dir: Path, base_dir: Path, eval_dir: Path, bench_dir: Path, comp_dir: Path) -> dict:
    """Collect the figures of one run into a JSON-able dict (see `print_headline`)."""
    teacher = pq.read_table(base_dir / "teacher_per_user.parquet").to_pydict()
    compact = pq.read_table(eval_dir / "compact_per_user.parquet").to_pydict()
    mostpop = json.loads((base_dir / "mostpop.json").read_text())["means"]
    if teacher["user"] != compact["user"]:
        raise ValueError("teacher and compact were evaluated on different users")
    quality = {}
    for metric in METRIC_COLUMNS:
        t, c = np.asarray(teacher[metric]), np.asarray(compact[metric])
        scored = bool(t.mean() > 0)  # a teacher that never hits at 5 has no retention at 5
        quality[metric] = {"teacher": float(t.mean()), "compact": float(c.mean()),
                           "mostpop": mostpop.get(metric),
                           "retention": float(c.mean() / t.mean()) if scored else None,
                           "retention_ci95": retention_ci(t, c) if scored else None}
    bench = json.loads((bench_dir / "bench.json").read_text())
    (t_name, t_bench), (c_name, c_bench) = list(bench["models"].items())[:2]
    speed = {batch: _speed(bench, t_bench["batches"][batch], entry, batch)
             for batch, entry in c_bench["batches"].items()}
    compress = json.loads((comp_dir / "compress.json").read_text())
    return {
        "metrics": {"quality": quality, "speed": speed},
        "teacher": _training(json.loads((teacher_dir / "train.json").read_text())),
        "layers": {"teacher": t_bench["n_layers"], "compact": c_bench["n_layers"],
                   "kept": compress["kept"], "selector": compress["selector"],
                   "bridge_rank": compress["bridge_rank"]},
        "memory": {"teacher_param_bytes": t_bench["param_bytes"],
                   "compact_param_bytes": c_bench["param_bytes"]},
    }


def _speed(bench: dict, teacher: dict, compact: dict, batch: str) -> dict:
    """The compact model's speed at one batch size; a disturbed one carries why, the rounds it was timed
    with and the load average around it, and no figure (a bench.json from before the guard is judged
    here)."""
    if "status" not in compact:
        judge(compact)
    guard = bench.get("guard") or {"attempts": [], "load_avg_start": bench["env"]["load_avg_start"],
                                   "load_avg_end": bench["env"].get("load_avg_end")}
    if compact["status"] == "disturbed":
        return {"status": "disturbed", "disturbed_because": compact["disturbed_because"],
                "rounds": [a["rounds"] for a in guard["attempts"] if batch in a["keys"]] or [compact["runs"]],
                "load_avg_start": guard["load_avg_start"], "load_avg_end": guard["load_avg_end"]}
    return {"status": "ok", **{key: compact[key] for key in ("speedup", "speedup_ci95", "bound", "efficiency")},
            "teacher_ms": teacher["median_ms"], "compact_ms": compact["median_ms"],
            "f": bench["nonlayer"][batch]["f"]}


def _training(train: dict) -> dict:
    """How the teacher's training ended: epochs run, best epoch, and why it stopped."""
    history = train.get("history") or []
    return {"epochs_run": train.get("epochs_run", len(history)), "stop_reason": train.get("stop_reason"),
            "best_epoch": train.get("best_epoch", (train.get("best") or {}).get("epoch")),
            "torch_threads": train.get("torch_threads")}


def teacher_line(training: dict) -> str:
    """"teacher: 24 epochs, best at epoch 14; stopped early (no validation gain)"; a time-capped teacher
    says so, because its quality then depends on the machine's load."""
    reason = {"early_stopping": "stopped early (no validation gain)", "epochs": "ran its whole epoch budget",
              "time_cap": f"STOPPED BY THE TIME CAP at epoch {training['epochs_run']}: its quality depends "
                          f"on the machine's load",
              "schedule_clock": f"STOPPED BY ITS SCHEDULE'S CLOCK (schedule_minutes) at epoch "
                                f"{training['epochs_run']}: its quality depends on the machine's load",
              }.get(training["stop_reason"], "stop reason not recorded")
    return f"teacher: {training['epochs_run']} epochs, best at epoch {training['best_epoch']}; {reason}"


def print_headline(head: dict) -> None:
    """The table `make run` ends with."""
    quality, speed = head["metrics"]["quality"], head["metrics"]["speed"]
    layers = head["layers"]
    table = Table(title=f"teacher ({layers['teacher']} layers) vs compact ({layers['compact']} layers: "
                        f"{layers['kept']}, {layers['selector']}, bridge rank {layers['bridge_rank']})",
                  caption=teacher_line(head["teacher"]))
    for column in ("figure", "teacher", "compact", "retention [95% CI]"):
        table.add_column(column, justify="right")
    for metric in METRIC_COLUMNS:
        q = quality[metric]
        retention = "-" if q["retention"] is None else \
            f"{q['retention']:.1%} [{q['retention_ci95'][0]:.1%}, {q['retention_ci95'][1]:.1%}]"
        table.add_row(metric.upper(), f"{q['teacher']:.4f}", f"{q['compact']:.4f}", retention)
    for batch, s in speed.items():
        table.add_row(f"latency b={batch} (ms)", *_speed_cells(s))
    m = head["memory"]
    table.add_row("parameter MB", f"{m['teacher_param_bytes'] / 2**20:.2f}",
                  f"{m['compact_param_bytes'] / 2**20:.2f}",
                  f"{m['compact_param_bytes'] / m['teacher_param_bytes']:.1%} of the teacher")
    Console().print(table)


def _speed_cells(s: dict) -> tuple[str, str, str]:
    if s["status"] == "disturbed":
        start, end = s["load_avg_start"][0], (s["load_avg_end"] or [float("nan")])[0]
        return ("disturbed", "disturbed",
                f"DISTURBED, not a result: timed with {', '.join(map(str, s['rounds']))} rounds, load average "
                f"{start:.1f} -> {end:.1f}; {s['disturbed_because'][0]}")
    lo, hi = s["speedup_ci95"]
    return (f"{s['teacher_ms']:.2f}", f"{s['compact_ms']:.2f}",
            f"speedup {s['speedup']:.2f}x [{lo:.2f}, {hi:.2f}]; bound {s['bound']:.2f}x; "
            f"efficiency {s['efficiency']:.0%}")
