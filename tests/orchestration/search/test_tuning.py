"""`layerwise tune` for real: Ray Tune trials, Optuna (TPE / NSGA-II) in sqlite, MLflow in sqlite, and the
report, front, registry and champion a search leaves.

The same search command runs on each shipped family file with tiny overrides (a 4-layer, 32-wide teacher
trained by the command itself, 2 trials, 1 healing epoch). Ray Train + DeepSpeed healing inside a trial and a
search killed and resumed are in test_tuning_resilience.py, so that pytest-xdist runs them beside these.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import optuna
import pytest
from optuna.trial import TrialState

from layerwise.compression.compact import load_compact
from orchestration.distributed.specs import DataSpec
from orchestration.search.results import choose_champion, front_ids, pareto_front
from orchestration.search.space import load_space
from orchestration.search.tuning import _prepare_teacher, main, run_search
from tests.helpers.tuning import (DATA, ROOT, mlflow_client, report, study, timed_rows, tiny, trial_runs,
                                  valid_ndcg)

# Each family file once, covering both objectives, both speed metrics and a retention constraint.
FAMILY_RUNS = {  # file stem -> (objective, speed metric, --min-retention)
    "llama": ("pareto", "speedup", None),
    "qwen": ("single", "speedup", None),
    "bert": ("pareto", "latency_ms", None),
    "t5": ("single", "speedup", 0.5),
}
SAMPLES = 2

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=sorted(FAMILY_RUNS))
def family_search(request, ray_local, cache, tmp_path_factory):
    """(file stem, run dir, result.json, argv) of one `tune` command per shipped family file."""
    name = request.param
    run_dir = tmp_path_factory.mktemp(f"tune_{name}")
    objective, speed, minimum = FAMILY_RUNS[name]
    argv = [str(ROOT / "tune_spaces" / f"{name}.yaml"), *tiny(cache), "--samples", str(SAMPLES),
            "--run-dir", str(run_dir), "--objective", objective, "--speed-metric", speed,
            *(["--min-retention", str(minimum)] if minimum is not None else [])]
    assert main(argv) == 0
    return name, run_dir, json.loads((run_dir / "result.json").read_text()), argv


# --- the search, once per family file --------------------------------------------------------------------
@pytest.mark.slow
def test_every_trial_ran_and_optuna_got_every_metric(family_search):
    name, run_dir, result, _ = family_search
    rows = report(run_dir)["trials"]
    assert result["errors"] == 0 and len(rows) == SAMPLES
    trial_dirs = [p for p in (run_dir / "tune").iterdir() if p.is_dir()]
    assert len(trial_dirs) == SAMPLES
    for row in rows:
        assert 0 < row["retention"] < 3
        if row["speed_status"] == "ok":
            assert row["speedup"] > 0 and row["latency_ms"] > 0
            assert row["speedup_ci_low"] <= row["speedup"] <= row["speedup_ci_high"]
        else:  # timed while load disturbed it, even after re-measuring: no figure, and why
            assert row["speed_status"] == "disturbed" and row["speedup"] is None and row["latency_ms"] is None
            assert row["speed_disturbed_because"]
    timed = timed_rows(rows)
    completed = study(run_dir).get_trials(states=(TrialState.COMPLETE,))
    objective, speed, _ = FAMILY_RUNS[name]
    if objective == "pareto":  # both objectives reached Optuna as reported; a disturbed trial failed there
        assert sorted(tuple(t.values) for t in completed) == sorted((r["retention"], r[speed]) for r in timed)
    else:  # retention alone is searched: every trial completes
        assert sorted(t.value for t in completed) == sorted(r["retention"] for r in rows)
    for trial in completed:  # Optuna's parameters are the ones the trials ran with
        assert any(all(row["config"][k] == v for k, v in trial.params.items()) for row in rows)


@pytest.mark.slow
def test_trial_models_are_physically_smaller_and_score_what_they_reported(family_search, cache):
    _, run_dir, result, _ = family_search
    data = DataSpec(DATA, cache_dir=str(cache)).load()
    teacher_valid = valid_ndcg(result["teacher_dir"], data)
    assert teacher_valid == pytest.approx(result["teacher_valid_ndcg_at_10"], abs=1e-9)
    for row in report(run_dir)["trials"]:
        model = load_compact(row["model_dir"])
        assert model.n_layers == row["n_layers"] < 4 and model.kept == [int(i) for i in row["kept"].split(",")]
        assert Path(row["model_dir"]).parent.name == row["trial_id"]  # saved under the run dir, per trial
        assert valid_ndcg(row["model_dir"], data) == pytest.approx(row["valid_ndcg_at_10"], abs=1e-6)
        assert row["retention"] == pytest.approx(row["valid_ndcg_at_10"] / teacher_valid, rel=1e-9)
        suffixes = {p.suffix for p in Path(row["model_dir"]).rglob("*") if p.is_file()}
        assert suffixes == {".json", ".safetensors"}


@pytest.mark.slow
def test_trials_are_mlflow_children_of_the_search_run(family_search):
    _, run_dir, result, _ = family_search
    parent = json.loads((run_dir / "search.json").read_text())["parent_run_id"]
    runs = trial_runs(run_dir)
    rows = {r["trial_id"]: r for r in report(run_dir)["trials"]}
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(rows)
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
        assert run.data.metrics["retention"] == pytest.approx(rows[run.data.tags["trial_id"]]["retention"])
    artifacts = {a.path for a in mlflow_client(run_dir).list_artifacts(parent, "search")}
    assert artifacts == {"search/pareto.png", "search/trials.md", "search/trials.json"}


@pytest.mark.slow
def test_front_registry_and_champion(family_search):
    name, run_dir, result, _ = family_search
    data = report(run_dir)
    rows, front = data["trials"], data["front"]
    speed = data["speed_metric"]
    sign = 1 if speed == "speedup" else -1
    timed = timed_rows(rows)  # a trial timed disturbed is on no front
    expected = [timed[i]["trial_id"] for i in pareto_front([(r["retention"], sign * r[speed]) for r in timed])]
    assert sorted(front) == sorted(expected)  # Optuna's best_trials = the non-dominated trials
    client = mlflow_client(run_dir)
    versions = client.search_model_versions("name = 'layerwise-compact'")
    assert len(versions) == len(front) == len(result["versions"])
    for r in rows:  # the front re-checked: held-out retention, and timed again with nothing else running
        if r["front"] and r["alone_status"] == "disturbed":
            assert r["test_retention"] > 0 and r["alone_speedup"] is None and r["alone_disturbed_because"]
        elif r["front"]:
            low, high = r["alone_speedup_ci95"]
            assert r["test_retention"] > 0 and 0 < low <= r["alone_speedup"] <= high and r["alone_latency_ms"] > 0
        else:
            assert r["test_retention"] is None and r["alone_speedup"] is None and r["alone_latency_ms"] is None
    minimum = data["min_retention"]
    alone = f"alone_{speed}"  # the champion is chosen by the front's timing after the search, alone
    eligible = [r for r in rows if r["front"] and (minimum is None or r["retention"] >= minimum and r[alone])]
    if not eligible:
        assert data["champion"] is None and "Nothing was promoted" in result["message"]
        return
    best = (max(eligible, key=lambda r: r["retention"]) if minimum is None
            else max(eligible, key=lambda r: sign * r[alone]))
    assert data["champion"] == best["trial_id"]
    alias = client.get_model_version_by_alias("layerwise-compact", "champion")
    assert int(alias.version) == result["versions"][best["trial_id"]]


@pytest.mark.slow
def test_report_plot_and_table(family_search):
    _, run_dir, _, _ = family_search
    data = report(run_dir)
    image = matplotlib.image.imread(run_dir / "report" / "pareto.png")
    assert image.shape[0] >= 500 and image.shape[1] >= 900 and image.std() > 0.05  # drawn, not blank
    table = (run_dir / "report" / "trials.md").read_text().splitlines()
    lines = [line for line in table if line.startswith("| ") and not line.startswith("| trial")]
    assert len(lines) == SAMPLES
    assert sum(line.split("|")[2].strip() == "yes" for line in lines) == len(data["front"])  # the front column


@pytest.mark.slow
@pytest.mark.parametrize("family_search", ["llama"], indirect=True)  # the llama search again, not a new one
def test_rerun_redoes_nothing_and_an_unmet_constraint_promotes_nothing(family_search, capsys):
    _, run_dir, result, argv = family_search
    before = {r.info.run_id for r in trial_runs(run_dir)}
    alias = mlflow_client(run_dir).get_model_version_by_alias("layerwise-compact", "champion").version
    assert main([*argv, "--min-retention", "100"]) == 0
    out = capsys.readouterr().out
    assert "resuming the search" in out and "NO model meets retention >= 100.0" in out
    assert {r.info.run_id for r in trial_runs(run_dir)} == before  # no trial ran again
    again = json.loads((run_dir / "result.json").read_text())
    assert again["champion"] is None and again["versions"] == result["versions"]  # nothing re-registered
    client = mlflow_client(run_dir)
    assert len(client.search_model_versions("name = 'layerwise-compact'")) == len(result["versions"])
    assert client.get_model_version_by_alias("layerwise-compact", "champion").version == alias


# --- pure pieces -------------------------------------------------------------------------------------------
def test_pareto_front_keeps_exactly_the_non_dominated_points():
    points = [(0.9, 2.0), (0.95, 1.5), (0.8, 1.9), (0.95, 1.5), (1.0, 1.0), (0.7, 3.0), (0.6, 2.5)]
    assert pareto_front(points) == [0, 1, 3, 4, 5]  # equal points both stay; (0.8,1.9) and (0.6,2.5) go


def test_champion_is_the_fastest_model_meeting_the_constraint():
    rows = [{"trial_id": t, "retention": r, "speedup": s, "latency_ms": 10 / s, "alone_speedup": a, "n_layers": 2}
            for t, r, s, a in [("a", 0.99, 1.2, 1.1), ("b", 0.96, 2.0, 2.1), ("c", 0.90, 3.0, 3.0),
                               ("d", 0.97, 2.5, 1.9)]]
    front = ["a", "b", "c", "d"]
    assert choose_champion(rows, front, "speedup", 0.95)[0]["trial_id"] == "d"
    assert choose_champion(rows, front, "latency_ms", 0.95)[0]["trial_id"] == "d"
    assert choose_champion(rows, front, "alone_speedup", 0.95)[0]["trial_id"] == "b"  # timed alone, b wins
    assert choose_champion(rows, ["a", "b", "c"], "speedup", 0.95)[0]["trial_id"] == "b"  # only the front
    assert choose_champion(rows, front, "speedup", None)[0]["trial_id"] == "a"
    champion, message = choose_champion(rows, front, "speedup", 0.995)
    assert champion is None and "NO model meets retention >= 0.995" in message and "0.990" in message
    rows[1]["alone_speedup"] = None  # b's quiet timing stayed disturbed: d is the fastest timed one
    assert choose_champion(rows, front, "alone_speedup", 0.95)[0]["trial_id"] == "d"
    rows[0]["alone_speedup"] = rows[3]["alone_speedup"] = None  # every model reaching 0.95: no fastest known
    champion, message = choose_champion(rows, front, "alone_speedup", 0.95)
    assert champion is None and "timed disturbed" in message


def test_trials_a_killed_driver_left_running_are_closed_as_failed(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    live = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "maximize"])
    live.tell(live.ask(), [0.9, 2.0])
    live.ask()  # the driver dies here: this trial stays RUNNING in the database
    ids = front_ids([], {"speed_metric": "speedup", "study": "s", "objective": "pareto"}, tmp_path)
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL] and ids == []  # no Tune row matches: none listed


def test_bad_arguments_fail_before_anything_starts(tmp_path):
    space = str(ROOT / "tune_spaces" / "llama.yaml")
    with pytest.raises(ValueError, match="objective must be one of"):
        run_search(space, 2, "both", run_dir=tmp_path)
    with pytest.raises(ValueError, match="speed metric must be one of"):
        run_search(space, 2, "pareto", run_dir=tmp_path, speed_metric="throughput")
    with pytest.raises(ValueError, match=r"space\.lr: low"):
        run_search(space, 2, run_dir=tmp_path, overrides=["space.lr.low=0.1"])
    assert not (tmp_path / "search.json").exists()


def test_a_search_without_teacher_shows_the_teacher_training(cache, tmp_path, capfd):
    space = load_space(ROOT / "tune_spaces" / "llama.yaml", tiny(cache, "teacher.epochs=2"))
    data, teacher = _prepare_teacher(space, tmp_path, None)
    out, err = capfd.readouterr()
    assert "no --teacher given, training llama (4 layers, up to 2 epochs)" in out
    assert "train:" in err and "/6 [" in err  # the bar `layerwise train` shows: per step, 2 epochs of 3 steps
    assert f"saved to {tmp_path / 'teacher'}" in out and load_compact(teacher).n_layers == 4
