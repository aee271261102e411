"""The study's statistics on hand-made rows: seed means, t-intervals, p-values, shared users."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sps

from layerwise.report.document import fmt_estimate
from layerwise.evaluation.stats import seed_test
from orchestration.study.results import across_seeds, comparison
from orchestration.study.rows import Rows

SPEED = {"settings": {"batch_sizes": [1, 64]},
         "models": {"ours": {"batches": {"64": {"speedup": 3.0, "speedup_ci95": [2.8, 3.2], "status": "ok"}}},
                    "first": {"batches": {"64": {"speedup": 3.5, "speedup_ci95": [3.3, 3.7]}}},
                    "last": {"batches": {"64": {"speedup": 19.0, "speedup_ci95": [2.1, 30.0], "status": "disturbed",
                                                "disturbed_because": ["efficiency 487% ..."]}}}}}


def _row(tmp_path, name, seed, values, table="baselines", users=(0, 1, 2, 3), draw=0, timing=None):
    path = tmp_path / f"{name}-{seed}-{draw}.parquet"
    pq.write_table(pa.table({"user": pa.array(users, pa.int64()), "ndcg@10": pa.array(values, pa.float64())}), path)
    return {"row": name, "seed": seed, "table": table, "group": "depth", "per_user": str(path),
            "means": {"ndcg@10": float(np.mean(values))}, "timing": timing}


def test_across_seeds_is_a_t_interval():
    est = across_seeds([1.0, 2.0, 3.0])
    half = sps.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert est["mean"] == 2.0 and est["ci95"] == pytest.approx([2 - half, 2 + half]) and est["n"] == 3
    assert across_seeds([0.5])["ci95"] is None


def test_draws_are_averaged_within_a_seed_and_users_across_seeds(tmp_path):
    rows = [_row(tmp_path, "random", 0, [0.2, 0.4, 0.0, 0.2], draw=0),
            _row(tmp_path, "random", 0, [0.4, 0.4, 0.2, 0.2], draw=1),
            _row(tmp_path, "random", 1, [0.0, 0.0, 0.0, 0.4])]
    table = Rows(rows, seeds=[0, 1])
    assert table.seed_means("random") == pytest.approx([0.25, 0.1])
    assert table.per_user("random") == pytest.approx([0.15, 0.2, 0.05, 0.3])  # draws, then seeds
    assert list(table.users) == [0, 1, 2, 3]


def test_comparison_p_values_are_paired_t_tests_on_seed_means(tmp_path):
    values = {"teacher": ([0.30, 0.32, 0.29], None), "ours": ([0.29, 0.31, 0.30], None),
              "first": ([0.25, 0.30, 0.24], "first"), "last": ([0.20, 0.22, 0.21], "last")}
    rows = [_row(tmp_path, name, seed, [v] * 4, table="headline" if name in ("teacher", "ours") else "baselines",
                 timing=t) for name, (vs, t) in values.items() for seed, v in enumerate(vs)]
    result = comparison(Rows(rows, seeds=[0, 1, 2]), ["teacher", "ours", "first", "last"], SPEED, "64")
    by_name = {r["name"]: r for r in result["rows"]}
    expected = seed_test(values["ours"][0], values["first"][0])
    assert by_name["first"]["p_value"] == pytest.approx(expected.p_value)
    assert by_name["first"]["speedup"]["mean"] == 3.5 and by_name["ours"]["speedup"]["mean"] == 3.0
    # A timing the bench guard marked disturbed is no figure, in the table and in its report.
    assert by_name["last"]["speedup"]["mean"] is None and by_name["last"]["speedup"]["status"] == "disturbed"
    assert fmt_estimate(by_name["last"]["speedup"], "speed") == "disturbed (not a result)"
    assert by_name["ours"]["p_value"] is None
    ratio = np.array(values["first"][0]) / np.array(values["teacher"][0])
    assert by_name["first"]["retention"]["mean"] == pytest.approx(ratio.mean())


def test_rows_refuse_tables_of_different_users(tmp_path):
    rows = [_row(tmp_path, "teacher", 0, [0.1, 0.2, 0.3, 0.4]),
            _row(tmp_path, "ours", 0, [0.1, 0.2, 0.3, 0.4], users=(0, 1, 2, 5))]
    table = Rows(rows, seeds=[0])
    table.per_user("teacher")
    with pytest.raises(ValueError, match="test users differ"):
        table.per_user("ours")


def test_every_comparison_also_gets_a_per_user_test_and_each_family_its_own_holm(tmp_path):
    """With several seeds, a row's p_value is the seeds' paired t and p_users a paired Wilcoxon over users of
    each user's metric averaged over the seeds; the report adjusts each family across the table."""
    from layerwise.report.document import _with_holm
    from layerwise.evaluation.stats import holm, paired_test

    rng = np.random.default_rng(0)
    users = tuple(range(40))
    base = rng.uniform(0.1, 0.5, size=(3, 40))
    shifts = {"teacher": 0.0, "ours": 0.0, "scratch": 0.05, "random": -0.01}
    rows = [_row(tmp_path, name, seed, base[seed] + shift + rng.normal(0, 0.02, 40), users=users,
                 table="headline" if name in ("teacher", "ours") else "baselines")
            for name, shift in shifts.items() for seed in range(3)]
    table = Rows(rows, seeds=[0, 1, 2])
    result = comparison(table, list(shifts), {"settings": {"batch_sizes": [64]}, "models": {}}, "64")
    by_name = {r["name"]: r for r in result["rows"]}
    for name in ("teacher", "scratch", "random"):
        expected = paired_test(table.per_user("ours"), table.per_user(name), test="wilcoxon").p_value
        assert by_name[name]["p_users"] == pytest.approx(expected)
        assert by_name[name]["p_value"] == pytest.approx(seed_test(table.seed_means("ours"),
                                                                   table.seed_means(name)).p_value)
    assert by_name["scratch"]["p_users"] < 1e-4 and "p_users" not in by_name["ours"]
    assert "40 test users" in result["user_test"]
    adjusted = {r["name"]: r for r in _with_holm(result["rows"])}
    names = ["teacher", "scratch", "random"]
    for key, holm_key in (("p_value", "p_holm"), ("p_users", "p_users_holm")):
        expected = holm([by_name[n][key] for n in names])
        assert [adjusted[n][holm_key] for n in names] == pytest.approx(list(expected))


def test_a_training_curve_adds_cpu_minutes_while_every_epoch_recorded_them():
    from layerwise.baselines.budget import training_curve
    from layerwise.training.train import TrainResult

    history = [{"epoch": 1, "train_seconds": 60.0, "train_cpu_seconds": 120.0, "valid_seconds": 6.0,
                "valid_cpu_seconds": 12.0, "valid_ndcg@10": 0.1},
               {"epoch": 2, "train_seconds": 60.0, "train_cpu_seconds": 114.0},
               {"epoch": 3, "train_seconds": 60.0},  # made before epochs recorded CPU time
               {"epoch": 4, "train_seconds": 60.0, "train_cpu_seconds": 120.0}]
    curve = training_curve(TrainResult(best_epoch=1, best_valid={}, history=history))["curve"]
    assert [p["minutes"] for p in curve] == pytest.approx([1.1, 2.1, 3.1, 4.1])
    assert [p.get("cpu_minutes") for p in curve] == pytest.approx([2.2, 4.1, None, None])  # no total past a gap


def test_equal_compute_charges_ours_its_importance_and_cache_and_then_the_teachers_training(tmp_path):
    """Each student's own CPU minutes are its curve's last point (ours: after its importance stage and teacher
    cache); with the teacher charged, ours gains the teacher's training, read from the teacher's saved
    history where its row has no curve. Seed 0 recorded CPU seconds everywhere (exact); seed 1 is a study made
    before they were recorded: its wall minutes times each stage's CPU/wall ratio, named as estimates. The
    report renders the table and the figure."""
    import json

    from layerwise.baselines.budget import training_curve
    from layerwise.report import write_report
    from layerwise.training.train import TrainResult
    from orchestration.study.compute import equal_compute

    def trained(epoch_seconds, valid, cpu=None):  # cpu: CPU seconds per epoch, or None (not recorded)
        history = [{"epoch": e, "loss": 1.0, "train_seconds": t, "valid_seconds": 6.0, "valid_ndcg@10": v,
                    **({"train_cpu_seconds": cpu, "valid_cpu_seconds": 12.0} if cpu else {})}
                   for e, (t, v) in enumerate(zip(epoch_seconds, valid))]
        return TrainResult(best_epoch=len(history) - 1, best_valid={}, history=history)

    def write(path, content):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))

    rows, seed_dirs = [], {}
    for seed, exact in ((0, True), (1, False)):
        dirs = {name: tmp_path / f"seed-{seed}" / name for name in ("teacher", "importance", "ours", "baseline-scratch")}
        epochs = [{"epoch": e, "train_seconds": 594.0, "valid_seconds": 6.0,
                   **({"train_cpu_seconds": 1188.0, "valid_cpu_seconds": 12.0} if exact else {})} for e in range(1, 13)]
        write(dirs["teacher"] / "model" / "manifest.json", {"format": "layerwise/1", "history": epochs})
        parts = {"local": 60.0, "ablation": 120.0, "ablation_loss": 120.0} if exact else {"local": None}
        write(dirs["importance"] / "importance.json", {"scores": {}, "cpu_seconds": parts})
        for stage, (wall, cpu) in {"teacher": (100.0, 200.0), "importance": (300.0, 600.0), "ours": (60.0, 120.0),
                                   "baseline-scratch": (100.0, 50.0)}.items():
            write(dirs[stage] / "_seconds.json", {"seconds": wall, "cpu_seconds": cpu})
        seed_dirs[seed] = dirs
        heal = trained([54.0, 54.0], [0.10, 0.11], cpu=108.0 if exact else None)
        heal.cache_seconds, heal.cache_cpu_seconds = 120.0, (240.0 if exact else None)
        students = {"teacher": ({"best_epoch": 11, "epochs_run": 12}, "teacher"),
                    "ours": (training_curve(heal), "ours"),
                    "scratch": (training_curve(trained([114.0] * 3, [0.08, 0.10, None], cpu=228.0 if exact else None)),
                                "baseline-scratch")}
        for name, (training, stage) in students.items():
            row = _row(tmp_path, name, seed, [0.1 + 0.01 * seed] * 4,
                       table="headline" if name in ("teacher", "ours") else "baselines")
            rows.append({**row, "training": training, "stage": stage})
    entry = equal_compute(Rows(rows, seeds=[0, 1]), seed_dirs)
    by_name = {r["name"]: r for r in entry["rows"]}
    assert entry["unit"] == "CPU minutes" and set(by_name) == {"ours", "scratch"}  # truncated has no rows here
    assert entry["estimated"] == ["teacher, seed 1", "ours, seed 1", "scratch, seed 1"]
    # Teacher: 12 x 1,200 CPU s (seed 0); 12 x 600 wall s x 2 (seed 1, its stage's ratio).
    assert entry["teacher_minutes"]["mean"] == pytest.approx(240.0)
    # Ours, seed 0: importance parts 5 + cache 4 + epochs 2 x 2 = 13; seed 1: importance 10 + (2 + 2) x 2 = 18.
    assert by_name["ours"]["own_minutes"]["mean"] == pytest.approx(15.5)
    assert by_name["ours"]["with_teacher_minutes"]["mean"] == pytest.approx(255.5)
    # Scratch: 3 x 4 CPU minutes (seed 0); 3 x 2 wall minutes x 0.5 (seed 1).
    assert by_name["scratch"]["own_minutes"]["mean"] == by_name["scratch"]["with_teacher_minutes"]["mean"] == 7.5
    assert [p["minutes"] for p in entry["curves"]["ours"][0]] == pytest.approx([11.0, 13.0])
    assert [p["minutes"] for p in entry["curves"]["ours"][1]] == pytest.approx([16.0, 18.0])
    assert [p["valid"] for p in entry["curves"]["scratch"][1]] == [0.08, 0.10, None]
    paths = write_report({"title": "t", "equal_compute": entry}, tmp_path / "report")
    text = paths["markdown"].read_text()
    assert "| ours | 0.1050 [" in text and "figures/equal_compute.png" in text and "equal_compute" in paths["figures"]
    assert "CPU minutes (every thread" in text and "ratio): teacher, seed 1; ours, seed 1; scratch, seed 1." in text
