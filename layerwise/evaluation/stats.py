"""Paired significance tests, bootstrap confidence intervals and the Holm–Bonferroni correction.

Everything here compares two systems on the SAME units (users, or seeds): a per-user metric array of the
teacher and one of the compact model, index-aligned. Tests are paired because the users are shared, which
removes the large between-user variance from the comparison.

    teacher, compact = result_t.per_user["ndcg@10"], result_c.per_user["ndcg@10"]
    paired_test(compact, teacher, test="wilcoxon")      # TestResult(statistic, p_value, n, effect_size, ...)
    ratio_ci(compact, teacher, seed=0)                  # 95% CI of mean(compact) / mean(teacher)
    holm([0.01, 0.04, 0.03])                            # adjusted p-values, same order

Conventions: differences are a - b, so a positive mean_diff / effect_size means `a` scores higher. NaN
input is refused with the position of the first NaN: a silently dropped user would unpair the arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

TESTS = ("wilcoxon", "ttest")
CI_METHODS = ("percentile", "bca")
ZERO_METHODS = ("wilcox", "pratt", "zsplit")
_BOOT_CELLS = 4_000_000  # resample indices drawn per chunk (32 MB of int64): bounds memory at 100k users


@dataclass(frozen=True)
class TestResult:
    """One paired comparison of `a` against `b`.

    Attributes:
        statistic: Wilcoxon's W (scipy's: the smaller rank sum, two-sided) or the paired t.
        p_value: two-sided unless the caller asked otherwise.
        n: number of pairs given (zero differences included).
        effect_size: matched-pairs rank-biserial correlation in [-1, 1] (Wilcoxon) or Cohen's d_z =
            mean(d) / sd(d) (t-test); positive when a > b.
        mean_diff: mean(a - b).
        ci95: 95% CI of mean(a - b): Student t interval for the t-test, paired percentile bootstrap for
            Wilcoxon (which makes no normality assumption, like the test).
        test: "wilcoxon" or "ttest".
        note: why this test was used or anything the reader must know (e.g. all differences zero).
    """

    __test__ = False  # not a pytest test class, despite the name

    statistic: float
    p_value: float
    n: int
    effect_size: float
    mean_diff: float
    ci95: tuple[float, float]
    test: str = "wilcoxon"
    note: str = ""

    def to_dict(self) -> dict:
        """Plain JSON-able values."""
        return {"statistic": self.statistic, "p_value": self.p_value, "n": self.n,
                "effect_size": self.effect_size, "mean_diff": self.mean_diff, "ci95": list(self.ci95),
                "test": self.test, "note": self.note}


def paired_test(a, b, test: str = "wilcoxon", zero_method: str = "wilcox", alternative: str = "two-sided",
                seed: int = 0) -> TestResult:
    """Paired test of a against b on the same units.

    Args:
        a, b: (n,) per-unit metric values, index-aligned (user i of a is user i of b).
        test: "wilcoxon" (signed-rank; scipy's exact null for small n without ties, normal otherwise)
            or "ttest" (paired Student t).
        zero_method: Wilcoxon's treatment of zero differences (ties between the systems, common for
            NDCG where both miss): "wilcox" drops them, "pratt" ranks then drops them, "zsplit" splits
            their ranks between the signs. See `scipy.stats.wilcoxon`.
        alternative: "two-sided", "greater" (a > b) or "less".
        seed: for the bootstrap CI (Wilcoxon only).

    Returns:
        A `TestResult`. When every difference is zero there is no evidence of a difference: p = 1,
        statistic 0, effect 0 (scipy would warn and return NaN for the t-test).

    Raises:
        ValueError: shapes differ, n < 2, NaN or inf present, unknown test/zero_method, or differences
            that are all equal and non-zero in a t-test (zero variance: t is undefined).
    """
    a, b = _paired_arrays(a, b)
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    d = a - b
    if not d.any():
        return TestResult(0.0, 1.0, len(d), 0.0, 0.0, (0.0, 0.0), test, "all differences are zero")
    if test == "ttest":
        return _ttest(d, a, b, alternative)
    res = sps.wilcoxon(a, b, zero_method=zero_method, alternative=alternative)
    ci = bootstrap_ci(d, seed=seed)
    return TestResult(float(res.statistic), float(res.pvalue), len(d), rank_biserial(d, zero_method),
                      float(d.mean()), ci, "wilcoxon", f"zero_method={zero_method}")


def _ttest(d: np.ndarray, a: np.ndarray, b: np.ndarray, alternative: str) -> TestResult:
    sd = d.std(ddof=1)
    if sd == 0:
        raise ValueError(f"every difference equals {d[0]!r}: zero variance, the paired t-test is undefined")
    res = sps.ttest_rel(a, b, alternative=alternative)
    lo, hi = res.confidence_interval(0.95) if alternative == "two-sided" else _t_interval(d)
    return TestResult(float(res.statistic), float(res.pvalue), len(d), float(d.mean() / sd),
                      float(d.mean()), (float(lo), float(hi)), "ttest")


def _t_interval(d: np.ndarray) -> tuple[float, float]:
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(d.mean() - half), float(d.mean() + half)


def across_seeds(values) -> dict:
    """{"mean", "ci95", "n"}: the mean of one figure per seed with its Student t interval (None with one seed)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return {"mean": float(values.mean()), "ci95": None, "n": len(values)}
    return {"mean": float(values.mean()), "ci95": list(_t_interval(values)), "n": len(values)}


def rank_biserial(d, zero_method: str = "wilcox") -> float:
    """Matched-pairs rank-biserial correlation (Kerby 2014): (R+ - R-) / (R+ + R-), in [-1, 1].

    Args:
        d: (n,) paired differences a - b.
        zero_method: as in `paired_test`: "wilcox" ranks only non-zero |d|; "pratt" ranks all |d| and
            counts zero ranks in the denominator only; "zsplit" gives half of each zero's rank to each sign.

    Returns:
        +1 when every non-zero difference favours a, -1 when every one favours b, 0 when all are zero.
    """
    d = np.asarray(d, dtype=np.float64)
    if zero_method == "wilcox":
        d = d[d != 0]
    if not d.any():
        return 0.0
    ranks = sps.rankdata(np.abs(d))
    r_plus, r_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((r_plus - r_minus) / ranks.sum())


def min_wilcoxon_p(n: int, alternative: str = "two-sided") -> float:
    """Smallest p-value the exact Wilcoxon signed-rank test can reach with n pairs: 2 / 2**n two-sided
    (every difference of one sign), 1 / 2**n one-sided. n = 5 gives 0.0625: p < 0.05 is impossible."""
    return (2.0 if alternative == "two-sided" else 1.0) / 2.0**n


def seed_test(means_a, means_b, alpha: float = 0.05) -> TestResult:
    """Paired test across seeds on the per-seed means (seed i of a was trained/evaluated with seed i of b).

    With the 5 seeds of the protocol the exact Wilcoxon test cannot reach significance at all: its
    smallest two-sided p is 2 / 2**5 = 0.0625 > 0.05 (and p < 0.01 needs n >= 8). So the paired t-test
    is used; it assumes the seed-to-seed differences are roughly normal, which a mean over hundreds of
    users usually is. The note records the n and the Wilcoxon floor so a reader can judge.

    Args:
        means_a, means_b: (n_seeds,) one summary number per seed, index-aligned.
        alpha: the level the note compares the Wilcoxon floor against.

    Returns:
        The paired t-test's `TestResult` (d_z effect size, t-interval CI of the mean difference).
    """
    a, b = _paired_arrays(means_a, means_b)
    result = paired_test(a, b, test="ttest")
    floor = min_wilcoxon_p(len(a))
    why = "cannot" if floor > alpha else "can"
    note = (f"paired t-test on {len(a)} seed means; the exact Wilcoxon test's minimum two-sided p with "
            f"n={len(a)} is {floor:.4g}, so it {why} reach p < {alpha}")
    return TestResult(result.statistic, result.p_value, result.n, result.effect_size, result.mean_diff,
                      result.ci95, "ttest", "; ".join(filter(None, [result.note, note])))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjustment of the p-values of one family of comparisons (a table).

    Sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j)) (1-based j); rejecting where
    the adjusted p < alpha controls the family-wise error rate at alpha.

    Args:
        p_values: (m,) raw p-values in [0, 1].

    Returns:
        (m,) float64 adjusted p-values in the input order.
    """
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    if np.isnan(p).any():
        raise ValueError(f"p-value {int(np.flatnonzero(np.isnan(p))[0])} is NaN: adjust only real p-values")
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must be in [0, 1], got {p[(p < 0) | (p > 1)][0]!r}")
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = stepped
    return out


def compare_to(reference, others: Mapping[str, np.ndarray], test: str = "wilcoxon",
               seed: int = 0) -> dict[str, dict]:
    """Paired tests of every method against one reference, Holm-adjusted across the table.

    Args:
        reference: (n,) per-user metric of the reference method (ours).
        others: method -> (n,) per-user metric on the same users in the same order.
        test: "wilcoxon" or "ttest".
        seed: bootstrap seed for the CIs.

    Returns:
        method -> TestResult.to_dict() of (reference - method) plus "p_holm".
    """
    results = {name: paired_test(reference, values, test=test, seed=seed) for name, values in others.items()}
    adjusted = holm([r.p_value for r in results.values()]) if results else []
    return {name: {**r.to_dict(), "p_holm": float(p)} for (name, r), p in zip(results.items(), adjusted)}


def bootstrap_ci(x, statistic: Callable[[np.ndarray], np.ndarray] | None = None, n_boot: int = 2000,
                 seed: int = 0, method: str = "percentile", level: float = 0.95) -> tuple[float, float]:
    """Bootstrap confidence interval of the mean of x (or of another statistic).

    Args:
        x: (n,) samples (e.g. per-user NDCG@10, or per-user differences for a paired CI).
        statistic: maps resampled data (n_boot_chunk, n) -> (n_boot_chunk,); default the row mean.
            BCa needs the mean (its jackknife is computed in closed form).
        n_boot: resamples; seed: the generator's seed (same seed, same interval).
        method: "percentile" or "bca" (bias-corrected and accelerated, Efron 1987).
        level: coverage, 0.95 for a 95% CI.

    Returns:
        (low, high). Constant x gives (x[0], x[0]).
    """
    x = _finite(x, "x")
    if statistic is not None and method == "bca":
        raise ValueError("bca is implemented for the mean only; use method='percentile' with a statistic")
    stat = statistic or (lambda s: s.mean(axis=1))
    boot = _resample(len(x), n_boot, seed, lambda idx: stat(x[idx]))
    theta = float(stat(x[None, :])[0])
    jack = (x.sum() - x) / (len(x) - 1) if method == "bca" else None
    return _interval(boot, theta, jack, method, level)


def ratio_ci(num, den, n_boot: int = 2000, seed: int = 0, method: str = "percentile",
             level: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap CI of mean(num) / mean(den), users resampled together (retention: num = compact,
    den = teacher). Resampling pairs keeps the strong per-user correlation, which narrows the interval.

    Args:
        num, den: (n,) index-aligned per-user values; mean(den) must be positive.
        n_boot, seed, method, level: as in `bootstrap_ci`.

    Returns:
        (low, high) of the ratio; a resample whose mean(den) is 0 counts as ratio 0 for num 0, else +inf.
    """
    num, den = _paired_arrays(num, den, names=("num", "den"))
    if den.mean() <= 0:
        raise ValueError(f"mean(den) must be positive for a ratio, got {den.mean()!r}")
    boot = _resample(len(num), n_boot, seed, lambda idx: _safe_ratio(num[idx].sum(1), den[idx].sum(1)))
    theta = num.sum() / den.sum()
    jack = None
    if method == "bca":
        jack = _safe_ratio(num.sum() - num, den.sum() - den)
    return _interval(boot, theta, jack, method, level)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where(den > 0, out, np.where(num > 0, np.inf, 0.0))


def _resample(n: int, n_boot: int, seed: int, stat: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(n_boot,) statistic over index resamples (rows of an (chunk, n) index matrix), in chunks."""
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 for a 95% interval, got {n_boot}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS // n)
    out = [stat(rng.integers(0, n, size=(min(chunk, n_boot - s), n))) for s in range(0, n_boot, chunk)]
    return np.concatenate(out)


def _interval(boot: np.ndarray, theta: float, jack: np.ndarray | None, method: str,
              level: float) -> tuple[float, float]:
    if method not in CI_METHODS:
        raise ValueError(f"method must be one of {CI_METHODS}, got {method!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2
    if np.ptp(boot) == 0:  # constant data: no sampling variability to speak of
        return float(boot[0]), float(boot[0])
    quantiles = np.array([tail, 1 - tail])
    if method == "bca":
        quantiles = _bca_quantiles(boot, theta, jack, quantiles)
    lo, hi = np.quantile(boot, quantiles)
    return float(lo), float(hi)


def _bca_quantiles(boot: np.ndarray, theta: float, jack: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Efron's BCa: shift the percentile levels by the bias z0 and skew them by the acceleration a."""
    # Half the ties count as below, and the proportion is clipped so z0 stays finite.
    below = ((boot < theta).sum() + 0.5 * (boot == theta).sum()) / len(boot)
    z0 = sps.norm.ppf(np.clip(below, 1 / (len(boot) + 1), len(boot) / (len(boot) + 1)))
    dev = jack.mean() - jack
    denom = 6.0 * (dev**2).sum() ** 1.5
    a = (dev**3).sum() / denom if denom > 0 else 0.0
    z = sps.norm.ppf(q)
    return sps.norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))


def _finite(x, name: str, min_n: int = 2) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-d (one value per user or seed), got shape {arr.shape}")
    if len(arr) < min_n:
        raise ValueError(f"{name} has {len(arr)} values; at least {min_n} are needed")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        raise ValueError(f"{name}[{int(bad[0])}] is {float(arr[bad[0]])}: NaN/inf values are not allowed "
                         f"({len(bad)} in all); drop the unit from both arrays or fix the metric")
    return arr


def _paired_arrays(a, b, min_n: int = 2, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _finite(a, names[0], min_n), _finite(b, names[1], min_n)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays {names[0]} and {names[1]} differ in length: {len(a)} vs {len(b)}")
    return a, b
