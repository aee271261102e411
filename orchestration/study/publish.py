"""Publish a finished study: `layerwise study report RUN_DIR --out results/NAME`.

    layerwise study report runs/ml100k-llama --out results/ml100k-llama

Regenerates, from the study's run folder alone (its results.json, config.json and invocations.json), a
small folder that can live in the repository:

    report.md, report.html   the study report (layerwise.report), figures linked, not embedded
    figures/*.png            its figures
    summary.json             the headline, every table (its rows and how they were tested), the protocol,
                             the notes, the study's config and the wall time of each of its runs

`--serving SWEEP.json` adds the report's Serving section from a `layerwise bench-serve --sweep` of the study's
own models (each model path must name one of its stage folders, seeds/seed-N/<stage>):

    layerwise bench-serve --model runs/S/seeds/seed-0/ours-*/model --teacher runs/S/seeds/seed-0/teacher-*/model \
        --dataset ml-100k --sweep 4,8,16,32,64,128 --json benchmarks/results/serve_sweep_S.json
    layerwise study report runs/S --out results/S --serving benchmarks/results/serve_sweep_S.json

A study published before every stage of its plan has finished says which have not, in a "Not finished"
section and in the ablation and k-sweep tables, never with a figure. The plan is the config of the study's
last run (its config.json), or `--plan CONFIG.yaml [key=value ...]`, the config and overrides the whole
study runs with, where the last run was a part of it:

    layerwise study report runs/S --out results/S --plan studies/S.yaml seeds=[0,2,1]

No model weights and no per-user tables: the folder is checked to stay under MAX_BYTES. It is written
beside its target and renamed into place, so a failed publication leaves the previous one untouched.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

from orchestration.outputs import write_json

TABLES = ("baselines", "ablation", "k_sweep", "serving", "robustness", "scenarios", "rivals", "importance")
MAX_BYTES = 5 * 2**20


def publish_study(run_dir: str | Path, out: str | Path, serving: str | Path | None = None,
                  plan: tuple[str | None, list[str]] | None = None) -> dict[str, Path]:
    """Write the report, its figures and summary.json of the finished study in `run_dir` to `out`
    (replacing what was there), with the Serving section read from the bench-serve sweep `serving` if
    given, and the stages of `plan` (a YAML path and key=value overrides; default: the study's last run's
    config.json) that have not finished; returns {"markdown", "html", "summary", "figures": {name: path}}."""
    from layerwise.report import write_report
    from orchestration.study.results import with_unfinished

    run_dir, out = Path(run_dir), Path(out)
    results = _read(run_dir, "results.json", "the study has not finished; run `layerwise study` on its "
                                             "config again to resume it")
    if serving is not None:
        results = {**results, "serving": serving_results(serving, run_dir)}
    results = with_unfinished(results, plan_record(run_dir, results, plan))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        paths = write_report(results, tmp)
        write_json(tmp / "summary.json", summary(results, run_dir))
        _check_size(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"markdown": out / "report.md", "html": out / "report.html", "summary": out / "summary.json",
            "figures": {name: out / "figures" / path.name for name, path in paths["figures"].items()}}


def summary(results: dict, run_dir: Path) -> dict:
    """What a reader needs to check the report's numbers without the run folder."""
    return {
        "study": run_dir.name,
        "title": results.get("title"),
        "headline": results.get("headline"),
        "tables": {name: results[name] for name in TABLES if results.get(name) is not None},
        "protocol": results.get("protocol"),
        "notes": results.get("notes", []),
        "unfinished": results.get("unfinished"),
        "config": _read(run_dir, "config.json", "not a study run folder"),
        "invocations": json.loads((run_dir / "invocations.json").read_text())
        if (run_dir / "invocations.json").exists() else None,
    }


def plan_record(run_dir: Path, results: dict, plan: tuple[str | None, list[str]] | None = None) -> dict:
    """The unfinished-stages record (orchestration.study.results.unfinished_results) of the study in
    `run_dir` against `plan`: (YAML path or None for the defaults, overrides), or None for its last run's
    config.json. The plan must name this study; its stages are looked for in `run_dir` and the archives its
    `reuse` names."""
    from orchestration.study.config import load_study_config
    from orchestration.study.results import LAST_RUN, unfinished_results
    from orchestration.study.status import study_status, unfinished

    if plan is None:
        _read(run_dir, "config.json", "not a study run folder")
        path, overrides, described = str(run_dir / "config.json"), [], LAST_RUN
    else:
        path, overrides = plan
        described = " ".join([path or "the defaults", *overrides])
    config = load_study_config(path, overrides)
    if config.name != run_dir.name:
        raise ValueError(f"--plan {described}: it plans the study {config.name!r}, not {run_dir.name!r} "
                         f"({run_dir}); give the config and overrides that study runs with")
    config = replace(config, run_dir=str(run_dir.parent))
    n_layers = (results.get("headline") or {}).get("n_layers") or (results.get("k_sweep") or {}).get("n_layers")
    status = study_status(config)
    record = unfinished_results(config, unfinished(status), n_layers, described)
    built = (run_dir / "results.json").stat().st_mtime
    record["finished_after"] = [f"seed-{row['seed']}/{row['stage']}" for row in status["stages"]
                                if row["state"] == "done" and _finished_at(Path(row["folder"])) > built]
    return record


def _finished_at(folder: Path) -> float:
    """When a stage finished: its done marker's time (orchestration.pipeline.stages)."""
    marker = folder / "_DONE"
    return marker.stat().st_mtime if marker.exists() else 0.0


def serving_results(path: str | Path, run_dir: str | Path) -> dict:
    """The report's serving entry (schema: layerwise.report.serving) from a `layerwise bench-serve --sweep` JSON
    whose every model is a stage of the study in `run_dir`. Raises ValueError naming what is wrong."""
    path, run_dir = Path(path), Path(run_dir)
    try:
        sweep = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--serving {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--serving {path}: not JSON ({error})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("models"), list) or not sweep["models"]:
        raise ValueError(f"--serving {path}: not a `layerwise bench-serve --sweep` JSON (no 'models' list)")
    models, roots = [], _stage_roots(run_dir)
    for i, model in enumerate(sweep["models"]):
        try:
            models.append(_served_model(model, roots))
        except (KeyError, TypeError) as error:
            raise ValueError(f"--serving {path}: model {i} lacks {error} (a bench-serve sweep's models carry "
                             f"label, model, layers and levels)") from None
        except ValueError as error:
            raise ValueError(f"--serving {path}: {error}") from None
    settings = sweep.get("settings") or {}
    return {"source": path.as_posix(), "started": sweep.get("started"), "cpus": sweep.get("cpus"),
            "settings": {k: settings.get(k) for k in ("num_replicas", "torch_threads", "max_batch_size",
                                                      "max_queued_requests", "model_call")},
            "client": {k: (sweep.get("client") or {}).get(k) for k in ("seconds", "honor_retry_after")},
            "models": models}


def _stage_roots(run_dir: Path) -> list[Path]:
    """Where the study's stage folders lie: its run folder, and the archives its config reuses (a stage
    finished on an earlier machine stays there; the paths as the config gave them, from the working
    directory)."""
    config = run_dir / "config.json"
    reuse = (json.loads(config.read_text()).get("reuse") or []) if config.exists() else []
    return [run_dir, *(Path(r) for r in reuse)]


def _served_model(model: dict, roots: list[Path]) -> dict:
    """One served model, named by its stage folder, which must be one of the study's (`_stage_roots`)."""
    match = re.search(r"(?:^|/)seeds/(seed-\d+)/([^/]+)/", str(model["model"]).replace("\\", "/"))
    if match is None or not any((root / "seeds" / match[1] / match[2]).is_dir() for root in roots):
        raise ValueError(f"model {model['label']!r} ({model['model']}) is not a stage of the study in "
                         f"{' or '.join(map(str, roots))} (a served model's path names its stage folder, "
                         f"seeds/seed-N/<stage>/model)")
    paired = (model.get("overload") or {}).get("paired")
    return {"label": str(model["label"]), "stage": f"{match[1]}/{match[2]}", "layers": int(model["layers"]),
            "levels": [{"concurrency": int(lv["concurrency"]), "goodput_per_s": float(lv["goodput_per_s"]),
                        "p50_ms": lv["answered_ms"]["p50"], "p99_ms": lv["answered_ms"]["p99"],
                        "refused_share": float(lv["refused_share"]), "other_failures": int(lv["other_failures"])}
                       for lv in model["levels"]],
            "paired": None if not paired else {"goodput_ratio": paired["goodput_ratio"],
                                               "p99_ratio": paired["p99_ratio"], "met": bool(paired["met"]["all"])}}


def _read(run_dir: Path, name: str, why: str) -> dict:
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {name}: {why}")
    return json.loads(path.read_text())


def _check_size(folder: Path) -> None:
    sizes = {p.relative_to(folder): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    if sum(sizes.values()) > MAX_BYTES:
        largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
        raise ValueError(f"the published study would take {sum(sizes.values()) / 2**20:.1f} MB, more than "
                         f"{MAX_BYTES / 2**20:.0f} MB; largest files: {largest}")
