"""Paired tests, bootstrap CIs and Holm against scipy's reference values and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from layerwise.evaluation import stats
from layerwise.evaluation.stats import bootstrap_ci, compare_to, holm, paired_test, rank_biserial, ratio_ci, seed_test


def _pairs(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NDCG-like per-user values: many exact ties (both miss: 0) and a small shift."""
    rng = np.random.default_rng(seed)
    b = np.where(rng.random(n) < 0.4, 0.0, rng.random(n))
    a = np.where(rng.random(n) < 0.3, b, np.clip(b + rng.normal(0.05, 0.2, n), 0, 1))
    return a, b


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt", "zsplit"])
def test_wilcoxon_matches_scipy_with_zero_differences(zero_method):
    a, b = _pairs()
    assert (a == b).sum() > 5  # the case exercises zero differences
    ours = paired_test(a, b, test="wilcoxon", zero_method=zero_method)
    ref = sps.wilcoxon(a, b, zero_method=zero_method)
    assert ours.statistic == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue)
    assert ours.n == 60 and ours.mean_diff == pytest.approx((a - b).mean())
    assert ours.ci95[0] < ours.mean_diff < ours.ci95[1]


def test_ttest_matches_scipy_and_cohens_dz():
    a, b = _pairs(seed=1)
    ours = paired_test(a, b, test="ttest")
    ref = sps.ttest_rel(a, b)
    d = a - b
    assert ours.statistic == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue)
    assert ours.effect_size == pytest.approx(d.mean() / d.std(ddof=1))
    assert ours.ci95 == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_rank_biserial_by_hand():
    # |d| ranks 1, 2, 3, 4; R+ = 1 + 2 + 4 = 7, R- = 3: r = (7 - 3) / 10.
    assert rank_biserial([1.0, 2.0, -3.0, 4.0]) == pytest.approx(0.4)
    assert rank_biserial([0.0, 1.0, 2.0]) == pytest.approx(1.0)  # zeros dropped: all favour a
    # Pratt keeps the zero's rank (1) in the denominator: (2 + 3) / 6.
    assert rank_biserial([0.0, 1.0, 2.0], zero_method="pratt") == pytest.approx(5 / 6)
    result = paired_test([1.0, 2.0, 0.0, 4.0], [0.0, 0.0, 3.0, 0.0])
    assert result.effect_size == pytest.approx(0.4) and result.statistic == pytest.approx(3.0)


def test_all_zero_differences_mean_no_evidence():
    x = np.array([0.1, 0.0, 0.5])
    for test in ("wilcoxon", "ttest"):
        result = paired_test(x, x.copy(), test=test)
        assert (result.p_value, result.effect_size, result.mean_diff) == (1.0, 0.0, 0.0)
        assert "zero" in result.note


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"a\[2\] is nan"):
        paired_test([0.1, 0.2, np.nan], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        paired_test([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        paired_test([0.1], [0.2])
    with pytest.raises(ValueError, match="zero variance"):
        paired_test([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], test="ttest")
    with pytest.raises(ValueError, match="test must be"):
        paired_test([1.0, 2.0], [0.0, 1.0], test="sign")


def test_seed_test_uses_the_t_test_and_says_why():
    a = np.array([0.061, 0.063, 0.060, 0.064, 0.062])
    b = np.array([0.055, 0.058, 0.054, 0.057, 0.056])
    assert stats.min_wilcoxon_p(5) == 0.0625
    # The floor is real: every seed favouring a is the strongest possible Wilcoxon evidence.
    assert sps.wilcoxon(a, b).pvalue == pytest.approx(0.0625)
    result = seed_test(a, b)
    assert result.test == "ttest"
    assert result.p_value == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert result.p_value < 0.01 and "0.0625" in result.note and "cannot" in result.note


def test_holm_textbook_example():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06.
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # capped at 1
    with pytest.raises(ValueError, match="NaN"):
        holm([0.01, np.nan])


def test_compare_to_adjusts_across_the_table():
    ours, b = _pairs(n=80, seed=2)
    table = compare_to(ours, {"weak": b, "same": ours.copy(), "noise": b + 1e-3})
    assert set(table) == {"weak", "same", "noise"}
    assert table["same"]["p_value"] == 1.0 and table["same"]["p_holm"] == 1.0
    assert table["weak"]["p_holm"] == pytest.approx(min(1.0, 3 * table["weak"]["p_value"]))


def test_bootstrap_ci_covers_the_true_mean_at_about_95_percent():
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(200):
        x = rng.exponential(1.0, size=40)  # skewed, true mean 1
        lo, hi = bootstrap_ci(x, n_boot=400, seed=rep)
        hits += lo <= 1.0 <= hi
    assert 0.87 <= hits / 200 <= 0.99


def test_bca_agrees_with_scipy():
    x = np.random.default_rng(3).lognormal(0, 1, size=80)
    ours = bootstrap_ci(x, n_boot=4000, seed=0, method="bca")
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="BCa", rng=np.random.default_rng(1))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert ours == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), abs=0.1 * width)
    # BCa shifts a right-skewed mean's interval to the right of the percentile one.
    assert ours[1] > bootstrap_ci(x, n_boot=4000, seed=0)[1]


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_ratio_ci_is_paired_seeded_and_agrees_with_scipy(method):
    teacher, _ = _pairs(n=120, seed=4)
    compact = teacher * 0.9 + np.random.default_rng(5).normal(0, 0.02, 120)
    ci = ratio_ci(compact, teacher, n_boot=3000, seed=7, method=method)
    assert ci == ratio_ci(compact, teacher, n_boot=3000, seed=7, method=method)
    assert ci[0] < compact.mean() / teacher.mean() < ci[1]
    ref = sps.bootstrap((compact, teacher), lambda c, t, axis=-1: c.mean(axis) / t.mean(axis), paired=True,
                        n_resamples=3000, method="BCa" if method == "bca" else "percentile",
                        rng=np.random.default_rng(0)).confidence_interval
    assert ci == pytest.approx((ref.low, ref.high), abs=0.15 * (ref.high - ref.low))
    assert ratio_ci(teacher, teacher, n_boot=200) == (1.0, 1.0)


def test_bootstrap_chunking_does_not_change_the_interval(monkeypatch):
    x = np.random.default_rng(6).random(50)
    whole = bootstrap_ci(x, n_boot=500, seed=1)
    monkeypatch.setattr(stats, "_BOOT_CELLS", 120)  # 2 resamples per chunk
    assert bootstrap_ci(x, n_boot=500, seed=1) == whole


def test_bootstrap_refuses_nan_and_bad_settings():
    with pytest.raises(ValueError, match=r"x\[1\]"):
        bootstrap_ci([0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci([0.1, 0.2, 0.3], method="normal")
    with pytest.raises(ValueError, match="positive"):
        ratio_ci([0.1, 0.2], [0.0, 0.0])


def test_across_seeds_gives_the_mean_with_scipys_t_interval_and_none_for_one_seed():
    values = [0.1164, 0.1146, 0.1121]
    entry = stats.across_seeds(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert entry["n"] == 3 and entry["mean"] == pytest.approx(np.mean(values))
    assert entry["ci95"] == pytest.approx([low, high])
    assert stats.across_seeds([0.2]) == {"mean": 0.2, "ci95": None, "n": 1}
