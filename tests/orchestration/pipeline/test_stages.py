"""Resumable stages: done markers, and the finished stages of another run used in place (`reuse`)."""

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
