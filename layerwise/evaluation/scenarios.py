"""Evaluation slices ("scenarios"): groups of users on which the compact model is compared to the teacher.

    cands = candidate_slices(data)                          # every slice, whatever its size
    kept, dropped = filter_slices(cands, min_users=20)      # ml-100k: > 100 slices kept
    rows = slice_retention(teacher.per_user, compact.per_user, teacher.users, kept)

Families (name = "family=value"; crossings join two with " & "):
    activity            deciles of the user's number of interactions;
    history_len         fixed bins of the test-history length (the model sees at most max_len of it);
    target_pop          deciles of the TRAIN popularity of the test target (head vs long tail);
    target_genre        each genre of the test target (a user counts in every genre of the target);
    target_genre_seen   whether any genre of the target occurs in the user's history (novelty);
    mainstream          quintiles of the mean train popularity of the user's history items;
    age                 MovieLens-1M age groups; gender; occupation; zip_region (first zip digit);
    crossings           gender x age, gender x activity, age x activity, gender x target_pop and
                        activity x target_pop, with activity and target_pop cut in terciles (low/mid/high).
Missing metadata (no genres, no user features) simply yields fewer families.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from layerwise.evaluation.evaluate import item_popularity
from layerwise.evaluation.stats import holm, paired_test, ratio_ci

MIN_USERS = 20
AGE_GROUPS = ((0, 17, "<18"), (18, 24, "18-24"), (25, 34, "25-34"), (35, 44, "35-44"), (45, 49, "45-49"),
              (50, 55, "50-55"), (56, 200, "56+"))
HISTORY_BINS = (0, 20, 30, 50, 100, 200, 400)
MAX_CATEGORIES = 30  # a user feature with more distinct values (zip codes) is not a slice family
TERCILES = ("low", "mid", "high")


def candidate_slices(data, stage: str = "test") -> dict[str, np.ndarray]:
    """Every slice of users, of any size.

    Args:
        data: a `SequenceData` (or anything with `n_users`, `sequence`, `history`, `train_sequence`,
            `targets`; `item_genres` and `user_features` are used when present).
        stage: whose target and history define the slices ("test" normally).

    Returns:
        name -> (n_members,) int64 sorted user indices.
    """
    lengths = np.asarray([len(data.sequence(u)) for u in range(data.n_users)], dtype=np.int64)
    hist_len = np.asarray([len(data.history(u, stage)) for u in range(data.n_users)], dtype=np.int64)
    pop = item_popularity(data)
    target_pop = pop[np.asarray(data.targets(stage), dtype=np.int64)]
    mainstream = np.asarray([pop[np.asarray(data.history(u, stage), np.int64)].mean()
                             if hist_len[u] else 0.0 for u in range(data.n_users)])
    out = {}
    out.update(_quantile_slices("activity", lengths, 10))
    out.update(_history_slices(hist_len))
    out.update(_quantile_slices("target_pop", target_pop, 10))
    out.update(_genre_slices(data, stage))
    out.update(_quantile_slices("mainstream", mainstream, 5))
    features = _feature_labels(data)
    for name, labels in features.items():
        out.update(_categorical(name, labels))
    crossable = {**{k: v for k, v in features.items() if k in ("gender", "age")},
                 "activity": _terciles(lengths), "target_pop": _terciles(target_pop)}
    for left, right in (("gender", "age"), ("gender", "activity"), ("age", "activity"),
                        ("gender", "target_pop"), ("activity", "target_pop")):
        if left in crossable and right in crossable:
            out.update(_crossed(left, crossable[left], right, crossable[right]))
    return out


def difference_slices(data, stage: str = "test") -> dict[str, np.ndarray]:
    """The coarse slices that say where one model's gain over another goes: every user, the test target's
    train popularity in terciles ("target_pop=low [lo, hi]": rare, mid, popular), and the test history's
    length in HISTORY_BINS. name -> (n_members,) int64 sorted user indices."""
    hist_len = np.asarray([len(data.history(u, stage)) for u in range(data.n_users)], dtype=np.int64)
    target_pop = item_popularity(data)[np.asarray(data.targets(stage), dtype=np.int64)]
    out = {"all users": np.arange(data.n_users, dtype=np.int64)}
    labels = _terciles(target_pop)
    for label in TERCILES:
        members = np.flatnonzero(labels == label)
        if len(members):
            lo, hi = target_pop[members].min(), target_pop[members].max()
            out[f"target_pop={label} [{lo:.4g}, {hi:.4g}]"] = members
    out.update(_history_slices(hist_len))
    return out


def filter_slices(candidates: Mapping[str, np.ndarray], min_users: int = MIN_USERS
                  ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Split slices into the kept ones (>= min_users members) and the dropped ones (name -> size)."""
    kept = {k: v for k, v in candidates.items() if len(v) >= min_users}
    dropped = {k: len(v) for k, v in candidates.items() if len(v) < min_users}
    return kept, dropped


def slices(data, min_users: int = MIN_USERS, stage: str = "test") -> dict[str, np.ndarray]:
    """The slices with at least `min_users` users: name -> (n,) int64 user indices. See `filter_slices`
    for the dropped ones."""
    return filter_slices(candidate_slices(data, stage), min_users)[0]


def slice_retention(teacher, compact, users, slices: Mapping[str, np.ndarray], metric: str = "ndcg@10",
                    n_boot: int = 1000, seed: int = 0, n_flag: int = 10) -> list[dict]:
    """Per-slice teacher and compact means, retention with a paired bootstrap 95% CI, a paired Wilcoxon
    test (Holm-adjusted across all slices), and a flag on the slices where the compact model loses most.

    Args:
        teacher, compact: (n,) per-user metric arrays, or `EvalResult.per_user` dicts (then `metric` picks
            the array); position i belongs to user `users[i]` in both.
        users: (n,) user indices of the per-user arrays (`EvalResult.users`).
        slices: name -> user indices; users absent from `users` are ignored.
        metric: the per-user metric when dicts are given, recorded in every row.
        n_boot, seed: bootstrap resamples and seed (same seed for every slice: reproducible).
        n_flag: at most this many slices are flagged: the lowest retention among those whose CI upper
            bound is below 1 (a loss the bootstrap does not explain away).

    Returns:
        One dict per slice, in the order of `slices`: name, n, metric, teacher, compact, retention,
        ci95 [lo, hi], p_value, p_holm, flagged. Retention and CI are NaN where the teacher's slice mean
        is 0 (undefined ratio); p_value is 1 when every difference is 0.
    """
    t, c = _metric(teacher, metric), _metric(compact, metric)
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    if not len(t) == len(c) == len(users):
        raise ValueError(f"teacher, compact and users differ in length: {len(t)}, {len(c)}, {len(users)}")
    position = np.full(users.max() + 1, -1, dtype=np.int64)
    position[users] = np.arange(len(users))
    rows = [_slice_row(name, _positions(position, members), t, c, metric, n_boot, seed)
            for name, members in slices.items()]
    rows = [r for r in rows if r is not None]
    adjusted = holm([r["p_value"] for r in rows]) if rows else []
    for row, p in zip(rows, adjusted):
        row["p_holm"] = float(p)
    losers = sorted((r for r in rows if r["ci95"][1] < 1), key=lambda r: r["retention"])[:n_flag]
    flagged = {r["name"] for r in losers}
    for row in rows:
        row["flagged"] = row["name"] in flagged
    return rows


def _slice_row(name: str, idx: np.ndarray, t: np.ndarray, c: np.ndarray, metric: str, n_boot: int,
               seed: int) -> dict | None:
    if len(idx) < 2:  # neither a CI nor a test means anything on one user
        return None
    ts, cs = t[idx], c[idx]
    row = {"name": name, "n": int(len(idx)), "metric": metric, "teacher": float(ts.mean()),
           "compact": float(cs.mean()), "retention": float("nan"), "ci95": [float("nan")] * 2}
    if ts.mean() > 0:
        row["retention"] = float(cs.mean() / ts.mean())
        row["ci95"] = list(ratio_ci(cs, ts, n_boot=n_boot, seed=seed))
    row["p_value"] = float(paired_test(cs, ts, test="wilcoxon", seed=seed).p_value)
    return row


def _metric(values, metric: str) -> np.ndarray:
    if isinstance(values, Mapping):
        if metric not in values:
            raise KeyError(f"metric {metric!r} not in the per-user results {sorted(values)}")
        values = values[metric]
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _positions(position: np.ndarray, members: np.ndarray) -> np.ndarray:
    members = np.asarray(members, dtype=np.int64)
    members = members[(members >= 0) & (members < len(position))]
    idx = position[members]
    return idx[idx >= 0]


def _quantile_slices(family: str, values: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Quantile bins named "family=q3/10 [lo, hi]" with the bin's real value range; ties can merge bins
    (the edges are the distinct quantiles), so fewer than n_bins may come back."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1]))
    bins = np.searchsorted(edges, values, side="right")
    out = {}
    for b in np.unique(bins):
        members = np.flatnonzero(bins == b)
        lo, hi = values[members].min(), values[members].max()
        out[f"{family}=q{b + 1}/{n_bins} [{lo:.4g}, {hi:.4g}]"] = members
    return out


def _terciles(values: np.ndarray) -> np.ndarray:
    edges = np.quantile(values, [1 / 3, 2 / 3])
    return np.asarray(TERCILES, dtype=object)[np.searchsorted(edges, values, side="right")]


def _history_slices(hist_len: np.ndarray) -> dict[str, np.ndarray]:
    bins = np.searchsorted(np.asarray(HISTORY_BINS[1:]), hist_len, side="left")
    out = {}
    for b in np.unique(bins):
        lo = HISTORY_BINS[b] + 1
        label = f"{lo}-{HISTORY_BINS[b + 1]}" if b + 1 < len(HISTORY_BINS) else f">{HISTORY_BINS[-1]}"
        out[f"history_len={label}"] = np.flatnonzero(bins == b)
    return out


def _genre_slices(data, stage: str) -> dict[str, np.ndarray]:
    genres = getattr(data, "item_genres", None)
    if not genres:
        return {}
    targets = np.asarray(data.targets(stage), dtype=np.int64)
    by_genre: dict[str, list[int]] = {}
    seen = {"yes": [], "no": []}
    for u, item in enumerate(targets):
        target_genres = set(genres[item])
        for g in sorted(target_genres):
            by_genre.setdefault(g, []).append(u)
        history_genres = {g for i in data.history(u, stage) for g in genres[i]}
        seen["yes" if target_genres & history_genres else "no"].append(u)
    out = {f"target_genre={g}": np.asarray(us, np.int64) for g, us in sorted(by_genre.items())}
    out.update({f"target_genre_seen={k}": np.asarray(us, np.int64) for k, us in seen.items()})
    return out


def _feature_labels(data) -> dict[str, np.ndarray]:
    """User feature -> (n_users,) label per user ("" = unknown), with age grouped and zip codes cut to
    their first digit (a US region); other features with too many distinct values are skipped."""
    features = getattr(data, "user_features", None) or {}
    out = {}
    for name, values in features.items():
        values = np.asarray([str(v).strip() for v in values], dtype=object)
        if name == "age":
            values = np.asarray([_age_group(v) for v in values], dtype=object)
        elif name in ("zip", "zip_code"):
            name, values = "zip_region", np.asarray([v[:1] if v[:1].isdigit() else "" for v in values],
                                                     dtype=object)
        if len(set(values.tolist())) <= MAX_CATEGORIES:
            out[name] = values
    return out


def _age_group(value: str) -> str:
    try:
        age = int(float(value))
    except ValueError:
        return value  # already a group label (MovieLens-1M codes) or unknown
    return next(label for lo, hi, label in AGE_GROUPS if lo <= age <= hi) if age <= AGE_GROUPS[-1][1] else ""


def _categorical(name: str, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{name}={v}": np.flatnonzero(labels == v) for v in sorted(set(labels.tolist())) if v != ""}


def _crossed(left: str, a: np.ndarray, right: str, b: np.ndarray) -> dict[str, np.ndarray]:
    out = {}
    for va in sorted(set(a.tolist()) - {""}):
        for vb in sorted(set(b.tolist()) - {""}):
            out[f"{left}={va} & {right}={vb}"] = np.flatnonzero((a == va) & (b == vb))
    return out
