"""Publish a finished study: `layerwise study report RUN_DIR --out results/NAME`.

    layerwise study report runs/ml100k-llama --out results/ml100k-llama

Regenerates, from the study's run folder alone (its results.json, config.json and invocations.json), a
small folder that can live in the repository:

    report.md, report.html   the study report (layerwise.report), figures linked, not embedded
    figures/*.png            its figures
    summary.json             the headline, every table (its rows and how they were tested), the protocol,
                             the notes, the study's config and the wall time of each of its runs

No model weights and no per-user tables: the folder is checked to stay under MAX_BYTES. It is written
beside its target and renamed into place, so a failed publication leaves the previous one untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from orchestration.outputs import write_json

TABLES = ("baselines", "ablation", "k_sweep", "robustness", "scenarios", "importance")
MAX_BYTES = 5 * 2**20


def publish_study(run_dir: str | Path, out: str | Path) -> dict[str, Path]:
    """Write the report, its figures and summary.json of the finished study in `run_dir` to `out`
    (replacing what was there); returns {"markdown", "html", "summary", "figures": {name: path}}."""
    from layerwise.report import write_report

    run_dir, out = Path(run_dir), Path(out)
    results = _read(run_dir, "results.json", "the study has not finished; run `layerwise study` on its "
                                             "config again to resume it")
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
        "config": _read(run_dir, "config.json", "not a study run folder"),
        "invocations": json.loads((run_dir / "invocations.json").read_text())
        if (run_dir / "invocations.json").exists() else None,
    }


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
