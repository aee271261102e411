"""`layerwise study` end to end at a tiny size: 2 seeds in parallel Ray tasks, a few baselines, one ablation
of each kind, the k sweep, noise and slices; the report holds every section; a rerun resumes everything."""

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from layerwise.data import LITERATURE_METRICS
from layerwise.report.document import MISSING, SECTIONS
from orchestration import tracking
from orchestration.cli.main import main
from orchestration.study.driver import run_study
from orchestration.study.config import load_study_config

SETTINGS = [
    "seeds=[0,1]", "data.dataset=synthetic:300:60:6000:0", "teacher.preset=tiny", "teacher.train.epochs=2",
    "compress.keep=0.5", "compress.calib_batches=2", "compress.heal.epochs=1", "compress.heal.prefit_steps=5",
    "compress.ablation_users=40",
    "baselines=[mostpop,first,int8,random]", "ablation=[heal,estimators,kd,prefit]", "extras_seeds=1", "sweep.selectors=[ours,random]",
    "sweep.heal_epochs=1", "noise.kinds=[drop,reorder]", "noise.levels=[0.0,0.2]", "scenarios.min_users=10",
    "ray.cpus_per_seed=0.5", "bench.runs=3", "bench.warmup=1", "bench.batch_sizes=[1,8]",
]


@pytest.fixture(scope="module")
def study(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    config = load_study_config(None, [*SETTINGS, f"run_dir={root}", f"data.cache_dir={root / 'cache'}"])
    results = run_study(config, progress=False)
    return config, root, results


@pytest.mark.slow
def test_report_has_every_section_filled(study):
    config, root, results = study
    text = (root / "study" / "report" / "report.md").read_text()
    html = (root / "study" / "report" / "report.html").read_text()
    for section in SECTIONS:
        assert f"## {section}" in text and section in html
        body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
        assert (MISSING in body) == (section == "Serving"), section  # a sweep is added at publication
    rivals = {r["slice"]: r for r in results["rivals"]["rows"] if r["rival"] == "random +heal"}
    everyone = rivals["all users"]  # ours against random layers healed alike on every test user, then by slice
    ours = next(r for r in results["baselines"]["rows"] if r["name"] == "ours")
    assert everyone["n"] == results["headline"]["test"]["n"]
    assert everyone["ours"] == pytest.approx(ours["metric"]["mean"])  # users and seeds weigh the same
    assert any(k.startswith("target_pop=") for k in rivals) and any(k.startswith("history_len=") for k in rivals)
    assert re.search(r"\d+ torch threads on \d+ CPUs, 1-minute load average [\d.]+ at its start", results["notes"][0])
    # INT8 is timed after the float models, in a benchmark of its own, and the notes say so with its guard.
    assert any(n.startswith("int8: timed after the float models") and "Bench guard:" in n for n in results["notes"])
    for figure in ("pareto", "k_sweep", "robustness", "slices", "importance", "dependency"):
        assert (root / "study" / "report" / "figures" / f"{figure}.png").stat().st_size > 1000


@pytest.mark.slow
def test_headline_and_p_values_against_each_baseline(study):
    config, root, results = study
    head = results["headline"]
    assert head["k"] == 1 and head["n_layers"] == 2 and head["seeds"]["n"] == 2
    low, high = head["retention"]["ci95"]
    assert low <= head["retention"]["mean"] <= high
    assert set(head["speedup"]) == {"batch=1", "batch=8"}
    rows = {r["name"]: r for r in results["baselines"]["rows"]}
    assert {"teacher", "ours", "mostpop", "first", "first +heal", "int8"} <= set(rows)
    for name, row in rows.items():
        if name != "ours":
            assert 0 <= row["p_value"] <= 1 and row["test"]["test"] == "ttest" and row["test"]["n"] == 2
    first = rows["first"]["speedup"]  # a speedup, or a timing the bench guard found disturbed: no figure
    assert first["mean"] > 0 if "status" not in first else first["mean"] is None and first["disturbed_because"]
    assert rows["mostpop"].get("speedup") is None
    # The per-seed means behind a row are the seed stages' own evaluations.
    seed_means = [json.loads(p.read_text())[0]["means"]["ndcg@10"]
                  for p in sorted((root / "study" / "seeds").glob("seed-*/ours-*/rows.json"))]
    assert rows["ours"]["metric"]["mean"] == pytest.approx(sum(seed_means) / 2)
    # Every method also has HR and NDCG at 5, 10 and 20 over seeds, in the report's baselines section.
    metrics = {r["name"]: r["values"] for r in results["baselines"]["metrics"]["rows"]}
    assert set(metrics) == set(rows) and set(LITERATURE_METRICS) <= set(metrics["ours"])
    assert metrics["ours"]["ndcg@10"]["mean"] == pytest.approx(rows["ours"]["metric"]["mean"])
    report = (root / "study" / "report" / "report.md").read_text()
    assert "| method | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | MRR |" in report


@pytest.mark.slow
def test_ablation_sweep_noise_and_slices(study):
    config, root, results = study
    ablation = {r["name"] for r in results["ablation"]["rows"]}
    assert {"ours, unhealed", "ours without the KD term", "combined (all estimators)"} <= ablation
    # No bridges by default, so pre-fitting is ablated on rank-16 bridges: they are there, and not pre-fitted.
    prefit = next(r for r in results["ablation"]["rows"] if r["name"] == "ours with rank-16 bridges, not pre-fitted")
    stage = next((root / "study" / "seeds" / "seed-0").glob("ablation-prefit-*"))
    row = json.loads((stage / "rows.json").read_text())[0]
    assert row["recipe"]["prefit_steps"] == 0 and row["recipe"]["bridge_rank"] == 16 and prefit["p_value"] is not None
    kd = json.loads(next((root / "study" / "seeds" / "seed-0").glob("ablation-kd-*/rows.json")).read_text())[0]
    assert kd["recipe"]["kd_weight"] == 0.0 and kd["recipe"]["prefit_steps"] > 0
    assert any(name.startswith("combined without ") for name in ablation)
    assert set(results["k_sweep"]["curves"]) == {"ours", "random"}
    assert results["k_sweep"]["curves"]["ours"]["k"] == [1]
    assert results["k_sweep"]["speedup"]["k"] == [1]  # the study's own k: ours, timed once
    # extras_seeds=1: only the first seed ran the ablation and the sweep, and their tables say so.
    assert results["ablation"]["seeds"] == results["k_sweep"]["seeds"] == [0]
    assert "one seed" in results["ablation"]["test"] and results["k_sweep"]["curves"]["ours"]["ci95"] is None
    assert not list((root / "study" / "seeds" / "seed-1").glob("ablation-*"))
    # Ablation and dependency evaluated 40 sampled validation users; beam needs the dependency on each seed.
    for path in (root / "study" / "seeds").glob("seed-*/importance-*/importance.json"):
        record = json.loads(path.read_text())
        assert record["ablation_users"] == 40 and len(record["dependency_loss"]) == 2
    # The report's heatmap is the first seed's dependency stage, which took beam's matrix as it was.
    [heatmap] = (root / "study" / "seeds").glob("seed-*/dependency-*/dependency.json")
    made = json.loads(next(heatmap.parent.parent.glob("importance-*/importance.json")).read_text())
    assert heatmap.parent.parent.name == "seed-0"
    assert json.loads(heatmap.read_text())["dependency_loss"] == made["dependency_loss"] == \
        results["importance"]["dependency"]
    assert not list((root / "study" / "seeds" / "seed-1").glob("sweep-*"))
    assert list((root / "study" / "seeds" / "seed-0").glob("sweep-*"))
    kinds = results["robustness"]["kinds"]
    assert set(kinds) == {"drop", "reorder"} and kinds["drop"]["levels"] == [0.0, 0.2]
    assert kinds["drop"]["teacher"]["mean"][0] == kinds["reorder"]["teacher"]["mean"][0]  # level 0 is clean
    assert len(results["scenarios"]["rows"]) >= 10


@pytest.mark.slow
def test_logged_to_mlflow_and_resumed_without_redoing_work(study):
    config, root, results = study
    client = MlflowClient(tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.info.status == "FINISHED" and "headline/retention" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "report", "tables"} <= names
    before = {p: p.stat().st_mtime for p in (root / "study" / "seeds").glob("seed-*/*/_DONE")}
    again = run_study(config, progress=False)  # every stage is done: nothing is trained again
    assert {p: p.stat().st_mtime for p in before} == before
    assert again["headline"]["compact"] == results["headline"]["compact"]
    runs = json.loads((root / "study" / "invocations.json").read_text())
    assert len(runs) == 2 and all(r["seconds"] > 0 for r in runs)
    protocol = again["protocol"]
    assert protocol["wall time (s)"] == pytest.approx(sum(r["seconds"] for r in runs), abs=0.2)
    assert protocol["invocations"] == 2  # both timed: no "(0 interrupted)" clause
    assert protocol["stage time summed over seeds (s)"] == results["protocol"]["stage time summed over seeds (s)"] > 0
    mlflow.set_tracking_uri(tracking.tracking_uri(root))  # leave a valid URI for the next module


@pytest.mark.slow
def test_an_importance_stage_stopped_midway_makes_only_the_estimators_it_lacks(study, tmp_path):
    """Each estimator's scores are kept under resume/ as they are made: a rerun of the stage (here, or from
    an archive that carried them) reads those and makes the rest, which come out as the first run's."""
    from layerwise.compression.compact import load_compact
    from layerwise.data import load_dataset
    from orchestration.pipeline.stages import RESUME
    from orchestration.study.seed import SeedRun

    config, root, _ = study
    made = next((root / "study" / "seeds" / "seed-0").glob("importance-*"))
    first = json.loads((made / "importance.json").read_text())
    assert sorted(p.name for p in (made / RESUME).iterdir()) == [
        "importance-ablation.cpu.json", "importance-ablation.json", "importance-ablation_loss.cpu.json",
        "importance-ablation_loss.json", "importance-local.cpu.json", "importance-local.json",
        "removal_losses.json"]  # beam: the dependency matrix too, its sums kept as it went
    # Each part's CPU seconds, for the equal-compute view; beam's dependency matrix is not timed apart.
    assert all(first["cpu_seconds"][p] > 0 for p in ("local", "ablation", "ablation_loss"))
    assert first["cpu_seconds"]["dependency"] is None
    run = SeedRun(config, 0, tmp_path, load_dataset(config.data.dataset, cache_dir=config.data.cache_dir))
    run.teacher = load_compact(next(made.parent.glob("teacher-*")) / "model").eval().requires_grad_(False)
    out = tmp_path / "importance-again"
    marked = [7.0] * first["n_layers"]  # not what the estimator gives: read, not made again
    (out / RESUME).mkdir(parents=True)
    (out / RESUME / "importance-ablation.json").write_text(json.dumps({"ablation": marked}))
    run._importance(out)
    again = json.loads((out / "importance.json").read_text())
    assert again["scores"]["ablation"] == marked
    assert again["scores"] == {**first["scores"], "ablation": marked}
    assert again["cpu_seconds"]["ablation"] is None and again["cpu_seconds"]["local"] > 0  # made before: untimed
    assert again["dependency_loss"] == first["dependency_loss"]


@pytest.mark.slow
def test_a_random_baseline_stopped_between_draws_makes_only_the_draws_it_lacks(study, tmp_path, monkeypatch):
    """Each random-layer draw is kept under resume/ with its per-user tables once made: a rerun of the stage
    (here, or from an archive that carried them) reads the kept draws and heals only the others."""
    from layerwise.baselines.budget import n_parameters
    from layerwise.compression.compact import load_compact
    from layerwise.data import load_dataset
    from orchestration.baselines import method
    from orchestration.pipeline.stages import RESUME
    from orchestration.study.seed import SeedRun

    config, root, _ = study
    made = next((root / "study" / "seeds" / "seed-0").glob("baseline-random-*"))
    first = json.loads((made / "rows.json").read_text())
    draws = sorted({row["draw"] for row in first})
    assert len(draws) == config.random_draws == 3
    assert sorted(p.name for p in (made / RESUME).glob("draw-*.json")) == sorted(f"draw-{d}.json" for d in draws)
    assert not (made / "heal-checkpoint").exists()  # every draw's healing checkpoints went with the stage
    # A stage stopped after its first two draws, carried to another folder (another machine) without eval/.
    out = tmp_path / made.name
    (out / RESUME / "eval").mkdir(parents=True)
    for draw in draws[:2]:
        kept = json.loads((made / RESUME / f"draw-{draw}.json").read_text())
        for row in kept["rows"]:
            row["means"] = {**row["means"], "ndcg@10": -1.0}  # not what healing gives: read, not made again
            shutil.copyfile(made / RESUME / row["per_user"], out / RESUME / row["per_user"])
        (out / RESUME / f"draw-{draw}.json").write_text(json.dumps(kept))
    run = SeedRun(config, 0, tmp_path, load_dataset(config.data.dataset, cache_dir=config.data.cache_dir))
    run.dirs["teacher"] = next(made.parent.glob("teacher-*"))
    run.teacher = load_compact(run.dirs["teacher"] / "model").eval().requires_grad_(False)
    ours = next(made.parent.glob("ours-*")) / "model"
    run.k, run.compact = load_compact(ours, architecture_only=True).n_layers, None
    run.compact_parameters = n_parameters(load_compact(ours, architecture_only=True))
    healed = []
    real = method.run_method
    monkeypatch.setattr(method, "run_method", lambda name, data, teacher, budget, *rest: (
        healed.append(budget.seeds), real(name, data, teacher, budget, *rest))[1])
    run.baseline_stage("random")(out)

    assert healed == [(draws[2],)]
    again = json.loads((out / "rows.json").read_text())
    assert [(r["row"], r["draw"], r["kept"], r["per_user"]) for r in again] == [
        (r["row"], r["draw"], r["kept"], r["per_user"]) for r in first]
    assert [r["means"]["ndcg@10"] for r in again[:4]] == [-1.0] * 4
    assert all((out / r["per_user"]).exists() for r in again)
    # Seed 0 times one model of the architecture: the kept draws' was saved elsewhere, the new one's here.
    assert {r["timing_model"] for r in again} == {"timing/random"}
    assert (out / "timing" / "random" / "manifest.json").exists()
    assert not list((out / "heal-checkpoint").rglob("epoch-*"))


@pytest.mark.slow
def test_a_variant_reuses_the_studys_teachers_and_runs_only_what_it_changes(study, monkeypatch):
    config, root, results = study
    monkeypatch.chdir(root)  # the reused folder named relative to where the study runs, as a YAML names it
    variant = load_study_config(None, [*SETTINGS, f"run_dir={root}", f"data.cache_dir={root / 'cache'}",
                                       "name=variant", "reuse=[study]", "compress.heal.lr=0.0005",
                                       "baselines=[mostpop]", "ablation=[]", "sweep.selectors=[]"])
    before = {p: p.stat().st_mtime for p in (root / "study" / "seeds").glob("seed-*/*/_DONE")}
    again = run_study(variant, progress=False)
    assert {p: p.stat().st_mtime for p in before} == before  # the study's own stages are untouched
    for seed in (0, 1):
        mine = {p.name.rsplit("-", 1)[0] for p in (root / "variant" / "seeds" / f"seed-{seed}").iterdir()}
        assert mine == {"ours", "baseline-mostpop", "noise"}  # teacher and importance: the study's
    # The same teachers, so the same teacher rows; our model was healed again with the other rate.
    assert again["headline"]["teacher"] == results["headline"]["teacher"]
    ours = {study: next((root / study / "seeds" / "seed-0").glob("ours-*")).name for study in ("study", "variant")}
    assert ours["study"] != ours["variant"]  # another key: the healing config is part of it
    recorded = json.loads((root / "variant" / "config.json").read_text())
    assert recorded["compress"]["heal"]["lr"] == 0.0005 and recorded["reuse"] == ["study"]  # no machine's paths
    with pytest.raises(ValueError, match="reuse: .* not a study's run folder"):
        load_study_config(None, [f"reuse=[{root / 'nothing'}]"])


@pytest.mark.slow
def test_an_archived_study_resumes_on_another_machine_without_its_weights(study, tmp_path, capsys):
    """An archive kept without any weights (--max-weight-mb 0, as for models too big to commit): a study
    resumed from it (its own run folder gone) runs no archived stage again unless a stage still to run needs
    the teacher and our model, which then come out with the archived digests; a teacher that comes out
    otherwise stops the study before anything reads it."""
    from layerwise.models.checkpoint import weight_digests
    from orchestration.pipeline.stages import ArchiveMismatch

    config, root, results = study
    archive = tmp_path / "archive"
    assert main(["study", "archive", str(root / "study"), "--out", str(archive), "--max-weight-mb", "0"]) == 0
    assert "archived" in capsys.readouterr().out
    assert not list(archive.rglob("*.safetensors")) and not list(archive.rglob("*-checkpoint"))
    teacher = next((archive / "seeds" / "seed-0").glob("teacher-*"))
    original = next((root / "study" / "seeds" / "seed-0").glob("teacher-*"))
    assert weight_digests(teacher / "model") == weight_digests(original / "model")
    assert sum(f.stat().st_size for f in archive.rglob("*") if f.is_file()) < 2 * 2**20
    again = archive_study_again(archive, root, max_weight_bytes=0)
    assert again["added"] == again["filled"] == []  # stages already archived are kept as they are
    from orchestration.study.archive import environment_differences

    made_on = json.loads((archive / "environment.json").read_text())
    assert environment_differences(archive) == {} and {"torch", "cpu_kernels", "torch_threads"} <= set(made_on)
    assert environment_differences(archive, threads=2) == {"torch_threads": (1, 2)}
    other = "AVX512" if made_on["cpu_kernels"] == "AVX2" else "AVX2"  # not this machine's, whichever it is
    (archive / "environment.json").write_text(json.dumps({**made_on, "cpu_kernels": other}))
    assert environment_differences(archive) == {"cpu_kernels": (other, made_on["cpu_kernels"])}

    moved = [*SETTINGS, f"run_dir={tmp_path}", f"data.cache_dir={root / 'cache'}", f"reuse=[{archive}]"]
    again = run_study(load_study_config(None, [*moved, "name=resumed"]), progress=False)
    assert not list((tmp_path / "resumed" / "seeds").glob("seed-*/*"))  # nothing ran again
    assert f"archived on another kind of machine (cpu_kernels: {other} there" in capsys.readouterr().err
    assert again["headline"]["compact"] == results["headline"]["compact"]
    assert again["baselines"]["rows"] == results["baselines"]["rows"] or _same_rows(again, results)
    # The timing travels with the archive when it was final (a disturbed one is timed again there).
    timed_there = list(archive.glob("speed-*/_DONE"))
    assert bool(list((tmp_path / "resumed").glob("speed-*"))) != bool(timed_there)
    if timed_there:
        assert again["headline"]["speedup"] == results["headline"]["speedup"]
        assert json.loads((archive / "invocations.json").read_text()) == json.loads(
            (root / "study" / "invocations.json").read_text())
    else:
        speed = json.loads(next((tmp_path / "resumed").glob("speed-*/speed.json")).read_text())
        assert {"teacher", "ours"} <= set(speed["sources"])  # timed from the archive: the architectures
    runs = json.loads((tmp_path / "resumed" / "invocations.json").read_text())
    assert len(runs) == len(json.loads((root / "study" / "invocations.json").read_text())) + 1  # theirs, then this

    # A baseline and an ablation the archive lacks need the teacher: it is trained again (once, by the seed's
    # first task, before its baselines and extras run side by side) and matches. They need only our model's
    # parameter count, which its architecture gives: it is not trained again.
    grown = run_study(load_study_config(None, [*moved, "name=grown", "baselines=[mostpop,first,int8,last]",
                                               "ablation=[heal,estimators,kd,prefit,hidden]"]), progress=False)
    for seed, extra in ((0, {"ablation-hidden"}), (1, set())):
        mine = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "grown" / "seeds" / f"seed-{seed}").iterdir()}
        assert mine == {"teacher", "baseline-last"} | extra
    speed = json.loads(next((tmp_path / "grown").glob("speed-*/speed.json")).read_text())  # other rows: timed
    assert "architecture only" in speed["sources"]["ours"]  # from the archive: the architecture, fresh values
    assert grown["headline"]["compact"] == results["headline"]["compact"]
    # Quantizing our model reads its weights: it is made again (and matches), and that stage runs right after
    # it, before the other baselines (an LLM's compact model is too big to archive: its readers must finish on
    # the machine that made it).
    quantized = run_study(load_study_config(None, [*moved, "name=quantized", "seeds=[0]",  # one seed: enough
                                                   "baselines=[mostpop,first,int8,last,ours+int8]"]), progress=False)
    folder = tmp_path / "quantized" / "seeds" / "seed-0"
    order = sorted(folder.iterdir(), key=lambda p: (p / "_DONE").stat().st_mtime)
    assert [p.name.rsplit("-", 1)[0] for p in order] == ["teacher", "ours", "baseline-ours-int8", "baseline-last"]
    names = [row["name"] for row in quantized["baselines"]["rows"]]
    assert names.index("last") < names.index("ours+int8")  # the report keeps the configured order

    # Trained with other CPU kernels (portable numerics: torch's and MKL's AVX2 paths), the teacher is
    # another one: the study says so at its start and stops once that teacher is trained. (Its epochs' mean
    # losses came out the same here, to the last bit: only the weights tell.)
    with pytest.raises(Exception, match="differs from the archived one"):
        run_study(load_study_config(None, [*moved, "name=portable", "baselines=[mostpop,first,int8,last]",
                                           "ray.portable_numerics=true"]), progress=False)
    assert f"cpu_kernels: {other} there, portable (AVX2) here" in capsys.readouterr().err
    # The archived teacher's digest altered: the teacher made again no longer matches, and the study stops.
    listed = teacher / "model" / "weights.json"
    entries = json.loads(listed.read_text())
    entries["recommender.safetensors"]["sha256"] = "0" * 64
    listed.write_text(json.dumps(entries))
    with pytest.raises(Exception, match="differs from the archived one") as failure:
        run_study(load_study_config(None, [*moved, "name=mismatch", "baselines=[mostpop,first,int8,last]"]),
                  progress=False)
    assert isinstance(failure.value, ArchiveMismatch) or "ArchiveMismatch" in str(failure.value)
    assert not list((tmp_path / "mismatch" / "seeds" / "seed-0").glob("teacher-*/_DONE"))

    # An epoch whose loss is not the archived training's stops the teacher there, before it is saved (a
    # Beauty teacher on another CPU differed in epoch 1's loss, 40 minutes before its digests could).
    manifest = json.loads((teacher / "model" / "manifest.json").read_text())
    manifest["history"][0]["loss"] += 1e-9
    (teacher / "model" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="epoch 1 ended at loss .* here, .* there"):
        run_study(load_study_config(None, [*moved, "name=early", "baselines=[mostpop,first,int8,last]"]),
                  progress=False)
    assert not list((tmp_path / "early" / "seeds" / "seed-0").glob("teacher-*/model"))  # seed 1 matched


@pytest.mark.slow
def test_status_says_what_is_finished_where_and_what_remains(study, tmp_path, capsys):
    """`layerwise study status` runs nothing: a finished study is all done, with each stage's time; resumed
    from its archive, all reused; grown by a baseline, that baseline is pending on each seed, without an
    estimate (no seed has run it); a stage folder without its marker is started, estimated by the others."""
    from orchestration.study.archive import archive_study
    from orchestration.study.status import study_status

    _, root, _ = study
    settings = [*SETTINGS, f"run_dir={root}", f"data.cache_dir={root / 'cache'}"]
    assert main(["study", "status", *settings, "--json", str(tmp_path / "status.json")]) == 0
    done = json.loads((tmp_path / "status.json").read_text())
    assert done["counts"] == {"done": len(done["stages"]), "reused": 0, "started": 0, "pending": 0}
    assert all(row["seconds"] > 0 and row["cpu_seconds"] is not None for row in done["stages"])
    assert all(row["peak_rss_gb"] > 0.1 for row in done["stages"])  # each seed task holds torch, its data, ...
    names = [row["stage"] for row in done["stages"] if row["seed"] == 0]
    assert names[:4] == ["teacher", "importance", "ours", "baseline-mostpop"] and "sweep-random-k1" in names
    assert "ablation-heal" not in {row["stage"] for row in done["stages"] if row["seed"] == 1}  # extras_seeds=1
    printed = capsys.readouterr().out
    assert f"{len(done['stages'])} of {len(done['stages'])} stages finished" in printed
    assert re.search(r"teacher +done +[0-9.]+ min \(CPU [0-9.]+ min\), peak RSS [0-9.]+ GB", printed)

    archive_study(root / "study", tmp_path / "archive")
    moved = [*SETTINGS, f"run_dir={tmp_path}", f"data.cache_dir={root / 'cache'}", f"reuse=[{tmp_path / 'archive'}]"]
    grown = study_status(load_study_config(None, [*moved, "name=resumed", "baselines=[mostpop,first,int8,last]"]))
    states = {(row["seed"], row["stage"]): row["state"] for row in grown["stages"]}
    assert states.pop((0, "baseline-last")) == states.pop((1, "baseline-last")) == "pending"
    assert set(states.values()) == {"reused"}
    assert sorted(grown["unestimated"]) == ["seed-0/baseline-last", "seed-1/baseline-last"]

    first = Path(next(row for row in done["stages"] if row["seed"] == 1 and row["stage"] == "baseline-first")["folder"])
    shutil.rmtree(tmp_path / "archive" / "seeds" / "seed-1" / first.name)  # the archive lacks it: started here
    (tmp_path / "resumed" / "seeds" / "seed-1" / first.name).mkdir(parents=True)
    started = study_status(load_study_config(None, [*moved, "name=resumed"]))
    row = next(r for r in started["stages"] if r["seed"] == 1 and r["stage"] == "baseline-first")
    assert row["state"] == "started" and row["seconds"] is None
    other = next(r for r in done["stages"] if r["seed"] == 0 and r["stage"] == "baseline-first")
    assert row["cpu_seconds_estimate"] == pytest.approx(other["cpu_seconds"])
    assert started["cpu_hours_left"] == pytest.approx(other["cpu_seconds"] / 3600)


@pytest.mark.slow
def test_status_rows_give_each_finished_row_and_ours_against_it_seed_by_seed(study, tmp_path, capsys):
    """`layerwise study status --rows`: every finished stage's rows per seed, read from their folders (draws
    averaged), ours against each on that seed's users; a stage not finished gives a name, never a number."""
    from scipy.stats import wilcoxon

    _, root, _ = study
    grown = [*SETTINGS, f"run_dir={root}", f"data.cache_dir={root / 'cache'}",
             "baselines=[mostpop,first,int8,random,last]"]  # `last` never ran: pending on both seeds
    assert main(["study", "status", *grown, "--rows", "--json", str(tmp_path / "status.json")]) == 0
    interim = json.loads((tmp_path / "status.json").read_text())["rows"]
    assert [block["seed"] for block in interim["seeds"]] == [0, 1]
    seed_dir = root / "study" / "seeds" / "seed-1"
    ours_stage, random_stage = next(seed_dir.glob("ours-*")), next(seed_dir.glob("baseline-random-*"))
    block = interim["seeds"][1]
    assert block["not_finished"] == ["baseline-last"]
    entries = {e["row"]: e for e in block["rows"]}
    assert "ablation" not in {e["stage"] for e in block["rows"]}  # extras ran on seed 0 only
    ours = pq.read_table(ours_stage / "eval" / "ours.parquet").column("ndcg@10").to_numpy()
    healed = [r for r in json.loads((random_stage / "rows.json").read_text()) if r["row"] == "random +heal"]
    assert len(healed) == 3 and entries["random +heal"]["draws"] == 3
    assert entries["random +heal"]["value"] == pytest.approx(np.mean([r["means"]["ndcg@10"] for r in healed]))
    drawn = np.mean([pq.read_table(random_stage / r["per_user"]).column("ndcg@10").to_numpy() for r in healed], 0)
    against = entries["random +heal"]["vs_ours"]
    assert against["ratio"] == pytest.approx(ours.mean() / drawn.mean())
    assert against["ci95"][0] <= against["ratio"] <= against["ci95"][1]
    assert against["p_value"] == pytest.approx(wilcoxon(ours, drawn).pvalue) and against["n"] == len(ours)
    teacher = entries["teacher"]["value"]
    assert entries["ours"]["retention"] == pytest.approx(ours.mean() / teacher) and entries["ours"]["vs_ours"] is None
    printed = capsys.readouterr().out
    assert "Interim: each seed alone, p unadjusted" in printed and "not finished: baseline-last" in printed
    assert re.search(r"random \+heal +[0-9.]+ \(mean of 3 draws\); [0-9.]+% of the teacher; ours [0-9.]+% "
                     r"\[[0-9.]+%, [0-9.]+%\] of it, Wilcoxon p = ", printed)


def archive_study_again(archive, root, **options):
    from orchestration.study.archive import archive_study

    return archive_study(root / "study", archive, **options)


@pytest.mark.slow
def test_an_archive_keeps_the_weights_later_stages_build_on(study, tmp_path, capsys):
    """By default the archive keeps the teacher's and our model's weights (the stages still to run load
    them) and strips the rest: a study resumed from it, grown by a baseline, trains neither again, on any
    machine. An archive made without them gets them from a run whose weights have its digests, and refuses
    a run whose weights differ."""
    from layerwise.compression.compact import load_compact
    from layerwise.models.checkpoint import weight_digests
    from orchestration.study.archive import archive_study, stripped_needed

    config, root, results = study
    archive = tmp_path / "archive"
    assert main(["study", "archive", str(root / "study"), "--out", str(archive)]) == 0
    whole = sorted(p.relative_to(archive / "seeds").parts[:2] for p in archive.rglob("recommender.safetensors"))
    assert [(seed, stage.rsplit("-", 1)[0]) for seed, stage in whole] == [
        ("seed-0", "ours"), ("seed-0", "teacher"), ("seed-1", "ours"), ("seed-1", "teacher")]
    assert stripped_needed(archive) == [] and not list(archive.rglob("*-checkpoint"))
    made_on = json.loads((archive / "environment.json").read_text())
    (archive / "environment.json").write_text(json.dumps({**made_on, "cpu": "another CPU"}))
    capsys.readouterr()

    moved = [*SETTINGS, f"run_dir={tmp_path}", f"data.cache_dir={root / 'cache'}", f"reuse=[{archive}]"]
    grown = run_study(load_study_config(None, [*moved, "name=grown", "baselines=[mostpop,first,int8,last]"]),
                      progress=False)
    for seed in (0, 1):
        mine = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "grown" / "seeds" / f"seed-{seed}").iterdir()}
        assert mine == {"baseline-last"}  # the teacher and our model were read from the archive
    assert grown["headline"]["compact"] == results["headline"]["compact"]
    assert "archived on another kind of machine" not in capsys.readouterr().err  # nothing to train again

    bare = tmp_path / "bare"
    archive_study(root / "study", bare, max_weight_bytes=0)
    assert len(stripped_needed(bare)) == 4  # two seeds' teacher and our model
    filled = archive_study(root / "study", bare)
    assert len(filled["filled"]) == 4 and filled["added"] == [] and stripped_needed(bare) == []
    for seed, stage in whole:
        model = bare / "seeds" / seed / stage / "model"
        assert weight_digests(model) == weight_digests(archive / "seeds" / seed / stage / "model")
        assert not (model / "weights.json").exists() and load_compact(model).n_layers >= 1

    other = tmp_path / "other"
    archive_study(root / "study", other, max_weight_bytes=0)
    listed = next((other / "seeds" / "seed-0").glob("teacher-*")) / "model" / "weights.json"
    entries = json.loads(listed.read_text())
    entries["recommender.safetensors"]["sha256"] = "0" * 64
    listed.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="other weights than the archived"):
        archive_study(root / "study", other)


def _same_rows(a, b):
    strip = lambda rows: [{k: v for k, v in r.items() if k != "speedup"} for r in rows]  # noqa: E731
    return strip(a["baselines"]["rows"]) == strip(b["baselines"]["rows"])


@pytest.mark.slow
def test_a_finished_study_is_published_small_and_complete(study, tmp_path, capsys):
    config, root, _ = study
    out = tmp_path / "results" / "tiny"
    assert main(["study", "report", str(root / "study"), "--out", str(out)]) == 0
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    figures = {f"figures/{name}.png" for name in ("pareto", "k_sweep", "equal_compute", "robustness", "slices",
                                                  "importance", "dependency")}
    assert files == {"report.md", "report.html", "summary.json", *figures}  # no weights, no per-user tables
    assert sum((out / f).stat().st_size for f in files) < 2 * 2**20
    # Regenerated from the run folder alone, the report reads exactly as the study's own.
    results = json.loads((root / "study" / "results.json").read_text())
    assert (out / "report.md").read_text() == (root / "study" / "report" / "report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["headline"] == results["headline"] and summary["protocol"] == results["protocol"]
    assert set(summary["tables"]) == {"baselines", "ablation", "k_sweep", "robustness", "scenarios", "rivals",
                                      "importance"}
    for table in ("baselines", "ablation", "scenarios"):
        assert summary["tables"][table]["rows"] == results[table]["rows"] and summary["tables"][table]["rows"]
    assert summary["config"]["seeds"] == [0, 1] and summary["invocations"][0]["seconds"] > 0
    assert "figures/pareto.png" in (out / "report.html").read_text()
    assert main(["study", "report", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "holds no results.json" in capsys.readouterr().err and (out / "summary.json").exists()  # kept
    assert "Every stage of the plan (the config of the study's last run) has finished." in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_study_published_against_a_larger_plan_names_what_has_not_run(study, tmp_path, capsys):
    """Published while its plan has stages still to run (here an ablation component and a selector the study
    never ran), the report names each one and leaves it without a figure: in its own section, as a line of
    the ablation section and as "not finished" cells of the k sweep."""
    _, root, results = study
    out, n = tmp_path / "grown", results["headline"]["n_layers"]
    plan = [*SETTINGS, f"run_dir={root}", f"data.cache_dir={root / 'cache'}", "ablation=[heal,estimators,kd,prefit,hidden]",
            "sweep.selectors=[ours,random,uniform]"]
    noise = next((root / "study" / "seeds" / "seed-1").glob("noise-*")) / "_DONE"
    made = noise.stat().st_mtime
    os.utime(noise, (made, (root / "study" / "results.json").stat().st_mtime + 60))  # as if it finished later
    try:
        assert main(["study", "report", str(root / "study"), "--out", str(out), "--plan", *plan]) == 0
    finally:
        os.utime(noise, (made, made))
    left = json.loads((out / "summary.json").read_text())["unfinished"]
    assert left["finished_after"] == ["seed-1/noise"]
    expected = [(0, "ablation-hidden"), *((0, f"sweep-uniform-k{k}") for k in range(1, n))]
    assert [(s["seed"], s["stage"]) for s in left["stages"]] == expected
    assert {s["state"] for s in left["stages"]} == {"pending"}
    assert left["ablation"] == ["hidden"] and left["k_sweep"] == {"uniform": list(range(1, n))}
    md = (out / "report.md").read_text()
    section = {name: md.split(f"## {name}", 1)[1].split("\n## ", 1)[0] for name in ("Not finished", "Ablation", "k sweep")}
    assert "| 0 | ablation-hidden | pending |" in section["Not finished"] and "seeds=[0,1]" in section["Not finished"]
    assert "Not finished: hidden." in section["Ablation"]
    cells = [[c.strip() for c in line.strip("| ").split("|")] for line in section["k sweep"].splitlines()
             if re.match(r"\| \d+ \|", line)]  # k, ours, random, uniform, the speedups
    assert len(cells) == n - 1 and all(row[3] == "not finished" and "%" in row[1] + row[2] for row in cells)
    assert main(["study", "report", str(root / "study"), "--out", str(out), "--plan", *plan, "name=other"]) == 2
    assert "plans the study 'other', not 'study'" in capsys.readouterr().err


def test_a_saved_teacher_is_loaded_not_trained_again(tmp_path):
    """A seed stopped after its teacher was saved (its epoch checkpoint is gone by then) but before the stage
    ended loads that teacher on the rerun instead of training it again."""
    import torch

    from layerwise.data import load_dataset
    from orchestration.study.teacher import train_teacher

    config = load_study_config(None, ["seeds=[0]", "data.dataset=synthetic:200:40:3000:0", "teacher.preset=tiny",
                                      "teacher.train.epochs=2", f"data.cache_dir={tmp_path / 'cache'}"])
    data = load_dataset(config.data.dataset, cache_dir=config.data.cache_dir)
    path = tmp_path / "seed-0" / "teacher" / "model"
    args = (config.teacher, data, config.data.dataset, 0, config.data.max_len, path)
    model, result = train_teacher(*args)
    written = (path / "recommender.safetensors").stat().st_mtime_ns
    again, record = train_teacher(*args)
    assert (path / "recommender.safetensors").stat().st_mtime_ns == written  # not trained, not saved again
    assert (record.best_epoch, record.history, record.epochs_run) == (result.best_epoch, result.history, 2)
    histories = data.padded_histories(list(range(8)), "test", config.data.max_len)
    assert torch.allclose(again.score(histories), model.score(histories), atol=1e-5)


def test_bad_study_configs_name_the_key():
    with pytest.raises(ValueError, match="baselines: unknown"):
        load_study_config(None, ["baselines=[nope]"])
    with pytest.raises(ValueError, match="ablation: unknown"):
        load_study_config(None, ["ablation=[bridges,wings]"])
    with pytest.raises(ValueError, match="seeds must be distinct"):
        load_study_config(None, ["seeds=[1,1]"])
    with pytest.raises(ValueError, match="noise.levels"):
        load_study_config(None, ["noise.levels=[0.0,1.5]"])
    with pytest.raises(ValueError, match="unknown config key"):
        load_study_config(None, ["sweep.selector=[ours]"])
    with pytest.raises(ValueError, match="sweep.selectors"):
        load_study_config(None, ["sweep.selectors=[ours,best]"])
    with pytest.raises(ValueError, match="extras_seeds must be between 1 and the 5 seeds"):
        load_study_config(None, ["extras_seeds=6"])
    with pytest.raises(ValueError, match=r"\['truncated'\] start again .* teacher.pretrained is not set"):
        load_study_config(None, ["baselines=[first,truncated]"])
    with pytest.raises(ValueError, match="'items' compares .* needs teacher.pretrained"):
        load_study_config(None, ["ablation=[heal,items]"])
    with pytest.raises(ValueError, match="ray.portable_isa: unknown 'avx3'"):
        load_study_config(None, ["ray.portable_isa=avx3"])
    with pytest.raises(ValueError, match="compress.heal.autocast: bf16 under ray.portable_numerics .* avx2 is emulated"):
        load_study_config(None, ["ray.portable_numerics=true", "compress.heal.autocast=bf16"])
    pinned = load_study_config(None, ["ray.portable_numerics=true", "ray.portable_isa=avx512_bf16",
                                      "teacher.train.autocast=bf16", "compress.heal.autocast=bf16"])
    assert pinned.ray.portable_isa == "avx512_bf16"  # bf16 at full speed: accepted
    load_study_config(None, ["teacher.train.autocast=bf16"])  # unpinned: accepted


def test_pinned_kernels_are_named_in_the_environment_and_their_instructions_checked():
    from orchestration.study.archive import cpu_has, environment
    from orchestration.study.config import PORTABLE_NUMERICS

    assert environment(True, 1, "avx512_bf16")["cpu_kernels"] == "portable (AVX512_BF16)"
    assert environment(True, 1)["cpu_kernels"] == "portable (AVX2)"  # what archives made before record
    assert environment(False, 1)["cpu_kernels"] not in ("portable (AVX2)", "portable (AVX512_BF16)")
    assert set(PORTABLE_NUMERICS) == {"avx2", "avx512_bf16"}
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert cpu_has("avx512_bf16") == ({"avx512f", "avx512_bf16"} <= set(flags.split(":", 1)[1].split()))
    assert cpu_has("avx2") == ("avx2" in flags.split())


def test_shipped_study_configs_load():
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[3] / "studies").glob("*.yaml"))
    assert paths, "studies/ holds the study configs of the README"
    names = [load_study_config(str(path)).name for path in paths]  # parsed and checked like a user's file
    assert len(set(names)) == len(names) and "study" not in names  # each writes its own run folder


def test_progress_line_tells_running_stages_from_ones_an_earlier_invocation_left_unfinished(tmp_path):
    import json
    import time

    from orchestration.pipeline.stages import RUNNING, Stages
    from orchestration.study.driver import stage_progress

    seeds = tmp_path / "seeds"
    assert stage_progress(seeds) == "0 stages done"
    for done in ("seed-0/teacher-1a2b", "seed-0/importance-3c4d"):
        (seeds / done).mkdir(parents=True)
        (seeds / done / "_DONE").write_text("")
    (seeds / "seed-0" / "sweep-ours-k3-5e6f").mkdir()  # made before stages marked their runs
    killed = seeds / "seed-1" / "importance-9f0e"  # its process was killed: its marker stayed
    killed.mkdir(parents=True)
    (killed / RUNNING).write_text(json.dumps({"since": time.time() - 3600}))
    since = time.time()
    seen = []
    Stages(seeds / "seed-1").run("teacher", "7a8b", lambda out: seen.append(stage_progress(seeds, since)))
    assert seen == ["2 stages done; running seed-1/teacher; unfinished seed-0/sweep-ours-k3, seed-1/importance"]
    assert not (seeds / "seed-1" / "teacher-7a8b" / RUNNING).exists()  # gone once the stage has run
    assert stage_progress(seeds, since) == "3 stages done; unfinished seed-0/sweep-ours-k3, seed-1/importance"


def test_a_seed_with_extras_runs_them_beside_its_baselines():
    from orchestration.study.driver import seed_tasks
    from orchestration.study.seed import SeedRun

    config = load_study_config(None, ["seeds=[0,1,2]", "extras_seeds=1"])
    assert seed_tasks(config) == [(0, "base"), (0, "core"), (0, "extras"), (1, "all"), (2, "all")]
    assert seed_tasks(load_study_config(None, ["seeds=[0,1]", "extras_seeds=2"])) == [
        (0, "base"), (0, "core"), (0, "extras"), (1, "base"), (1, "core"), (1, "extras")]
    # Nothing to run beside the baselines: every seed is one task.
    bare = load_study_config(None, ["seeds=[0,1]", "ablation=[]", "sweep.selectors=[]"])
    assert seed_tasks(bare) == [(0, "all"), (1, "all")]
    with pytest.raises(ValueError, match="unknown part 'sweep'"):
        SeedRun(config, 0, None, None).run("sweep")


def test_an_archived_config_names_reused_folders_as_the_study_did(tmp_path, monkeypatch):
    """Relative to the folder the study ran from, whatever folder the archive command runs in."""
    from orchestration.study.archive import archive_study

    run = tmp_path / "project" / "runs" / "study-x"
    (run / "seeds").mkdir(parents=True)
    reused = tmp_path / "project" / "studies" / "archive" / "study-x"
    (run / "config.json").write_text(json.dumps({"run_dir": "runs", "reuse": [str(reused)], "ray": {}}))
    monkeypatch.chdir(tmp_path)
    archive_study(run, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["reuse"] == ["studies/archive/study-x"]
    # A run records them as its YAML named them: kept so, even when it ran in another tree than the archive's.
    (run / "config.json").write_text(json.dumps({"run_dir": "runs", "reuse": ["studies/archive/study-x"], "ray": {}}))
    archive_study(run, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["reuse"] == ["studies/archive/study-x"]


def test_archive_command_refuses_a_negative_weight_cap_and_a_folder_that_is_no_study(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["study", "archive", str(tmp_path), "--out", str(tmp_path / "out"), "--max-weight-mb", "-1"])
    assert stopped.value.code == 2 and "--max-weight-mb must be 0 or more, not -1.0" in capsys.readouterr().err
    assert main(["study", "archive", str(tmp_path), "--out", str(tmp_path / "out")]) != 0
    assert "holds no seeds/ folder: not a study run folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_teacher_stopped_by_its_time_cap_is_named_in_the_notes(tmp_path):
    """A teacher that its wall-clock cap stopped trained less than its recipe says, by an amount the machine's
    load decides: the report's notes name it (from its manifest), and a row's training record keeps its stop
    reason. A teacher that ran its epochs is not named."""
    from layerwise.data import load_dataset
    from orchestration.study.ablation import heal_record
    from orchestration.study.results import load_dependent_stops
    from orchestration.study.teacher import train_teacher

    config = load_study_config(None, ["seeds=[0]", "data.dataset=synthetic:200:40:3000:0", "teacher.preset=tiny",
                                      "teacher.train.epochs=3", f"data.cache_dir={tmp_path / 'cache'}"])
    data = load_dataset(config.data.dataset, cache_dir=config.data.cache_dir)
    capped = replace(config.teacher, train=replace(config.teacher.train, max_minutes=1e-9))
    dirs, records = {}, {}
    for seed, teacher in ((0, config.teacher), (1, capped)):
        path = tmp_path / f"seed-{seed}" / "teacher" / "model"
        _, result = train_teacher(teacher, data, config.data.dataset, seed, config.data.max_len, path)
        dirs[seed], records[seed] = {"teacher": path.parent}, heal_record(result)
    assert records[0]["stop_reason"] == "epochs" and records[1]["stop_reason"] == "time_cap"
    assert load_dependent_stops([], dirs) == [
        "Seed 1's teacher stopped at its wall-clock cap (train.max_minutes) after 1 of 3 epochs: its figures "
        "depend on the machine's load."]
    # A student's row names its own stop; rows without a load-dependent stop add nothing.
    rows = [{"seed": 0, "row": "scratch", "training": {**records[1]}}, {"seed": 0, "row": "ours", "training": None}]
    assert load_dependent_stops(rows, {0: dirs[0]}) == [
        "Seed 0's scratch stopped at its wall-clock cap (train.max_minutes) after 1 epoch: its figures depend on "
        "the machine's load."]


def test_a_failed_seed_is_said_at_once_and_the_run_names_it(tmp_path, capsys):
    """A seed task that fails (here its data set is missing; on a machine short of memory, Ray's monitor
    kills one) is reported as it happens, while the other seeds go on, and the run then fails naming it."""
    from orchestration.distributed.ray_runtime import ray_session
    from orchestration.study.driver import run_seeds

    config = load_study_config(None, ["seeds=[0,1]", f"data.dataset={tmp_path / 'missing.csv'}", "ablation=[]",
                                      "sweep.selectors=[]", f"data.cache_dir={tmp_path / 'cache'}"])
    with ray_session(num_cpus=2), pytest.raises(RuntimeError, match=r"seeds \[0, 1\] failed .* rerun to resume"):
        run_seeds(config, tmp_path / "study", progress=False)
    err = capsys.readouterr().err
    assert "[study] seed 0 failed:" in err and "[study] seed 1 failed:" in err and "missing.csv" in err
