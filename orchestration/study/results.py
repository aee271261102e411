"""A study's statistics: from the rows the seeds wrote to the results dict that layerwise.report renders.

Two sampling units, each used where it answers the question:
- seeds (training randomness): a method's figure is the mean of its per-seed means, with a t-interval over
  seeds, and p-values against our method are paired t-tests on the seed means (`stats.seed_test`; with one
  seed, a paired Wilcoxon over users instead); with two seeds or more, each comparison also gets a paired
  Wilcoxon over users of each user's metric averaged over the seeds (p_users), and each family of p-values
  is Holm-adjusted across its table (layerwise.report);
- users (test-set randomness): the headline's retention is also given with a paired bootstrap CI over the
  users of the seed-averaged per-user metrics, with a paired Wilcoxon test; scenario slices use these too.
Draws of the random-layer baseline are averaged within a seed first, so every method has one number per seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from layerwise.evaluation import stats
from layerwise.evaluation.stats import across_seeds
from layerwise.perf.guard import describe
from orchestration.outputs import METRIC_COLUMNS
from orchestration.study.compute import equal_compute
from orchestration.study.config import StudyConfig, extras_seeds
from orchestration.study.rows import METRIC, Rows

# The baselines that answer whether compression pays. Random layers count healed as ours is: unhealed they
# score a few percent of the teacher (6% on SmolLM2), which says nothing of whether the choice matters.
RIVALS = ("scratch", "random +heal", "truncated", "distilbert")
LAST_RUN = "the config of the study's last run"  # the plan a report's unfinished stages are named against


def build_results(config: StudyConfig, data, seed_dirs: Mapping[int, Mapping[str, Path]], rows: Sequence[Mapping],
                  speed: Mapping, runs: Sequence[Mapping], unfinished: Sequence[Mapping] = ()) -> dict:
    """`runs`: every invocation of this study, oldest first: {"started", "seconds" (None if interrupted)};
    `unfinished`: the config's stages that have not finished (orchestration.study.status.unfinished)."""
    table = Rows(rows, config.seeds)
    extras = table if extras_seeds(config) == tuple(config.seeds) else Rows(rows, extras_seeds(config))
    first_dirs = seed_dirs[config.seeds[0]]
    ours = table.first("ours")
    k, n_layers = ours["n_layers"], table.first("teacher")["n_layers"]
    big = str(max(config.bench.batch_sizes))
    results = {
        "title": f"layerwise study '{config.name}': {config.data.dataset}, {_teacher_name(config)}, "
                 f"{len(config.seeds)} seeds",
        "protocol": _protocol(config, data, k, n_layers, runs, _stage_seconds(seed_dirs)),
        "headline": {**headline(table, speed, k, n_layers), "targets": targets(config)},
        "baselines": {**comparison(table, ["teacher", "ours", *table.names("baselines")], speed, big),
                      "metrics": metric_columns(table, ["teacher", "ours", *table.names("baselines")])},
        "ablation": comparison(extras, ["ours", *table.names("ablation")], speed, big, with_speed=False),
        "k_sweep": k_sweep(extras, config, n_layers, speed, k),
        "robustness": robustness(seed_dirs, config),
        "scenarios": scenarios(table, data, config),
        "rivals": rivals(table, data, config.scenarios.min_users),
        "importance": _importance(first_dirs, ours),
        "equal_compute": equal_compute(table, seed_dirs),
        "notes": _notes(config, speed, big) + load_dependent_stops(rows, seed_dirs),
    }
    return with_unfinished(results, unfinished_results(config, unfinished, n_layers, LAST_RUN))


def with_unfinished(results: Mapping, record: Mapping) -> dict:
    """`results` with an unfinished-stages record (unfinished_results) in its own entry and in the ablation
    and k-sweep tables, which name what they lack."""
    out = {**results, "unfinished": dict(record)}
    for table in ("ablation", "k_sweep"):
        if out.get(table) is not None:
            out[table] = {**out[table], "unfinished": record[table]}
    return out


def unfinished_results(config: StudyConfig, stages: Sequence[Mapping], n_layers: int, plan: str) -> dict:
    """The report's record of the stages of `config` (the plan, described by `plan`) that have not finished,
    `stages` as orchestration.study.status.unfinished gives them: the list, the ablation components among
    them and each selector's unfinished ks, so that those tables say "not finished" where a figure would
    stand instead of leaving it out."""
    from orchestration.study.seed import ablation_stage, sweep_stage

    names = {stage["stage"] for stage in stages}
    ks = list(config.sweep.ks) or list(range(1, n_layers))  # no ks named: the sweep runs every k below L
    sweep = {selector: [k for k in sorted(ks) if sweep_stage(selector, k) in names]
             for selector in config.sweep.selectors}
    return {"plan": plan, "stages": [dict(stage) for stage in stages],
            "ablation": [c for c in config.ablation if ablation_stage(c) in names],
            "k_sweep": {selector: ks for selector, ks in sweep.items() if ks}}


def headline(table: Rows, speed: Mapping, k: int, n_layers: int) -> dict:
    teacher_u, ours_u = table.per_user("teacher"), table.per_user("ours")
    t_seeds, c_seeds = table.seed_means("teacher"), table.seed_means("ours")
    low, high = stats.ratio_ci(ours_u, teacher_u)
    user_test = stats.paired_test(ours_u, teacher_u, test="wilcoxon")
    seeds = {"n": len(t_seeds), "retention": across_seeds(c_seeds / t_seeds)}
    if len(t_seeds) >= 2:
        seeds["test"] = stats.seed_test(c_seeds, t_seeds).to_dict()
    return {
        "metric": METRIC, "k": k, "n_layers": n_layers,
        "teacher": across_seeds(t_seeds), "compact": across_seeds(c_seeds),
        "retention": {"mean": float(ours_u.mean() / teacher_u.mean()), "ci95": [low, high]},
        "speedup": {f"batch={b}": _speed_estimate(speed, "ours", b) for b in speed["settings"]["batch_sizes"]},
        "test": user_test.to_dict(), "seeds": seeds,
    }


def targets(config: StudyConfig) -> dict:
    """The headline's targets as configured: retention a fraction of the teacher, speedup a fraction of each
    batch size's own Amdahl bound (its speedup estimate carries the bound)."""
    return {"retention": {"min": config.targets.retention},
            "speedup": {"of_bound": config.targets.speedup_of_bound}}


def comparison(table: Rows, names: Sequence[str], speed: Mapping, batch: str, with_speed: bool = True) -> dict:
    """One row per method: metric and retention over seeds, speedup at `batch`, p against ours."""
    t_seeds, ours_seeds, ours_u = table.seed_means("teacher"), table.seed_means("ours"), table.per_user("ours")
    out = []
    for name in names:
        if not table.complete(name):
            continue
        values = table.seed_means(name)
        first = table.first(name)
        row = {"name": name, "group": first["group"], "metric": across_seeds(values),
               "retention": across_seeds(values / t_seeds), "p_value": None, "note": _note(first)}
        if with_speed or name in ("teacher", "ours"):
            row["speedup"] = _speed_estimate(speed, "ours" if name == "ours" else first.get("timing") or name, batch)
        if name != "ours":
            users = stats.paired_test(ours_u, table.per_user(name), test="wilcoxon")
            test = stats.seed_test(ours_seeds, values) if len(values) >= 2 else users
            row.update(p_value=test.p_value, effect_size=test.effect_size, test=test.to_dict())
            if len(values) >= 2:  # the users as the unit too: each one's metric averaged over the seeds
                row.update(p_users=users.p_value, user_test=users.to_dict())
        out.append(row)
    kind = f"paired t-test on the means of seeds {table.seeds}" if len(t_seeds) >= 2 else \
        "paired Wilcoxon over users (one seed)"
    result = {"metric": METRIC, "reference": "ours", "test": kind, "seeds": table.seeds, "rows": out}
    if len(t_seeds) >= 2:
        result["user_test"] = (f"paired Wilcoxon over the {len(ours_u)} test users of each one's metric "
                               f"averaged over the seeds")
    return result


def metric_columns(table: Rows, names: Sequence[str]) -> dict:
    """Every reported metric (HR and NDCG at 5, 10 and 20, MRR) per method: the mean over seeds with its
    t-interval, for comparison with the figures papers print; the tests stay on the table's metric."""
    rows = [{"name": name, "values": {m: across_seeds(table.seed_means(name, m)) for m in METRIC_COLUMNS}}
            for name in names if table.complete(name)]
    return {"columns": list(METRIC_COLUMNS), "seeds": table.seeds, "rows": rows}


def k_sweep(table: Rows, config: StudyConfig, n_layers: int, speed: Mapping, k: int) -> dict:
    t_seeds = table.seed_means("teacher")
    curves = {}
    for selector in config.sweep.selectors:
        ks = sorted(table.first(n)["k"] for n in table.names("sweep") if table.first(n).get("selector") == selector
                    and table.complete(n))
        estimates = [across_seeds(table.seed_means(f"{selector} k={k}") / t_seeds) for k in ks]
        if ks:
            curves[selector] = {"k": ks, "mean": [e["mean"] for e in estimates], "ci95": _cis(estimates)}
    return {"metric": METRIC, "n_layers": n_layers, "heal_epochs": config.sweep.heal_epochs, "seeds": table.seeds,
            "curves": curves, "speedup": sweep_speedups(table, speed, k)}


def sweep_speedups(table: Rows, speed: Mapping, k: int) -> dict:
    """Our model's speedup at each swept k (timed on the first seed; at the study's own k, ours itself):
    {"k": [int], "batch=B": [Estimate or None per k]}."""
    timed = {k} | {table.first(n)["k"] for n in table.names("sweep") if table.first(n).get("timing")}
    ks = sorted(timed)
    out: dict = {"k": ks}
    for b in speed["settings"]["batch_sizes"]:
        out[f"batch={b}"] = [_speed_estimate(speed, "ours" if kk == k else f"ours k={kk}", b) for kk in ks]
    return out


def robustness(seed_dirs: Mapping[int, Mapping[str, Path]], config: StudyConfig) -> dict | None:
    per_seed = [json.loads((dirs["noise"] / "noise.json").read_text()) for dirs in seed_dirs.values()
                if "noise" in dirs]
    if not per_seed:
        return None
    kinds = {}
    for kind in config.noise.kinds:
        levels = sorted(config.noise.levels)
        entry = {"levels": levels}
        for model in ("teacher", "compact"):
            estimates = [across_seeds([next(r["means"][METRIC] for r in rows if r["model"] == model and
                                            r["kind"] == kind and r["level"] == level) for rows in per_seed])
                         for level in levels]
            entry[model] = {"mean": [e["mean"] for e in estimates], "ci95": _cis(estimates)}
        kinds[kind] = entry
    return {"metric": METRIC, "kinds": kinds}


def scenarios(table: Rows, data, config: StudyConfig) -> dict:
    from layerwise.evaluation.scenarios import candidate_slices, filter_slices, slice_retention

    kept, dropped = filter_slices(candidate_slices(data), config.scenarios.min_users)
    teacher_u, ours_u = table.per_user("teacher"), table.per_user("ours")
    rows = slice_retention(teacher_u, ours_u, table.users, kept, metric=METRIC, n_flag=config.scenarios.n_flag)
    return {"metric": METRIC, "min_users": config.scenarios.min_users, "n_dropped": len(dropped), "rows": rows}


def rivals(table: Rows, data, min_users: int = 20) -> dict | None:
    """Where ours gains or loses against each rival (RIVALS) that every seed ran: ours' per-user metric
    (averaged over seeds) over the rival's, on every user and on coarse slices of at least `min_users`
    users (the test target's popularity, the history's length: scenarios.difference_slices), with a paired
    bootstrap CI and a paired Wilcoxon over users, Holm-adjusted within each rival. None when no rival ran
    on every seed."""
    from layerwise.evaluation.scenarios import difference_slices, filter_slices, slice_retention

    present = [name for name in RIVALS if table.complete(name)]
    if not present or not table.complete("ours"):
        return None
    slices, ours_u = filter_slices(difference_slices(data), min_users)[0], table.per_user("ours")
    rows = []
    for name in present:
        for r in slice_retention(table.per_user(name), ours_u, table.users, slices, metric=METRIC, n_flag=0):
            rows.append({"rival": name, "slice": r["name"], "n": r["n"], "rival_metric": r["teacher"],
                         "ours": r["compact"], "ratio": r["retention"], "ci95": r["ci95"],
                         "p_value": r["p_value"], "p_holm": r["p_holm"]})
    return {"metric": METRIC, "seeds": list(table.seeds), "min_users": min_users, "rows": rows}


def _importance(dirs: Mapping[str, Path], ours: Mapping) -> dict:
    """The first seed's importance scores and its dependency matrix (None until its stage has run)."""
    raw = json.loads((dirs["importance"] / "importance.json").read_text())
    stage = dirs.get("dependency")
    dependency = json.loads((stage / "dependency.json").read_text())["dependency_loss"] if stage else None
    return {"scores": raw["scores"], "kept": ours.get("kept"), "dependency": dependency,
            "dependency_unit": "validation loss interaction (first seed)"}


def _cis(estimates: Sequence[Mapping]) -> list | None:
    """The CIs of a curve, or None when any point has none (one seed): a band needs every point."""
    cis = [e["ci95"] for e in estimates]
    return None if any(c is None for c in cis) else cis


def _speed_estimate(speed: Mapping, key: str, batch) -> dict | None:
    """{"mean", "ci95", "bound", "efficiency", "ceiling", "ceiling_ci95"} of one model's speedup (bound: its
    Amdahl bound, None for a model whose layers are not the teacher's; ceiling: the teacher's own k-layer
    copy's speedup in the same benchmark, where one was timed); a disturbed one (layerwise.perf.guard) has
    no figure."""
    entry = speed["models"].get(key, {}).get("batches", {}).get(str(batch))
    if not entry or entry.get("speedup") is None:
        return None
    if entry.get("status") == "disturbed":
        return {"mean": None, "ci95": None, "status": "disturbed", "disturbed_because": entry["disturbed_because"]}
    return {"mean": entry["speedup"], "ci95": entry.get("speedup_ci95"), "bound": entry.get("bound"),
            "efficiency": entry.get("efficiency"), "ceiling": entry.get("ceiling"),
            "ceiling_ci95": entry.get("ceiling_ci95")}


def _note(row: Mapping) -> str:
    parts = []
    if row.get("kept") is not None and row["table"] != "baselines":
        parts.append(f"kept {row['kept']} (seed {row['seed']})")
    if row.get("weights"):
        used = {m: round(w, 2) for m, w in row["weights"].items() if w}
        parts.append(f"weights {used}")
    return "; ".join(parts)


def _teacher_name(config: StudyConfig) -> str:
    t = config.teacher
    return f"pretrained {Path(t.pretrained).name}" if t.pretrained else f"{t.family}-{t.preset}"


def _stage_seconds(seed_dirs: Mapping[int, Mapping[str, Path]]) -> float:
    """Seconds the seeds' stages took, summed (a resumed study counts each stage once, where it finished)."""
    files = [path / "_seconds.json" for dirs in seed_dirs.values() for path in dirs.values()]
    return sum(json.loads(f.read_text())["seconds"] for f in files if f.exists())


def _protocol(config: StudyConfig, data, k: int, n_layers: int, runs: Sequence[Mapping],
              stage_seconds: float) -> dict:
    timed = [r["seconds"] for r in runs if r["seconds"] is not None]
    t, c = config.teacher, config.compress
    return {
        "data set": config.data.dataset, "fingerprint": data.fingerprint[:16],
        "users / items": f"{data.n_users} / {data.n_items}",
        "split": "leave-one-out by time: last item test, second-to-last validation",
        "ranking": "full catalogue, the user's seen items excluded", "max_len": config.data.max_len,
        "teacher": _teacher_name(config) + (" + item text" if t.text_features else "")
        + (", causal (decoder mask)" if t.causal else ""),
        "seeds": list(config.seeds), "seed controls": "teacher init, data order, calibration draw, bridge init",
        "kept layers": f"{k} of {n_layers} (keep {c.keep})", "selector": c.selector, "bridge rank": c.bridge_rank,
        "healing": f"{c.heal.epochs} epochs max, patience {c.heal.patience}, trainable {c.heal.trainable}",
        "ablation and k sweep seeds": list(extras_seeds(config)),
        "k sweep healing": f"{config.sweep.heal_epochs} epochs", "random-layer draws per seed": config.random_draws,
        "p-values": "paired t-test on seed means (>= 2 seeds), Holm-adjusted per table",
        "wall time (s)": round(sum(timed), 1),
        "invocations": (f"{len(runs)} ({len(runs) - len(timed)} interrupted, not timed)" if len(runs) > len(timed)
                        else len(runs)),
        "stage time summed over seeds (s)": round(stage_seconds, 1),
    }


def _notes(config: StudyConfig, speed: Mapping, batch: str) -> list[str]:
    env = speed.get("env", {})
    load = env.get("load_avg_start")
    return [f"Speedups are at batch {batch} unless a column says otherwise: ratios of median latencies in one "
            f"interleaved benchmark of the first seed's models ({speed['settings']['runs']} rounds, "
            f"{env.get('torch_threads', '?')} torch threads on {env.get('cpu_count', '?')} CPUs"
            + (f", 1-minute load average {load[0]:.1f} at its start" if load else "")
            + "), after every seed finished.", describe(speed.get("guard")),
            *_quantized_note(speed.get("quantized")),
            "Retention is a fraction of the teacher's figure of the same seed."]


def _quantized_note(quantized: Mapping | None) -> list[str]:
    """Quantized rows are timed after the float ones, in a benchmark of their own (driver._time_models)."""
    if not quantized:
        return []
    return [f"{', '.join(quantized['models'])}: timed after the float models, in a benchmark of their own against "
            f"the same teacher. " + describe(quantized.get("guard"))]


# Stop reasons that depend on the machine's load (layerwise.training.train.STOP_REASONS): a run that ended by
# them trained less on a busy machine than it would have on a quiet one.
LOAD_DEPENDENT = {"time_cap": "its wall-clock cap (train.max_minutes)", "schedule_clock": "its schedule's clock"}


def load_dependent_stops(rows: Sequence[Mapping], seed_dirs: Mapping[int, Mapping[str, Path]]) -> list[str]:
    """A note for each training run that stopped for a reason that depends on the machine's load, not on its
    epochs or its validation. Each seed's teacher is read from its manifest (rows made before they recorded
    a stop reason have it only there); other rows from their own training record."""
    from layerwise.models.checkpoint import read_manifest

    stops = {}
    for seed, dirs in seed_dirs.items():
        if "teacher" in dirs and (dirs["teacher"] / "model" / "manifest.json").exists():
            manifest = read_manifest(dirs["teacher"] / "model")
            stops[(seed, "teacher")] = (manifest.get("stop_reason"), len(manifest.get("history") or []),
                                        (manifest.get("train") or {}).get("epochs"))
    for r in rows:
        training = r.get("training") or {}
        if (r["seed"], r["row"]) not in stops and training.get("stop_reason"):
            stops[(r["seed"], r["row"])] = (training["stop_reason"], training.get("epochs_run"), None)
    return [f"Seed {seed}'s {row} stopped at {LOAD_DEPENDENT[reason]} after "
            + (f"{ran} of {planned} epochs" if planned else f"{ran} epoch{'s' * (ran != 1)}")
            + ": its figures depend on the machine's load."
            for (seed, row), (reason, ran, planned) in sorted(stops.items()) if reason in LOAD_DEPENDENT]
