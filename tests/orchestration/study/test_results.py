"""The study's statistics on hand-made rows: seed means, t-intervals, p-values, shared users."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sps

from layerwise.report.document import fmt_estimate
from layerwise.stats import seed_test
from orchestration.study.results import Rows, across_seeds, comparison

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
