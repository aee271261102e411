"""`layerwise study status` on a started stage says how far its checkpointed training runs got, from their
epoch checkpoints, loading no model."""

from __future__ import annotations

import pytest

from layerwise.training.resume import saved_progress
from layerwise.training.train import TrainConfig, train_recommender
from orchestration.study.status import _row, format_status, saved_runs
from tests.helpers.tiny_models import cyclic_data, tiny_model


def test_a_started_stage_names_each_run_and_its_last_saved_epoch(tmp_path):
    stage = tmp_path / "baseline-random-0123456789ab"
    data = cyclic_data(n_users=20)
    config = TrainConfig(epochs=4, batch_size=32, lr=1e-2, max_len=12, patience=4, eval_every=2)
    with pytest.raises(KeyboardInterrupt):  # stopped after epoch 3, as a session's end stops a stage
        train_recommender(tiny_model(n_items=data.n_items), data, config, progress=False,
                          checkpoint=stage / "heal-checkpoint" / "heal-1", stop=lambda epoch: epoch == 3)
    assert saved_progress(stage / "heal-checkpoint" / "heal-1")["epoch"] == 3
    assert saved_progress(tmp_path / "nothing") is None

    [run] = saved_runs(stage)
    assert run["run"] == "heal-checkpoint/heal-1" and run["epoch"] == 3 and not run["finished"]
    assert run["minutes"] > 0
    row = _row(0, "baseline-random", "started", stage)
    assert row["saved"] == [run] and _row(0, "baseline-random", "pending", None)["saved"] == []
    text = format_status({"run_dir": "runs/s", "stages": [row], "counts": {"done": 0, "reused": 0, "started": 1,
                                                                          "pending": 0},
                          "cpu_hours_done": 0.0, "cpu_hours_left": 0.0, "unestimated": []})
    assert "baseline-random              started  heal-checkpoint/heal-1: epoch 3 saved (" in text


def test_status_tells_a_stage_running_now_from_one_whose_process_is_gone(tmp_path):
    import json
    import socket
    import subprocess
    import sys
    import time

    from orchestration.pipeline.stages import RUNNING, Stages
    from orchestration.study.status import running

    seen = []
    Stages(tmp_path).run("teacher", "1a2b", lambda out: seen.append(running(out)))
    assert seen == [True] and running(tmp_path / "teacher-1a2b") is None  # its marker went with it

    def stop(out):
        raise KeyboardInterrupt  # Ctrl-C: the stage removes its marker on the way out

    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path).run("importance", "3c4d", stop)
    assert running(tmp_path / "importance-3c4d") is None

    killed = tmp_path / "ours-5e6f"  # a process killed mid-stage leaves its marker behind
    killed.mkdir()
    since = time.time()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (killed / RUNNING).write_text(json.dumps({"since": since, "pid": int(gone.stdout), "host": socket.gethostname()}))
    assert running(killed) is False
    row = _row(0, "ours", "started", killed)
    text = format_status({"run_dir": "runs/s", "stages": [row], "counts": {"done": 0, "reused": 0, "started": 1,
                                                                          "pending": 0},
                          "cpu_hours_done": 0.0, "cpu_hours_left": 0.0, "unestimated": []})
    assert "ours                         started  not running (its process was killed)" in text
    (killed / RUNNING).write_text(json.dumps({"since": since, "pid": 1, "host": "another-node"}))
    assert running(killed) is None  # another node's process: not visible from here


def test_a_stage_no_seed_has_finished_is_estimated_from_its_finished_training_runs():
    from orchestration.study.status import _estimate_by_runs

    def row(seed, stage, state, *saved):
        return {"seed": seed, "stage": stage, "state": state, "seconds": None, "cpu_seconds": None,
                "running": None, "cpu_seconds_estimate": None,
                "saved": [{"run": f"heal-checkpoint/heal-{i + 1}", "epoch": 6, "minutes": m, "finished": f}
                          for i, (m, f) in enumerate(saved)]}

    started = row(0, "baseline-random", "started", (30.0, True), (10.0, False))  # draw 1 done, draw 2 begun
    pending = row(1, "baseline-random", "pending")
    unknown = row(0, "dependency", "pending")
    rows = [started, pending, unknown]
    _estimate_by_runs(rows, rows, {"baseline-random": 3})
    assert started["wall_seconds_estimate"] == 60 * (3 * 30.0 - 40.0)  # three draws of 30 min, 40 spent
    assert pending["wall_seconds_estimate"] == 60 * 90.0 and "wall_seconds_estimate" not in unknown
    text = format_status({"run_dir": "runs/s", "stages": rows, "counts": {"done": 0, "reused": 0, "started": 1,
                                                                          "pending": 2},
                          "cpu_hours_done": 0.0, "cpu_hours_left": 0.0, "wall_hours_left_by_runs": 140 / 60,
                          "unestimated": ["seed-0/dependency"]})
    assert "heal-checkpoint/heal-2: epoch 6 saved (10 min); about 50 wall min left (its finished training runs)" in text
    assert "about 2.3 wall hours by the finished training runs of stages no seed has finished, and 1 stages" in text


def test_kept_draws_of_an_unfinished_stage_count_as_finished_runs(tmp_path):
    """A random-layer draw that ended is kept as resume/draw-D.json (its rows, wall and CPU seconds) and its
    healing checkpoints are gone: status still counts it, as a finished run of its minutes, beside the draw
    that has epochs saved."""
    import json

    stage = tmp_path / "baseline-random-0123456789ab"
    (stage / "resume").mkdir(parents=True)
    rows = [{"row": "random", "training": None}, {"row": "random +heal", "training": {"epochs_run": 4}}]
    (stage / "resume" / "draw-0.json").write_text(json.dumps({"draw": 0, "rows": rows, "seconds": 1800.0,
                                                              "cpu_seconds": 3300.0}))
    (stage / "resume" / "draw-9.json").write_text("{not json")  # unreadable: not counted, not fatal
    data = cyclic_data(n_users=20)
    config = TrainConfig(epochs=4, batch_size=32, lr=1e-2, max_len=12, patience=4, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        train_recommender(tiny_model(n_items=data.n_items), data, config, progress=False,
                          checkpoint=stage / "heal-checkpoint" / "draw-1000" / "heal-1", stop=lambda epoch: epoch == 2)
    kept, begun = saved_runs(stage)
    assert kept == {"run": "resume/draw-0.json", "epoch": 4, "minutes": 30.0, "finished": True}
    assert begun["run"] == "heal-checkpoint/draw-1000/heal-1" and begun["epoch"] == 2 and not begun["finished"]
