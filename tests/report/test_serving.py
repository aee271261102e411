"""The report's Serving section, read from a `layerwise bench-serve --sweep` JSON of the study's own models."""

from __future__ import annotations

import json

import pytest

from layerwise.report import write_report
from orchestration.cli.main import main
from orchestration.study.publish import serving_results


def level(concurrency: int, goodput: float, p50: float, p99: float) -> dict:
    """One level as `serve.sweep` writes it (the fields the report reads, and some it does not)."""
    return {"concurrency": concurrency, "seconds": 15.0, "requests": int(goodput * 15), "statuses": {"200": 1},
            "goodput_per_s": goodput, "answered_ms": {"p50": p50, "p99": p99, "max": p99},
            "refused_share": 0.0, "refused_ms": {"p50": None, "p99": None, "max": None},
            "refused_without_retry_after": 0, "timeouts": 0, "resets": 0, "other_failures": 0}


def sweep(root: str = "runs/study-x") -> dict:
    paired = {"rounds": [], "goodput_ratio": 0.95, "p99_ratio": 1.1,
              "met": {"goodput": True, "p99": True, "fast_503": True, "all": True}}
    return {"started": "2026-12-06T13:56:32", "dataset": "ml-100k", "cpus": 2,
            "settings": {"num_replicas": 1, "torch_threads": 1, "max_batch_size": 16, "max_queued_requests": 16,
                         "model_call": "loop", "retry_after_s": 1.0},
            "client": {"seconds": 15.0, "honor_retry_after": True},
            "models": [{"label": "compact", "model": f"{root}/seeds/seed-0/ours-abe6b1c53f66/model", "layers": 8,
                        "teacher_layers": 30, "overload": {"paired": paired},
                        "levels": [level(4, 18.0, 200, 280), level(8, 20.0, 400, 700)]},
                       {"label": "teacher", "model": f"{root}/seeds/seed-0/teacher-9f8750751933/model",
                        "layers": 30, "teacher_layers": 30,
                        "levels": [level(4, 4.5, 800, 1100), level(8, 5.0, 1800, 2600)]}]}


@pytest.fixture
def study_dir(tmp_path):
    root = tmp_path / "study-x"
    for stage in ("ours-abe6b1c53f66", "teacher-9f8750751933"):
        (root / "seeds" / "seed-0" / stage / "model").mkdir(parents=True)
    return root


def test_the_section_gives_each_level_and_the_ratio_to_the_teacher(study_dir, tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep()))
    entry = serving_results(path, study_dir)
    assert [m["stage"] for m in entry["models"]] == ["seed-0/ours-abe6b1c53f66", "seed-0/teacher-9f8750751933"]
    assert entry["models"][0]["paired"] == {"goodput_ratio": 0.95, "p99_ratio": 1.1, "met": True}
    paths = write_report({"serving": entry}, tmp_path / "report")
    md = paths["markdown"].read_text()
    section = md.split("## Serving")[1].split("## ")[0]
    assert "| 4 | 18.0 | 200 | 280 | 4.5 | 800 | 1100 | 4.00x |" in section  # 18.0 / 4.5
    assert "| 8 | 20.0 | 400 | 700 | 5.0 | 1800 | 2600 | 4.00x |" in section
    assert "4.00x to 4.00x the teacher's req/s" in section and "peaks 20.0 req/s (8 clients)" in section
    assert "compact 95% goodput, p99 1.10x (met)" in section
    assert "figures/serving.png" in section and paths["figures"]["serving"].stat().st_size > 0


def test_a_served_stage_finished_on_an_earlier_machine_is_found_in_the_archive_the_study_reuses(tmp_path,
                                                                                                monkeypatch):
    # The run folder holds only what this machine made; seed 0's ours lies in the archive its config reuses,
    # named as the YAML gave it (relative to the working directory).
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "study-x"
    (run / "seeds" / "seed-0" / "teacher-9f8750751933" / "model").mkdir(parents=True)
    (tmp_path / "archive" / "seeds" / "seed-0" / "ours-abe6b1c53f66" / "model").mkdir(parents=True)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep()))
    with pytest.raises(ValueError, match="'compact' .* is not a stage of the study in runs/study-x "):
        serving_results(path, "runs/study-x")  # no config.json: the run folder alone
    (run / "config.json").write_text(json.dumps({"name": "study-x", "reuse": ["archive"]}))
    entry = serving_results(path, "runs/study-x")
    assert [m["stage"] for m in entry["models"]] == ["seed-0/ours-abe6b1c53f66", "seed-0/teacher-9f8750751933"]
    (run / "config.json").write_text(json.dumps({"name": "study-x", "reuse": ["elsewhere"]}))
    with pytest.raises(ValueError, match="is not a stage of the study in runs/study-x or elsewhere"):
        serving_results(path, "runs/study-x")


def test_a_report_without_a_sweep_says_how_to_add_one(tmp_path):
    md = write_report({}, tmp_path)["markdown"].read_text()
    section = md.split("## Serving")[1].split("## ")[0]
    assert "Not available in this study." in section and "--serving SWEEP.json" in section


@pytest.mark.parametrize("broken, message", [
    ("{not json", "not JSON"),
    (json.dumps({"levels": []}), "no 'models' list"),
    (json.dumps({"models": [{"label": "compact", "layers": 8, "levels": []}]}), "lacks 'model'"),
    (json.dumps({**sweep(), "models": [{**sweep()["models"][0], "model": "runs/x/seeds/seed-0/ours-0000/model"}]}),
     "'compact' (runs/x/seeds/seed-0/ours-0000/model) is not a stage of the study"),
    (json.dumps({**sweep(), "models": [{**sweep()["models"][0], "model": "runs/serve-default/compact/model"}]}),
     "is not a stage of the study"),
])
def test_a_sweep_that_is_not_of_this_study_is_refused_by_name(study_dir, tmp_path, broken, message):
    path = tmp_path / "sweep.json"
    path.write_text(broken)
    with pytest.raises(ValueError, match="--serving .*sweep.json") as error:
        serving_results(path, study_dir)
    assert message in str(error.value)


def test_the_command_names_a_missing_sweep_and_leaves_the_published_study(tmp_path, capsys):
    out = tmp_path / "published"
    out.mkdir()
    (out / "report.md").write_text("kept")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    code = main(["study", "report", str(tmp_path / "run"), "--out", str(out), "--serving", str(tmp_path / "none.json")])
    assert code == 2 and "none.json: no such file" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "kept"
