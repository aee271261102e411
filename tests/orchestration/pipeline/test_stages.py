"""Resumable stages: done markers, and the finished stages of another run used in place (`reuse`)."""

import json

from orchestration.pipeline.stages import Stages


def test_a_done_stage_is_skipped_and_an_unfinished_one_runs_again(tmp_path):
    calls = []
    stages = Stages(tmp_path)
    out = stages.run("teacher", "k1", lambda out: calls.append(out) or (out / "model").write_text("weights"))
    assert (out / "_DONE").exists() and calls == [out]
    assert Stages(tmp_path).run("teacher", "k1", lambda out: calls.append(out)) == out and len(calls) == 1
    (tmp_path / "bench-k2").mkdir()  # started before, never finished: no marker
    again = Stages(tmp_path)
    again.run("bench", "k2", lambda out: calls.append(out) or False)  # outputs not final: not marked done
    assert len(calls) == 2 and not (tmp_path / "bench-k2" / "_DONE").exists() and again.ran == ["bench"]


def test_reuse_takes_another_runs_finished_stage_in_place_and_nothing_else(tmp_path):
    study, variant = tmp_path / "study", tmp_path / "variant"
    Stages(study).run("teacher", "k1", lambda out: (out / "model").write_text("weights"))
    (study / "ours-k2").mkdir()  # the other run's unfinished stage is not reused
    calls = []
    stages = Stages(variant, reuse=(tmp_path / "elsewhere", study))
    teacher = stages.run("teacher", "k1", lambda out: calls.append("teacher"))
    assert teacher == study / "teacher-k1" and (teacher / "model").read_text() == "weights"
    assert stages.skipped == ["teacher"] and not (variant / "teacher-k1").exists()
    ours = stages.run("ours", "k2", lambda out: calls.append("ours"))
    other = stages.run("teacher", "k3", lambda out: calls.append("teacher k3"))  # another key: runs here
    assert calls == ["ours", "teacher k3"]
    assert ours == variant / "ours-k2" and other == variant / "teacher-k3" and (other / "_DONE").exists()
    assert not (study / "ours-k2" / "_DONE").exists() and not (study / "teacher-k3").exists()


def test_an_unfinished_stages_resume_files_travel_in_the_archive_and_the_next_run_goes_on_from_them(tmp_path):
    """`layerwise study archive` carries an unfinished stage's small resume files (and nothing else of it);
    a study resumed from that archive on another machine starts the stage with them, while its finished
    stages are archived without theirs. Resume files too big to carry are left out."""
    import json

    from orchestration.pipeline.stages import RESUME
    from orchestration.study.archive import MAX_RESUME_BYTES, archive_study

    seed = tmp_path / "runs" / "study" / "seeds" / "seed-0"
    part = {"rows_done": 256, "totals": [[[0], 1.5]]}
    (seed / "dependency-k1" / RESUME).mkdir(parents=True)
    (seed / "dependency-k1" / RESUME / "removal_losses.json").write_text(json.dumps(part))
    (seed / "dependency-k1" / "scratch.bin").write_bytes(b"x" * 100)  # not resume state: never archived
    (seed / "bench-k2" / RESUME).mkdir(parents=True)  # too big to carry
    (seed / "bench-k2" / RESUME / "big.json").write_bytes(b"0" * (MAX_RESUME_BYTES + 1))
    def noise(out):  # a stage that kept resume files as it went, then finished
        (out / RESUME).mkdir()
        (out / RESUME / "part.json").write_text("{}")
        (out / "noise.json").write_text("[]")

    done = Stages(seed).run("noise", "k3", noise)
    archive = tmp_path / "archive"
    summary = archive_study(tmp_path / "runs" / "study", archive)
    assert summary["carried"] == ["seed-0/dependency-k1"] and summary["added"] == ["seed-0/noise-k3"]
    assert sorted(summary["unfinished"]) == ["seed-0/bench-k2", "seed-0/dependency-k1"]
    carried = archive / "seeds" / "seed-0" / "dependency-k1"
    assert sorted(p.relative_to(carried).as_posix() for p in carried.rglob("*")) == [RESUME, f"{RESUME}/removal_losses.json"]
    assert not (archive / "seeds" / "seed-0" / "bench-k2").exists()
    assert (archive / "seeds" / "seed-0" / done.name / "noise.json").exists()
    assert not (archive / "seeds" / "seed-0" / done.name / RESUME).exists()

    seen = []
    again = Stages(tmp_path / "elsewhere" / "seed-0", reuse=(archive / "seeds" / "seed-0",))
    assert not again.done("dependency", "k1")  # unfinished in the archive: it runs here
    out = again.run("dependency", "k1", lambda out: seen.append(json.loads((out / RESUME / "removal_losses.json").read_text())))
    assert seen == [part] and out == tmp_path / "elsewhere" / "seed-0" / "dependency-k1" and (out / "_DONE").exists()
    # The run went further: archiving it again replaces the carried progress with the finished stage.
    (seed / "dependency-k1" / RESUME / "removal_losses.json").write_text(json.dumps({**part, "rows_done": 512}))
    assert archive_study(tmp_path / "runs" / "study", archive)["carried"] == ["seed-0/dependency-k1"]
    assert json.loads((carried / RESUME / "removal_losses.json").read_text())["rows_done"] == 512


def test_a_compact_model_too_big_to_keep_is_archived_only_after_the_stages_that_read_it(tmp_path):
    """Our compact model stripped from the archive could not be made to the same bits on another machine, so
    the archive holds it back (with those of its readers that finished) until the stages that read its
    weights (noise; ours+int8 when the study runs it) have finished after it."""
    import json
    import os

    from layerwise.models.checkpoint import save_recommender
    from orchestration.study.archive import archive_study
    from tests.helpers.tiny_models import tiny_model

    run = tmp_path / "runs" / "study"
    seed = run / "seeds" / "seed-0"
    (run / "config.json").parent.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"baselines": ["mostpop", "ours+int8"], "ray": {}}))

    def finish(name: str, at: float) -> None:
        (seed / name).mkdir(parents=True, exist_ok=True)
        (seed / name / "rows.json").write_text("[]")
        (seed / name / "_DONE").write_text("")
        os.utime(seed / name / "_DONE", (at, at))

    save_recommender(tiny_model("llama", n_layers=2), seed / "ours-k1" / "model", {"kind": "compact"})
    finish("ours-k1", 1000.0)
    finish("baseline-mostpop-k2", 1001.0)
    finish("baseline-ours-int8-k3", 1002.0)
    (seed / "noise-k4").mkdir()  # started, not finished
    archive = tmp_path / "archive"
    first = archive_study(run, archive, max_weight_bytes=0)
    assert first["added"] == ["seed-0/baseline-mostpop-k2"]
    assert [h.split(" ")[0] for h in first["held"]] == ["seed-0/baseline-ours-int8-k3", "seed-0/ours-k1"]
    assert "have not read it yet" in first["held"][0] and "noise" in first["held"][0]
    # Kept whole (it fits), the model needs no readers first.
    assert "seed-0/ours-k1" in archive_study(run, tmp_path / "roomy", max_weight_bytes=2**30)["added"]
    # The noise curves finished after it: now it goes in, stripped, with both readers.
    finish("noise-k4", 1003.0)
    second = archive_study(run, archive, max_weight_bytes=0)
    assert sorted(second["added"]) == ["seed-0/baseline-ours-int8-k3", "seed-0/noise-k4", "seed-0/ours-k1"]
    assert second["held"] == [] and json.loads((archive / "seeds" / "seed-0" / "ours-k1" / "_archived.json").read_text())["stripped"] == ["model"]


def test_a_stage_records_the_machine_it_ran_on_and_the_runs_context(tmp_path):
    import json

    import torch

    out = Stages(tmp_path, context={"precision": {"teacher": "float32"}}).run("teacher", "k1", lambda out: None)
    timing = json.loads((out / "_seconds.json").read_text())
    assert timing["precision"] == {"teacher": "float32"} and timing["torch_threads"] == torch.get_num_threads()
    assert timing["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and timing["seconds"] >= 0


def test_each_stage_records_its_own_peak_memory(tmp_path):
    """A stage's peak RSS is its own: a stage that holds 400 MB records it, and the small stage after it in
    the same process does not inherit that peak."""
    import sys

    import numpy as np
    import pytest

    from orchestration.pipeline.stages import peak_rss_bytes, reset_peak_rss

    if not sys.platform.startswith("linux") or not reset_peak_rss():
        pytest.skip("the peak resident size is reset through Linux's /proc/self/clear_refs")

    def big(out):
        block = np.ones(400 * 2**20 // 8)  # written, so resident
        assert block.sum() > 0

    stages = Stages(tmp_path)
    baseline = peak_rss_bytes() / 2**30
    peaks = {name: json.loads((stages.run(name, "k", fn) / "_seconds.json").read_text())["peak_rss_gb"]
             for name, fn in (("big", big), ("small", lambda out: None))}
    assert peaks["big"] >= baseline + 0.35
    assert peaks["small"] < peaks["big"] - 0.3


def test_a_stage_finished_by_a_later_invocation_counts_the_time_of_the_stopped_ones(tmp_path):
    """A stage stopped midway (Ctrl-C) and finished by a later run on this machine records the time of both:
    the stopped one's work is kept in its checkpoints, so it is part of what the stage cost."""
    import time

    import pytest

    from orchestration.pipeline.stages import SPENT

    def busy(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    def stopped(out):
        busy(0.3)
        raise KeyboardInterrupt

    stages = Stages(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        stages.run("teacher", "k", stopped)
    # CPU times tick in hundredths here: 0.3 s of work may read 0.29
    assert json.loads((tmp_path / "teacher-k" / SPENT).read_text())["cpu_seconds"] >= 0.25
    out = Stages(tmp_path).run("teacher", "k", lambda out: busy(0.2))
    timing = json.loads((out / "_seconds.json").read_text())
    assert timing["stopped_invocations"] == 1 and not (out / SPENT).exists()
    assert timing["cpu_seconds"] >= 0.45 and timing["seconds"] >= 0.5
    assert 0.2 <= timing["last_invocation_seconds"] <= timing["seconds"] - 0.3
    once = json.loads((Stages(tmp_path / "other").run("teacher", "k", lambda out: None) / "_seconds.json").read_text())
    assert "stopped_invocations" not in once  # a stage done in one go is recorded as before


def test_a_stage_whose_process_was_killed_counts_its_time_to_the_last_heartbeat(tmp_path):
    """kill -9 (or Ray's shutdown of a seed task after a Ctrl-C) runs no handler: the RUNNING marker's
    heartbeat says what the killed invocation had spent, and the invocation that finishes the stage adds it."""
    import signal
    import subprocess
    import sys
    import time

    from orchestration.pipeline.stages import RUNNING, running_marker

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from orchestration.pipeline.stages import Stages\n"
        "stages = Stages(Path(sys.argv[1]))\n"
        "stages.heartbeat_s = 0.1\n"
        "def work(out):\n"
        "    while True:\n"
        "        sum(range(10000))\n"
        "stages.run('teacher', 'k', work)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    try:
        deadline = time.time() + 120
        while ((running_marker(tmp_path / "teacher-k") or {}).get("cpu_seconds") or 0.0) < 0.5:
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    beat = running_marker(tmp_path / "teacher-k")
    assert beat["seconds"] >= 0.5 and beat["pid"] == proc.pid
    out = Stages(tmp_path).run("teacher", "k", lambda out: None)
    timing = json.loads((out / "_seconds.json").read_text())
    assert timing["stopped_invocations"] == 1 and timing["seconds"] >= beat["seconds"]
    assert timing["cpu_seconds"] >= beat["cpu_seconds"] >= 0.5 and not (out / RUNNING).exists()


def test_archived_runs_merge_once_each_in_the_order_they_started(tmp_path):
    from orchestration.study.archive import merge_invocations

    there, here = tmp_path / "there.json", tmp_path / "here.json"
    there.write_text(json.dumps([{"started": "2026-12-02T07:13:20+0000", "seconds": 5241.4},
                                 {"started": "2026-12-05T10:00:00+0000", "seconds": None}]))
    here.write_text(json.dumps([{"started": "2026-12-05T10:00:00+0000", "seconds": 12.5},
                                {"started": "2026-12-01T09:00:00+0000", "seconds": 3.0}]))
    assert merge_invocations(there, here, tmp_path / "missing.json") == [
        {"started": "2026-12-01T09:00:00+0000", "seconds": 3.0},
        {"started": "2026-12-02T07:13:20+0000", "seconds": 5241.4},
        {"started": "2026-12-05T10:00:00+0000", "seconds": 12.5}]  # the timed note wins over the interrupted
