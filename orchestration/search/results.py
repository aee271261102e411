"""What a finished search produces: the trials' records, the Pareto front (checked again: test-split
retention, timed alone), the champion, a plot and a table (Markdown + JSON), and the front in the MLflow
model registry.

`orchestration.search.tuning.run_search` calls `conclude` after `Tuner.fit()`; the plot and table also
work on their own, on the rows of `<run_dir>/report/trials.json`:
    PYTHONPATH=. .venv/bin/python -c "import json; from orchestration.search.results import *; \
rows = json.load(open('/tmp/lw_tune/report/trials.json'))['trials']; \
plot_front(rows, [r['trial_id'] for r in rows if r['front']], None, None, 'speedup', '/tmp/front.png', 'demo')"
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from layerwise.perf.guard import RULE, speed_cell
from orchestration.outputs import write_json
from orchestration.search.arguments import SPEED_METRICS
from orchestration.search.space import SearchSpace


def conclude(grid, state: dict, run_dir: Path, data, teacher_path: str, space: SearchSpace,
             min_retention: float | None, registered_model: str) -> dict:
    """Rows, front, champion, the front re-checked, report (logged to the active MLflow run), registry."""
    from orchestration import tracking

    rows = [trial_row(r) for r in grid if r.error is None and r.metrics and "retention" in r.metrics]
    front = front_ids(rows, state, run_dir)
    check_front(rows, front, data, teacher_path, space)
    # Among the front, the champion is picked by the quiet timing, not by the one taken beside other trials.
    champion, message = choose_champion(rows, front, f"alone_{state['speed_metric']}", min_retention)
    title = f"{space.teacher.family}, {state['objective']} objective"
    report_dir = write_report(rows, front, champion, min_retention, state["speed_metric"], run_dir / "report",
                              title)
    tracking.log_artifacts(report_dir, "search")
    versions = register(rows, front, champion, run_dir, registered_model)
    print(message)
    return {"rows": rows, "front": front, "champion": champion, "message": message, "versions": versions,
            "errors": sum(r.error is not None for r in grid), "report_dir": str(report_dir)}


def trial_row(result) -> dict:
    """One finished trial (a ray.tune.Result) as a flat record: its parameters and what it reported."""
    metrics = result.metrics
    keep = ("retention", "speedup", "latency_ms", "speedup_ci_low", "speedup_ci_high", "efficiency", "bound",
            "teacher_latency_ms", "valid_ndcg_at_10", "n_layers", "kept", "heal_workers", "param_ratio",
            "seconds_total", "model_dir")
    row = {"trial_id": metrics["trial_id"], "config": dict(result.config), **{k: metrics[k] for k in keep},
           "speed_status": metrics.get("speed_status", "ok"),
           "speed_disturbed_because": metrics.get("speed_disturbed_because", "")}
    if row["speed_status"] == "disturbed":  # NaN in Tune's record; None here, as in every other table
        row.update(dict.fromkeys(("speedup", "latency_ms", "speedup_ci_low", "speedup_ci_high", "efficiency",
                                  "bound", "teacher_latency_ms")))
    return row


def timed(rows: list[dict]) -> list[dict]:
    """The rows whose timing in the trial was not disturbed (layerwise.perf.guard): only they have a speed."""
    return [r for r in rows if r.get("speed_status", "ok") != "disturbed"]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, both coordinates maximised (ties keep both)."""
    return [i for i, (a, b) in enumerate(points)
            if not any(x >= a and y >= b and (x > a or y > b) for x, y in points)]


def front_ids(rows: list[dict], state: dict, run_dir: Path) -> list[str]:
    """Trial ids of the front. Pareto search: Optuna's best_trials, matched to Tune's trials by their
    parameters and values. Single objective: the non-dominated trials of (retention, speed)."""
    import optuna

    speed = state["speed_metric"]
    study = optuna.load_study(study_name=state["study"], storage=f"sqlite:///{run_dir / 'optuna.db'}")
    _close_orphans(study)
    if state["objective"] == "single":
        sign = 1.0 if SPEED_METRICS[speed] == "max" else -1.0
        rows = timed(rows)
        return [rows[i]["trial_id"] for i in pareto_front([(r["retention"], sign * r[speed]) for r in rows])]
    ids = []
    for best in study.best_trials:
        match = [r for r in timed(rows) if all(r["config"].get(k) == v for k, v in best.params.items())
                 and math.isclose(r["retention"], best.values[0], rel_tol=1e-12)
                 and math.isclose(r[speed], best.values[1], rel_tol=1e-12)]
        ids += [r["trial_id"] for r in match[:1] if r["trial_id"] not in ids]
    return ids


def _close_orphans(study) -> None:
    """Mark FAIL the Optuna trials a killed driver left RUNNING: the search is over, none of them runs."""
    from optuna.trial import TrialState

    for orphan in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(orphan.number, state=TrialState.FAIL)


def choose_champion(rows: list[dict], front: list[str], speed: str, min_retention: float | None):
    """(champion row or None, a sentence saying why). With a constraint: the fastest front model whose
    retention reaches it, or None when none does. Without: the front model with the highest retention.

    speed: the row key that says how fast a model is ("speedup", "alone_speedup": higher is faster;
    "latency_ms", "alone_latency_ms": lower is faster).
    """
    candidates = [r for r in rows if r["trial_id"] in front]
    if not candidates:
        return None, ("no trial is on the front (none finished, or every one was timed disturbed). Nothing was "
                      "promoted to champion.")
    if min_retention is None:
        best = max(candidates, key=lambda r: r["retention"])
        figure = "disturbed" if best.get(speed) is None else f"{best[speed]:.2f}"
        return best, (f"no --min-retention given: champion is the highest-retention model, trial "
                      f"{best['trial_id']} (retention {best['retention']:.3f}, {speed} {figure})")
    eligible = [r for r in candidates if r["retention"] >= min_retention]
    if not eligible:
        top = max(r["retention"] for r in candidates)
        return None, (f"NO model meets retention >= {min_retention}: the best retention is {top:.3f}. "
                      f"Nothing was promoted to champion.")
    if all(r.get(speed) is None for r in eligible):  # "fastest" needs a timing that is a result
        return None, (f"every model with retention >= {min_retention} was timed disturbed ({speed}): no "
                      f"fastest one is known. Nothing was promoted to champion; time them again on a quieter "
                      f"machine.")
    eligible = [r for r in eligible if r.get(speed) is not None]
    sign = -1.0 if speed.endswith("latency_ms") else 1.0
    best = max(eligible, key=lambda r: (sign * r[speed], r["retention"]))
    return best, (f"champion: trial {best['trial_id']}, the fastest model with retention >= {min_retention} "
                  f"(retention {best['retention']:.3f}, {speed} {best[speed]:.2f}, {best['n_layers']} layers)")


def check_front(rows: list[dict], front: list[str], data, teacher_path: str, space: SearchSpace) -> None:
    """Adds `test_retention`, `alone_speedup` (+ `alone_speedup_ci95`) and `alone_latency_ms` to the front
    rows, None elsewhere.

    The search chose the front on validation, so its validation retention is optimistic; the test split was
    never looked at. Trials were timed while other trials shared the machine; here the front's models and
    the teacher are timed again with nothing else running, interleaved in one benchmark, with more rounds.
    """
    from layerwise.perf.bench import benchmark
    from layerwise.compression.compact import load_compact
    from layerwise.device import device_scorer, resolve_device
    from layerwise.evaluation.evaluate import evaluate

    def ndcg(model) -> float:
        return evaluate(device_scorer(model), data, stage="test", exclude_seen=True, max_len=max_len).means["ndcg@10"]

    max_len, p, device = space.teacher.max_len, space.protocol, resolve_device(space.device)
    teacher = load_compact(teacher_path).eval().to(device)
    models = {r["trial_id"]: load_compact(r["model_dir"]).eval().to(device) for r in rows if r["trial_id"] in front}
    teacher_ndcg = ndcg(teacher)
    bench = benchmark({"teacher": teacher, **models}, batch_sizes=(p.bench_batch_size,), runs=p.alone_runs,
                      warmup=p.bench_warmup, max_len=max_len, seed=p.seed, reference="teacher") if models else {}
    for row in rows:
        model = models.get(row["trial_id"])
        entry = bench["models"][row["trial_id"]]["batches"][str(p.bench_batch_size)] if model else {}
        row["test_retention"] = ndcg(model) / teacher_ndcg if model else None
        row["alone_status"] = entry.get("status")
        if entry.get("status") == "disturbed":  # still disturbed after the re-measures: no figure
            entry = {}
            row["alone_disturbed_because"] = bench["models"][row["trial_id"]]["batches"][
                str(p.bench_batch_size)]["disturbed_because"]
        row["alone_speedup"], row["alone_speedup_ci95"] = entry.get("speedup"), entry.get("speedup_ci95")
        row["alone_latency_ms"] = entry.get("median_ms")


def register(rows: list[dict], front: list[str], champion: dict | None, run_dir: Path,
             registered_model: str) -> dict[str, int]:
    """Register each front model once (registered.json keeps versions across resumes) and point
    `champion` at the champion's version. Call inside the search's MLflow run: models link to it."""
    from orchestration import tracking

    path = run_dir / "registered.json"
    versions = json.loads(path.read_text()) if path.exists() else {}
    for row in rows:
        if row["trial_id"] in front and row["trial_id"] not in versions:
            versions[row["trial_id"]] = tracking.log_compact_model(row["model_dir"], registered_model,
                                                                   name=f"trial_{row['trial_id']}")
            write_json(path, versions)
    if champion is not None:
        tracking.promote(registered_model, versions[champion["trial_id"]], alias="champion")
    return versions


# --- the plot and the table ----------------------------------------------------------------------------
def write_report(rows: list[dict], front: list[str], champion: dict | None, min_retention: float | None,
                 speed: str, out_dir: Path, title: str) -> Path:
    """pareto.png, trials.md and trials.json in out_dir; returns out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    champion_id = champion["trial_id"] if champion else None
    plot_front(rows, front, champion_id, min_retention, speed, out_dir / "pareto.png", title)
    records = [{**r, "front": r["trial_id"] in front, "champion": r["trial_id"] == champion_id}
               for r in _ordered(rows, front)]
    write_json(out_dir / "trials.json", {"title": title, "speed_metric": speed, "min_retention": min_retention,
                                         "front": front, "champion": champion_id, "trials": records})
    (out_dir / "trials.md").write_text(markdown_table(records, title))
    return out_dir


def _ordered(rows: list[dict], front: list[str]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["trial_id"] not in front, -r["retention"]))


def markdown_table(records: list[dict], title: str) -> str:
    """One line per trial: front first, then by retention. Retention is NDCG@10 over the teacher's;
    speedup is a ratio of median latencies at the benchmark batch with its 95% CI, as timed in the trial
    and (front only) timed again alone after the search."""
    head = ("| trial | front | champion | layers (kept) | bridge r | selector | method | lr | heal epochs "
            "| retention (valid) | retention (test) | speedup [95% CI] | speedup alone [95% CI] | latency ms "
            "| efficiency |")
    lines = [f"### Search: {title}", "", head, "|" + "---|" * 15]
    for r in records:
        c, test = r["config"], r.get("test_retention")
        lines.append(
            f"| {r['trial_id']} | {'yes' if r['front'] else ''} | {'**yes**' if r['champion'] else ''} "
            f"| {r['n_layers']} ({r['kept']}) | {c.get('bridge_rank')} | {c.get('selector')} "
            f"| {c.get('method') or 'default'} | {c.get('lr', float('nan')):.2e} | {c.get('heal_epochs', '')} "
            f"| {r['retention']:.3f} | {'' if test is None else f'{test:.3f}'} | {_speed(r)} | {_alone(r)} "
            f"| {_figure(r, 'latency_ms')} | {_figure(r, 'efficiency')} |")
    disturbed = len(records) - len(timed(records))
    if disturbed:
        lines += ["", f"{disturbed} trial(s) timed disturbed (layerwise.perf.guard: {RULE}): no speed figure, "
                      f"and the searcher recorded them as failed."]
    return "\n".join(lines) + "\n"


def _speed(row: dict) -> str:
    return speed_cell({"status": row.get("speed_status")} if row["speedup"] is None else row,
                      lambda r: f"{r['speedup']:.2f} [{r['speedup_ci_low']:.2f}, {r['speedup_ci_high']:.2f}]")


def _figure(row: dict, key: str) -> str:
    return "-" if row.get(key) is None else f"{row[key]:.2f}"


def _alone(row: dict) -> str:
    if row.get("alone_status") == "disturbed":
        return "disturbed (not a result)"
    if row.get("alone_speedup") is None:
        return ""
    low, high = row["alone_speedup_ci95"]
    return f"{row['alone_speedup']:.2f} [{low:.2f}, {high:.2f}]"


def plot_front(rows: list[dict], front: list[str], champion_id: str | None, min_retention: float | None,
               speed: str, path: str | Path, title: str) -> Path:
    """Retention against speed: every trial, the front joined and labelled, the teacher, the champion."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 5.2), dpi=120)
    left_out, rows = len(rows) - len(timed(rows)), timed(rows)  # a disturbed timing has no place on an axis
    x, y = [r[speed] for r in rows], [r["retention"] for r in rows]
    if speed == "speedup":  # the timing noise, honestly: each trial's paired-bootstrap 95% CI
        xerr = [[max(0.0, r[speed] - r["speedup_ci_low"]) for r in rows],
                [max(0.0, r["speedup_ci_high"] - r[speed]) for r in rows]]
        ax.errorbar(x, y, xerr=xerr, fmt="none", ecolor="0.8", elinewidth=1, zorder=1)
    ax.scatter(x, y, s=36, color="0.55", label=f"trial ({len(rows)})" + (", 95% CI" if speed == "speedup" else "")
               + (f"; {left_out} timed disturbed, not drawn" if left_out else ""), zorder=2)
    on = sorted((r for r in rows if r["trial_id"] in front), key=lambda r: r[speed])
    ax.plot([r[speed] for r in on], [r["retention"] for r in on], "-o", color="tab:red", ms=8, lw=1.5,
            label=f"Pareto front ({len(on)})", zorder=3)
    alone = [r for r in on if r.get("alone_speedup") is not None] if speed == "speedup" else []
    for r in alone:  # the same model timed after the search with nothing else running
        ax.plot([r[speed], r["alone_speedup"]], [r["retention"]] * 2, ":", color="tab:red", lw=1, zorder=3)
    if alone:
        ax.scatter([r["alone_speedup"] for r in alone], [r["retention"] for r in alone], marker="D", s=40,
                   facecolors="none", edgecolors="tab:red", label="front, timed again alone", zorder=3)
    for r in on:
        ax.annotate(f"k={r['n_layers']}, r={r['config'].get('bridge_rank')}", (r[speed], r["retention"]),
                    textcoords="offset points", xytext=(7, -12), fontsize=8, color="tab:red")
    teacher_x = 1.0 if speed == "speedup" or not rows else rows[0]["teacher_latency_ms"]
    ax.scatter([teacher_x], [1.0], marker="s", s=50, color="black", label="teacher", zorder=4)
    champion = [r for r in rows if r["trial_id"] == champion_id]
    if champion:  # where it was chosen: at its alone timing when there is one
        chosen = champion[0]
        x = chosen["alone_speedup"] if chosen in alone else chosen[speed]
        ax.scatter([x], [chosen["retention"]], marker="*", s=320, color="gold", edgecolors="black",
                   label="champion", zorder=5)
    if min_retention is not None:
        ax.axhline(min_retention, ls="--", color="tab:blue", lw=1, label=f"min retention {min_retention}")
    ax.margins(x=0.12, y=0.12)  # room for the labels at the edges
    ax.set_xlabel("speedup over the teacher (ratio of median latencies)" if speed == "speedup"
                  else "latency per batch, ms (median)")
    ax.set_ylabel("NDCG@10 retention (validation, compact / teacher)")
    ax.set_title(f"Search: {title}", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never on a point
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
