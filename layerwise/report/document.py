"""The study report: one Markdown and one HTML file (plus PNG figures) from a study-results dict.

    paths = write_report(results, "runs/study/report")
    # {"markdown": .../report.md, "html": .../report.html, "figures": {"pareto": .../figures/pareto.png, ...}}

Every section heading is always written; a section whose data is missing says so instead of vanishing.
Intervals are 95% CIs printed as "value [low, high]"; retention is a fraction of the teacher, printed in %.

Results-dict schema (all keys optional except where marked; lists may be numpy arrays):

    Estimate = {"mean": float, "ci95": [low, high] | None}
    Row = {"name": str (required), "group": str (Pareto legend, e.g. "ours", "pruning"),
           "metric": Estimate (the table's metric, e.g. NDCG@10), "retention": Estimate (fraction),
           "speedup": Estimate (x), "p_value": float | None (paired test vs the reference; None for it),
           "p_holm": float (default: Holm over the table's p_values), "p_users": float | None (a second
           test with the users as the unit, where p_value's is the seeds), "p_users_holm": float (default: Holm
           over the table's p_users), "effect_size": float, "note": str}
    results = {
        "title": str,
        "protocol": {label: value, ...},             # data set, fingerprint, split, ranking, seeds, ...
        "headline": {"metric": "ndcg@10", "k": int, "n_layers": int,
                     "teacher": Estimate, "compact": Estimate, "retention": Estimate (required),
                     "speedup": {"batch=1": Estimate, ...},
                     "test": stats.TestResult.to_dict(),  # compact vs teacher, per user
                     "seeds": {"n": int, "retention": Estimate, "test": TestResult dict},
                     "targets": {"retention": {"min": fraction}, "speedup": {"of_bound": fraction}}},
                     # a speedup Estimate may carry "bound" (its Amdahl bound) and "efficiency"
        "baselines": {"metric": str, "reference": str, "rows": [Row, ...],
                      "metrics": {"columns": [str], "rows": [{"name": str, "values": {column: Estimate}}]}},
        "ablation":  {"metric": str, "reference": str, "test": str, "seeds": [int], "rows": [Row, ...]},
        "k_sweep": {"metric": str, "n_layers": int, "heal_epochs": int, "seeds": [int],
                    "curves": {selector: {"k": [int], "mean": [fraction], "ci95": [[lo, hi], ...]}},
                    "speedup": {"k": [int], "batch=1": [Estimate or None per k], ...}},   # optional
        "equal_compute": {...},                     # optional: layerwise.report.compute gives its schema
        "serving": {...},                           # optional: layerwise.report.serving gives its schema
        "robustness": {"metric": str, "kinds": {kind: {"levels": [fraction],
                       "teacher": {"mean": [float], "ci95": [[lo, hi], ...]}, "compact": {...}}}},
        "scenarios": {"metric": str, "min_users": int, "n_dropped": int,
                      "rows": scenarios.slice_retention(...) output},
        "rivals": {"metric": str, "seeds": [int], "min_users": int,  # ours against each rival, by slice
                   "rows": [{"rival": str, "slice": str, "n": int, "rival_metric": float, "ours": float,
                             "ratio": float, "ci95": [lo, hi], "p_value": float, "p_holm": float}]},
        "importance": {"scores": {estimator: [per layer]}, "kept": [int],
                       "dependency": [[float]] (n_layers x n_layers), "dependency_unit": str},
        "unfinished": {"plan": str, "stages": [{"seed": int, "stage": str, "state": "started" | "pending"}],
                       "ablation": [component], "k_sweep": {selector: [k]},
                       "finished_after": ["seed-N/stage"]},  # the plan's stages with no
                       # figure yet; "ablation" and "k_sweep" above may carry their part as "unfinished" too
        "notes": [str],
    }
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from layerwise.data.atomic import atomic_path
from layerwise.evaluation.stats import holm
from layerwise.report import plots
from layerwise.report.compute import equal_compute_plot, equal_compute_section
from layerwise.report.format import MISSING, fmt_estimate, fmt_p
from layerwise.report.format import fmt_number as _fmt
from layerwise.report.render import html_page, markdown
from layerwise.report.serving import serving_plot, serving_section
from layerwise.report.unfinished import unfinished_section

SECTIONS = ("Protocol", "Headline", "Not finished", "Baselines", "Ablation", "k sweep", "Equal compute", "Serving",
            "Robustness", "Scenarios", "Rivals by slice", "Importance")


def write_report(results: Mapping, out_dir: str | Path, embed_images: bool = False) -> dict:
    """Render the figures, report.md and report.html into `out_dir` (each file written atomically).

    Args:
        results: the study-results dict (schema in the module docstring).
        out_dir: the report folder; figures go to `out_dir/figures/`.
        embed_images: put the PNGs into the HTML as base64 (one self-contained file) instead of
            relative links. The Markdown always links `figures/<name>.png`.

    Returns:
        {"markdown": Path, "html": Path, "figures": {name: Path}}.
    """
    out = Path(out_dir)
    figures = _render_figures(results, out / "figures")
    sections = {name: [b for b in fn(results.get(key), figures) if b[0] != "img" or b[1] in figures]
                for name, key, fn in _BUILDERS}
    title = str(results.get("title") or "layerwise study report")
    notes = [("p", str(n)) for n in results.get("notes") or []]
    md_path, html_path = out / "report.md", out / "report.html"
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown(title, sections, notes), encoding="utf-8")
    with atomic_path(html_path) as tmp:
        tmp.write_text(html_page(title, sections, notes, out if embed_images else None), encoding="utf-8")
    return {"markdown": md_path, "html": html_path, "figures": figures}


# ---- sections: each returns a list of blocks ("p", text) | ("table", header, rows) | ("img", name, alt) ---

def _protocol(protocol, figures) -> list:
    if not protocol:
        return [("p", MISSING)]
    return [("table", ["setting", "value"], [[str(k), _plain(v)] for k, v in protocol.items()])]


def _headline(head, figures) -> list:
    if not head or not head.get("retention"):
        return [("p", MISSING)]
    metric = head.get("metric", "ndcg@10").upper()
    layers = f"{head['k']} of {head['n_layers']} layers" if "k" in head and "n_layers" in head else "compact"
    rows = [[f"{metric} teacher", fmt_estimate(head.get("teacher"))],
            [f"{metric} compact ({layers})", fmt_estimate(head.get("compact"))],
            [f"{metric} retention", fmt_estimate(head["retention"], "pct")]]
    rows += [[f"speedup ({batch})", fmt_estimate(est, "speed")] for batch, est in (head.get("speedup") or {}).items()]
    blocks = [("table", ["figure", "value [95% CI]"], rows)]
    if head.get("test"):
        blocks.append(("p", "Per-user paired test, compact vs teacher: " + _test_text(head["test"])))
    seeds = head.get("seeds")
    if seeds:
        parts = [f"Across {seeds.get('n', '?')} seeds: retention {fmt_estimate(seeds.get('retention'), 'pct')}"]
        parts += [_test_text(seeds["test"])] if seeds.get("test") else []
        blocks.append(("p", "; ".join(parts) + "."))
    blocks += [("p", line) for line in _target_lines(head)]
    return blocks


def _test_text(t: Mapping) -> str:
    effect = "rank-biserial r" if t.get("test") == "wilcoxon" else "Cohen's d_z"
    text = (f"{t.get('test', 'test')} over n = {t.get('n', '?')}: p = {fmt_p(t.get('p_value'))}, "
            f"{effect} = {float(t.get('effect_size', float('nan'))):.3f}")
    return text + (f" ({t['note']})" if t.get("note") else "")


def _target_lines(head: Mapping) -> list[str]:
    """Compare each CI with its target: met only when the whole CI clears it. Targets as configured
    ({"retention": {"min"}, "speedup": {"of_bound"}}: a fraction of each batch size's Amdahl bound), or an
    older report's fixed ranges ({name: [low, high]})."""
    targets = head.get("targets") or {}
    if any(isinstance(t, (list, tuple)) for t in targets.values()):
        return _range_target_lines(head, targets)
    lines = []
    retention = targets.get("retention")
    if retention is not None and (head.get("retention") or {}).get("ci95"):
        lines.append(f"Target retention {_fmt(retention['min'], 'pct')} (as configured): "
                     f"{_verdict(head['retention'], retention['min'])}; "
                     f"measured {fmt_estimate(head['retention'], 'pct')}.")
    of_bound = (targets.get("speedup") or {}).get("of_bound")
    for batch, est in (head.get("speedup") or {}).items():
        if of_bound is None or not est or not est.get("ci95"):
            continue
        where = f"k = {head.get('k', '?')} of {head.get('n_layers', '?')} layers, {batch}"
        if est.get("bound") is None:
            lines.append(f"Target speedup ({where}): no Amdahl bound measured; measured {fmt_estimate(est, 'speed')}.")
            continue
        goal = of_bound * float(est["bound"])
        lines.append(f"Target speedup ({where}): {of_bound:.0%} of its Amdahl bound {_fmt(est['bound'], 'speed')}, "
                     f"{_fmt(goal, 'speed')}: {_verdict(est, goal)}; measured {fmt_estimate(est, 'speed')}, "
                     f"{float(est['mean']) / float(est['bound']):.0%} of the bound"
                     + (f"; the teacher's own {head.get('k', '?')} layers, timed beside it, "
                        f"{fmt_estimate({'mean': est['ceiling'], 'ci95': est.get('ceiling_ci95')}, 'speed')}"
                        if est.get("ceiling") is not None else "") + ".")
    return lines


def _verdict(est: Mapping, goal: float) -> str:
    lo, hi = (float(c) for c in est["ci95"])
    return "met" if lo >= goal else "not met" if hi < goal else "inconclusive (the CI straddles it)"


def _range_target_lines(head: Mapping, targets: Mapping) -> list[str]:
    lines = []
    speed = next(iter((head.get("speedup") or {}).values()), None)
    for name, est, kind in (("retention", head.get("retention"), "pct"), ("speedup", speed, "speed")):
        target = targets.get(name)
        if target is None or not est or not est.get("ci95"):
            continue
        lines.append(f"Target {name} {_fmt(target[0], kind)}-{_fmt(target[1], kind)}: {_verdict(est, target[0])}; "
                     f"measured {fmt_estimate(est, kind)}.")
    return lines


def _comparison(table, figures, figure: str | None = None) -> list:
    left = [("p", "Not finished: " + ", ".join(map(str, table["unfinished"])) + ".")] if table and table.get(
        "unfinished") else []
    if not table or not table.get("rows"):
        return [("p", MISSING)] + left
    rows = _with_holm(table["rows"])
    metric = str(table.get("metric", "ndcg@10")).upper()
    columns = [("name", "method", lambda r: str(r["name"])),
               ("metric", f"{metric} [95% CI]", lambda r: fmt_estimate(r.get("metric"))),
               ("retention", "retention [95% CI]", lambda r: fmt_estimate(r.get("retention"), "pct")),
               ("speedup", "speedup [95% CI]", lambda r: fmt_estimate(r.get("speedup"), "speed")),
               ("p_value", "p", lambda r: fmt_p(r.get("p_value"))),
               ("p_holm", "p (Holm)", lambda r: fmt_p(r.get("p_holm"))),
               ("p_users", "p users", lambda r: fmt_p(r.get("p_users"))),
               ("p_users_holm", "p users (Holm)", lambda r: fmt_p(r.get("p_users_holm"))),
               ("effect_size", "effect", lambda r: _opt(r.get("effect_size"))),
               ("note", "note", lambda r: str(r.get("note", "")))]
    used = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    test = table.get("test") or "paired tests over the same users"
    users = f" The p users columns: {table['user_test']}." if table.get("user_test") else ""
    blocks = [("p", f"{test[0].upper()}{test[1:]}, against {table.get('reference', 'our method')}; "
                    f"p-values Holm-adjusted across this table.{users}")]
    blocks.append(("table", [c[1] for c in used], [[c[2](r) for c in used] for r in rows]))
    if figure and figure in figures:
        blocks.append(("img", figure, f"{metric} retention against speedup for every method"))
    return blocks + left + _metric_columns(table.get("metrics"))


def _metric_columns(metrics) -> list:
    """Every metric of every method (mean over seeds [95% CI]), as papers report them."""
    if not metrics or not metrics.get("rows"):
        return []
    columns = list(metrics["columns"])
    rows = [[str(r["name"]), *(fmt_estimate(r["values"].get(c)) for c in columns)] for r in metrics["rows"]]
    return [("p", "Every metric, the mean over seeds [95% CI] (test split, full ranking, seen items excluded):"),
            ("table", ["method", *(c.upper() for c in columns)], rows)]


def _with_holm(rows: Sequence[Mapping]) -> list[dict]:
    """The rows with each family of p-values (over seeds: p_value; over users: p_users) Holm-adjusted across
    the table, where the rows do not carry the adjusted values already."""
    rows = [dict(r) for r in rows]
    for key, adjusted in (("p_value", "p_holm"), ("p_users", "p_users_holm")):
        tested = [i for i, r in enumerate(rows) if r.get(key) is not None]
        if tested and any(rows[i].get(adjusted) is None for i in tested):
            for i, p in zip(tested, holm([rows[i][key] for i in tested])):
                rows[i][adjusted] = float(p)
    return rows


def _k_sweep(sweep, figures) -> list:
    left = (sweep or {}).get("unfinished") or {}
    if not sweep or not (sweep.get("curves") or left):
        return [("p", MISSING)]
    curves = {name: sweep.get("curves", {}).get(name, {"k": [], "mean": []}) for name in
              [*sweep.get("curves", {}), *(s for s in left if s not in sweep.get("curves", {}))]}
    ks = sorted({int(k) for c in curves.values() for k in c["k"]} | {int(k) for v in left.values() for k in v})
    speed = sweep.get("speedup") or {}
    batches = [b for b in speed if b != "k"]
    rows = []
    for k in ks:
        row = [str(k)]
        for name, curve in curves.items():
            at = [i for i, v in enumerate(curve["k"]) if int(v) == k]
            ci = curve.get("ci95")
            missing = "not finished" if k in map(int, left.get(name, [])) else "-"
            row.append(fmt_estimate({"mean": curve["mean"][at[0]], "ci95": ci[at[0]] if ci is not None else None},
                                    "pct") if at else missing)
        timed = [i for i, v in enumerate(speed.get("k", [])) if int(v) == k]
        row += [fmt_estimate(speed[b][timed[0]], "speed") if timed else "-" for b in batches]
        rows.append(row)
    metric = str(sweep.get("metric", "ndcg@10")).upper()
    over = f" over seeds {sweep['seeds']}" if sweep.get("seeds") else ""
    timing = (" The speedup is our model's at that k against the teacher, from the same interleaved benchmark "
              "(first seed)." if batches else "")
    return [("p", f"Retention of each selector's model healed for {sweep.get('heal_epochs', '?')} epochs, mean "
                  f"[95% CI]{over}.{timing}"),
            ("table", ["k"] + [f"{name}: {metric} retention" for name in curves]
             + [f"speedup ({b})" for b in batches], rows),
            ("img", "k_sweep", f"{metric} retention against k")]


def _robustness(robust, figures) -> list:
    if not robust or not robust.get("kinds"):
        return [("p", MISSING)]
    metric = str(robust.get("metric", "ndcg@10")).upper()
    rows = []
    for kind, entry in robust["kinds"].items():
        models = [m for m in entry if m != "levels"]
        for i, level in enumerate(entry["levels"]):
            cells = [fmt_estimate({"mean": entry[m]["mean"][i],
                                   "ci95": entry[m]["ci95"][i] if entry[m].get("ci95") is not None else None})
                     for m in models]
            rows.append([kind, _fmt(level, "pct")] + cells)
    header = ["noise", "level"] + [f"{m} {metric}" for m in models]
    return [("p", "Test histories perturbed (targets untouched); level = expected fraction of positions."),
            ("table", header, rows), ("img", "robustness", f"{metric} against noise level")]


def _scenarios(scen, figures) -> list:
    if not scen or not scen.get("rows"):
        return [("p", MISSING)]
    rows = [r for r in scen["rows"] if np.isfinite(r["retention"])]
    below = sum(r["ci95"][1] < 1 for r in rows)
    flagged = [r for r in rows if r.get("flagged")]
    summary = (f"{len(scen['rows'])} slices of at least {scen.get('min_users', '?')} users "
               f"({scen.get('n_dropped', '?')} smaller slices dropped). Median retention "
               f"{_fmt(np.median([r['retention'] for r in rows]), 'pct')}; {below} slices have a CI entirely "
               f"below 100%; flagged (lowest of those): {', '.join(r['name'] for r in flagged) or 'none'}.")
    header = ["slice", "users", "teacher", "compact", "retention [95% CI]", "p (Holm)", "flagged"]
    table = [[r["name"], str(r["n"]), _fmt(r["teacher"], "metric"), _fmt(r["compact"], "metric"),
              fmt_estimate({"mean": r["retention"], "ci95": r["ci95"]}, "pct"), fmt_p(r.get("p_holm")),
              "yes" if r.get("flagged") else ""] for r in sorted(scen["rows"], key=lambda r: r["retention"])]
    return [("p", summary), ("img", "slices", "retention per slice"), ("table", header, table)]


def _rivals(entry, figures) -> list:
    if not entry or not entry.get("rows"):
        return [("p", MISSING)]
    metric = str(entry.get("metric", "ndcg@10")).upper()
    rows = [[r["rival"], r["slice"], str(r["n"]), _fmt(r["rival_metric"], "metric"), _fmt(r["ours"], "metric"),
             fmt_estimate({"mean": r["ratio"], "ci95": r["ci95"]}, "pct"), fmt_p(r.get("p_holm"))]
            for r in entry["rows"]]
    return [("p", f"Where ours gains or loses against each rival that ran on every seed: ours' test {metric} "
                  f"as a share of the rival's on the same users (each user's metric averaged over seeds "
                  f"{entry.get('seeds')}), with a paired bootstrap 95% CI and a paired Wilcoxon test over "
                  f"users, Holm-adjusted within each rival. target_pop: the train popularity of the test "
                  f"target in terciles (rare, mid, popular); history_len: the length of the test history; "
                  f"slices of fewer than {entry.get('min_users', '?')} users are left out."),
            ("table", ["rival", "slice", "users", f"rival {metric}", f"ours {metric}", "ours / rival [95% CI]",
                       "p (Holm)"], rows)]


def _importance(imp, figures) -> list:
    if not imp or not imp.get("scores"):
        return [("p", MISSING)]
    kept = imp.get("kept")
    rows = [[name, ", ".join(str(int(i)) for i in np.argsort(-np.asarray(s, dtype=float), kind="stable"))]
            for name, s in imp["scores"].items()]
    blocks = [("p", f"Kept teacher layers: {', '.join(map(str, kept))}." if kept else "Layers by importance:"),
              ("table", ["estimator", "layers, most important first"], rows),
              ("img", "importance", "layer importance heatmap")]
    if "dependency" in figures:
        blocks.append(("img", "dependency", "inter-layer dependency matrix"))
    return blocks


_BUILDERS = (("Protocol", "protocol", _protocol), ("Headline", "headline", _headline),
             ("Not finished", "unfinished", unfinished_section),
             ("Baselines", "baselines", lambda t, f: _comparison(t, f, "pareto")),
             ("Ablation", "ablation", _comparison), ("k sweep", "k_sweep", _k_sweep),
             ("Equal compute", "equal_compute", equal_compute_section), ("Serving", "serving", serving_section),
             ("Robustness", "robustness", _robustness), ("Scenarios", "scenarios", _scenarios),
             ("Rivals by slice", "rivals", _rivals),
             ("Importance", "importance", _importance))


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _opt(x) -> str:
    return "-" if x is None else f"{float(x):.3f}"


# ---- figures and renderers ---------------------------------------------------------------------------

def _render_figures(results: Mapping, folder: Path) -> dict[str, Path]:
    """Draw every figure whose data is present; returns name -> PNG path."""
    makers = {}
    imp = results.get("importance") or {}
    if imp.get("scores"):
        makers["importance"] = lambda: plots.importance_heatmap(imp["scores"], kept=imp.get("kept"))
    if imp.get("dependency") is not None:
        makers["dependency"] = lambda: plots.dependency_heatmap(
            imp["dependency"], unit=imp.get("dependency_unit", "interaction in validation loss"))
    points = [_point(r) for r in (results.get("baselines") or {}).get("rows", [])]
    if [p for p in points if p]:
        makers["pareto"] = lambda: plots.pareto_plot([p for p in points if p])
    sweep = results.get("k_sweep") or {}
    if sweep.get("curves"):
        makers["k_sweep"] = lambda: plots.k_sweep_plot(sweep["curves"], n_layers=sweep.get("n_layers"))
    compute = results.get("equal_compute") or {}
    if compute.get("rows"):
        makers["equal_compute"] = lambda: equal_compute_plot(compute)
    serving = results.get("serving") or {}
    if serving.get("models"):
        makers["serving"] = lambda: serving_plot(serving)
    robust = results.get("robustness") or {}
    if robust.get("kinds"):
        makers["robustness"] = lambda: plots.noise_plot(robust["kinds"], metric=robust.get("metric", "ndcg@10").upper())
    scen = results.get("scenarios") or {}
    if scen.get("rows"):
        makers["slices"] = lambda: plots.slice_plot(scen["rows"])
    return {name: plots.save_figure(make(), folder / f"{name}.png") for name, make in makers.items()}


def _point(row: Mapping) -> dict | None:
    ret, speed = row.get("retention"), row.get("speedup")
    if not ret or not speed or ret.get("mean") is None or speed.get("mean") is None:
        return None
    return {"name": row["name"], "group": row.get("group", "method"), "speedup": speed["mean"],
            "retention": ret["mean"], "speedup_ci95": speed.get("ci95"), "retention_ci95": ret.get("ci95")}
