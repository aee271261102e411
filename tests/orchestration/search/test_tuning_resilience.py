"""`layerwise tune` under stress: healing inside a trial on Ray Train + DeepSpeed (two ranks), and a search
stopped with Ctrl-C, then with kill -9, then resumed without redoing a finished trial.

Kept apart from test_tuning.py (the per-family searches) so that pytest-xdist's two workers run the two
halves side by side: together they were the suite's longest file by far.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState

from layerwise.compression.compact import load_compact
from layerwise.models.checkpoint import save_recommender
from layerwise.training.train import TrainConfig, train_recommender
from orchestration.distributed.specs import DataSpec, ModelSpec, build_model
from orchestration.search.tuning import run_search
from tests.helpers.tuning import DATA, ROOT, mlflow_client, report, study, timed_rows, tiny, trial_runs


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def teacher_dir(cache, tmp_path_factory) -> str:
    """One tiny trained LLaMA teacher shared by the distributed-healing and resume tests."""
    data = DataSpec(DATA, cache_dir=str(cache)).load()
    spec = ModelSpec("llama", "tiny", n_layers=4, max_len=50, dropout=0.1, seed=0)
    model = build_model(spec, data)
    result = train_recommender(model, data, TrainConfig(epochs=8, lr=3e-3, seed=0), progress=False)
    out = tmp_path_factory.mktemp("teacher") / "model"
    save_recommender(model, out, {"kind": "teacher", "data_fingerprint": data.fingerprint, "max_len": 50,
                                  "valid": result.best_valid})
    return str(out)


# --- Ray Train + DeepSpeed healing inside a trial ------------------------------------------------------------
@pytest.mark.slow
def test_distributed_heal_runs_on_ray_train_with_deepspeed(ray_local, teacher_dir, cache, tmp_path):
    run_dir = tmp_path / "run"
    result = run_search(ROOT / "tune_spaces" / "llama.yaml", 1, "pareto", teacher_dir, run_dir,
                        overrides=tiny(cache, "space.selector=topk", "space.method=block_influence",
                                       "space.bridge_rank=4"), distributed_heal=True)
    (row,) = result["rows"]
    assert result["errors"] == 0 and row["heal_workers"] == 2  # two DeepSpeed ranks healed it
    (train_run,) = [p for p in (run_dir / "ray_train").iterdir() if p.name.startswith(f"heal-{row['trial_id']}")]
    healed = json.loads((Path(row["model_dir"]).parent / "healed" / "manifest.json").read_text())
    assert healed["teacher_dir"] == teacher_dir and healed["heal"]["epochs"] == 1 and healed["kind"] == "compact"
    assert load_compact(row["model_dir"]).n_layers == row["n_layers"] < 4 and math.isfinite(row["retention"])
    assert train_run.is_dir()


# --- Ctrl-C, then kill -9, then resume ---------------------------------------------------------------------
RESUME_SAMPLES = 3


def _start(run_dir: Path, teacher: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "orchestration.search.tuning", str(ROOT / "tune_spaces" / "llama.yaml"),
            *tiny(cache, "space.selector=topk"), "--samples", str(RESUME_SAMPLES), "--objective", "pareto",
            "--teacher", teacher, "--max-concurrent", "1", "--run-dir", str(run_dir),
            "--num-cpus", "2", "--object-store-mb", "150"]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _saved_statuses(run_dir: Path) -> dict[str, str]:
    """Trial id -> status in Tune's newest saved experiment state (what a restore will see). Each driver
    session writes its own file, named by its start time; mtimes are no guide (a sync rewrites old ones)."""
    paths = sorted((run_dir / "tune").glob("experiment_state-*.json"))
    try:
        trials = json.loads(paths[-1].read_text())["trial_data"] if paths else []
    except (json.JSONDecodeError, OSError, KeyError):
        return {}  # being written
    return {t["trial_id"]: t["status"] for t in (json.loads(d[0]) for d in trials)}


def _finished(run_dir: Path) -> set[str]:
    return {t for t, status in _saved_statuses(run_dir).items() if status == "TERMINATED"}


def _wait_for_finished(proc: subprocess.Popen, run_dir: Path, count: int) -> None:
    deadline = time.time() + 600
    while len(_finished(run_dir)) < count:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, f"{count} trials did not finish in time"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    """Send `sig` to the driver's process group (as Ctrl-C or kill -9 would), wait for it, then end any of
    its descendants that outlived it (by pid: only processes this test started)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=180)
    _, alive = psutil.wait_procs(family, timeout=30)
    for child in alive:
        child.kill()
    return proc.returncode, out


def _reports(run_dir: Path, trial_id: str) -> int:
    """Results Tune recorded for a trial (lines of its result.json): 1 means it ran exactly once."""
    (trial_dir,) = (run_dir / "tune").glob(f"search_trial_{trial_id}_*")
    return len((trial_dir / "result.json").read_text().splitlines())


@pytest.mark.slow
def test_search_survives_ctrl_c_and_kill_9_and_never_redoes_a_finished_trial(teacher_dir, cache, tmp_path):
    run_dir = tmp_path / "run"
    first = _start(run_dir, teacher_dir, cache)
    _wait_for_finished(first, run_dir, 1)
    code, out = _stop(first, signal.SIGINT)
    assert code == 130 and "search interrupted" in out, out  # stopped cleanly, no partial front
    assert not (run_dir / "report").exists() and not (run_dir / "registered.json").exists()
    done = _finished(run_dir)
    assert 1 <= len(done) < RESUME_SAMPLES

    second = _start(run_dir, teacher_dir, cache)
    _wait_for_finished(second, run_dir, len(done) + 1)
    _stop(second, signal.SIGKILL)
    done_before_kill = _finished(run_dir)
    assert done < done_before_kill and len(done_before_kill) < RESUME_SAMPLES
    first_runs = {r.data.tags["trial_id"]: r.info.run_id for r in trial_runs(run_dir)}

    third = _start(run_dir, teacher_dir, cache)
    out, _ = third.communicate(timeout=900)
    assert third.returncode == 0, out
    assert "resuming the search" in out
    rows = report(run_dir)["trials"]
    assert len(rows) == RESUME_SAMPLES and done_before_kill <= {r["trial_id"] for r in rows}
    assert sorted(_saved_statuses(run_dir).values()) == ["TERMINATED"] * RESUME_SAMPLES
    runs = trial_runs(run_dir)
    for trial_id in done_before_kill:  # ran once: one MLflow run (from before the stops), one result
        assert [r.info.run_id for r in runs if r.data.tags["trial_id"] == trial_id] == [first_runs[trial_id]]
        assert _reports(run_dir, trial_id) == 1
    # every trial reached Optuna once; one whose timing stayed disturbed (layerwise.perf.guard) reports NaN
    # speed and is recorded failed there, so COMPLETE counts exactly the trials with a speed
    assert len(study(run_dir).get_trials(states=(TrialState.COMPLETE,))) == len(timed_rows(rows))
    assert not study(run_dir).get_trials(states=(TrialState.RUNNING,))  # killed trials' entries are closed
    parent = json.loads((run_dir / "search.json").read_text())["parent_run_id"]
    assert mlflow_client(run_dir).get_run(parent).info.status == "FINISHED"  # one search run, reopened
