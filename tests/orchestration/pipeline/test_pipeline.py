"""`layerwise run` end to end on tiny data: headline, MLflow runs and champion, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from layerwise.data import LITERATURE_METRICS

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)

TINY = [
    "name=tiny", "data.dataset=synthetic:240:60:4000:1", "data.max_len=20",
    "teacher.preset=tiny", "teacher.family=llama", "teacher.train.epochs=4", "teacher.train.lr=0.003",
    "compress.keep=0.5", "compress.selector=beam", "compress.bridge_rank=4", "compress.calib_batches=2",
    "compress.calib_batch_size=16", "compress.heal.epochs=1", "compress.heal.prefit_steps=20",
    "bench.runs=3", "bench.warmup=1", "bench.batch_sizes=[1,4]", "ray.shards=2",
]


def start(workdir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for leftover in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # set by earlier tests
        env.pop(leftover, None)
    args = [sys.executable, "-m", "orchestration.cli", "run", *TINY, f"run_dir={workdir / 'runs'}",
            f"data.cache_dir={workdir / 'cache'}", *extra]
    # SIGINT back to its default in the child, as a shell would: a child inherits an ignored SIGINT, and
    # then Python never raises KeyboardInterrupt in it.
    return subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(proc: subprocess.Popen, timeout: int = 900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
    """Kill a run right after its teacher stage finishes, then run it again to completion.

    Returns the work dir, both outputs, and the stages that were done when the kill landed (on a loaded
    machine the run may finish one more stage before the signal is handled)."""
    workdir = tmp_path_factory.mktemp("pipeline")
    proc = start(workdir)
    deadline = time.time() + 600
    while not list((workdir / "runs" / "tiny").glob("teacher-*/_DONE")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "teacher stage never finished"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    first, _ = proc.communicate(timeout=120)
    first = (proc.returncode, first)
    done = {p.parent.name.rsplit("-", 1)[0] for p in (workdir / "runs" / "tiny").glob("*/_DONE")}
    second = finish(start(workdir))
    return workdir, first, second, done


def test_resume_skips_finished_stages(interrupted_then_resumed):
    workdir, (code, first), second, done = interrupted_then_resumed
    assert "teacher" in done and "bench" not in done, done  # the kill landed mid-run
    # Ctrl-C ends the run with the shell's code and says how to resume, not with a traceback.
    assert code == 130 and "interrupted" in first and "run the same command again to resume" in first, first[-2000:]
    assert "teacher: done earlier" in second
    for stage in ("teacher", "importance", "compact", "evaluate-compact", "bench"):
        if stage in done:
            assert f"- {stage}: done earlier" in second and f"> {stage} -" not in second
        else:
            assert f"> {stage}" in second


def test_headline_and_registry(interrupted_then_resumed):
    workdir, _, second, _ = interrupted_then_resumed
    head = json.loads((workdir / "runs" / "tiny" / "headline.json").read_text())
    quality = head["metrics"]["quality"]["ndcg@10"]
    assert 0 < quality["teacher"] <= 1 and 0 < quality["compact"] <= 1
    assert quality["retention"] == pytest.approx(quality["compact"] / quality["teacher"])
    assert head["layers"]["teacher"] == 2 and head["layers"]["compact"] == 1
    assert head["metrics"]["speed"]["4"]["speedup"] > 0
    assert "NDCG@10" in second and "speedup" in second
    # The literature's metrics are in the headline, each with its retention, and in the printed table.
    assert set(LITERATURE_METRICS) <= set(head["metrics"]["quality"])
    assert all(f"{m.upper()} " in second for m in LITERATURE_METRICS)
    report = (workdir / "runs" / "tiny" / "report" / "report.md").read_text()
    assert "Headline" in report and "Importance" in report
    assert list((workdir / "runs" / "tiny" / "report" / "figures").glob("*.png"))
    uri = f"sqlite:///{workdir / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not a registry URI another test left set
    version = client.get_model_version_by_alias("layerwise-compact", "champion")
    assert int(version.version) == head["registered"]["version"]
    runs = client.search_runs([client.get_experiment_by_name("layerwise").experiment_id])
    statuses = sorted(r.info.status for r in runs)
    assert "FINISHED" in statuses and len(runs) == 2
    assert statuses.count("FINISHED") == 1, "the interrupted run must not end FINISHED"
