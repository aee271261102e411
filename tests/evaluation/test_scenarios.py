"""Evaluation slices on a hand-made data object and on the real ml-100k; per-slice retention and flags."""

from __future__ import annotations

import numpy as np
import pytest

from layerwise.evaluation.scenarios import candidate_slices, filter_slices, slice_retention, slices
from tests.helpers.fake_data import FakeSequenceData


def _tiny() -> FakeSequenceData:
    """6 users, items 1..6; item 6 is the most popular in train. Targets: 6, 6, 1, 2, 6, 3."""
    data = FakeSequenceData([
        [6, 1, 2, 3, 6],
        [6, 2, 3, 4, 1, 6],
        [6, 4, 5, 2, 1],
        [6, 5, 3, 4, 6, 1, 2],
        [6, 3, 4, 1, 2, 6],
        [5, 4, 6, 3],
    ], n_items=6)
    data.item_genres = [[], ["Drama"], ["Comedy"], ["Drama", "War"], ["Comedy"], ["Horror"], ["Drama"]]
    data.user_features = {"age": ["24", "30", "17", "61", "x", "33"], "gender": list("MFMFMF"),
                          "zip_code": ["55414", "94043", "10003", "55105", "02139", "9"]}
    return data


def test_hand_made_slices():
    data = _tiny()
    cands = candidate_slices(data)
    assert cands["target_genre=Drama"].tolist() == [0, 1, 2, 4, 5]   # targets 6, 6, 1, 6, 3 are dramas
    assert cands["target_genre=War"].tolist() == [5] and cands["target_genre=Comedy"].tolist() == [3]
    assert "target_genre=Horror" not in cands  # item 5 is never a target
    assert cands["gender=F"].tolist() == [1, 3, 5]
    assert cands["age=18-24"].tolist() == [0] and cands["age=56+"].tolist() == [3]
    assert cands["age=<18"].tolist() == [2] and cands["age=x"].tolist() == [4]  # unparseable kept as is
    assert cands["zip_region=5"].tolist() == [0, 3] and cands["zip_region=9"].tolist() == [1, 5]
    assert cands["gender=F & age=25-34"].tolist() == [1, 5]
    assert cands["history_len=1-20"].tolist() == list(range(6))
    assert "zip_code=55414" not in cands  # only the region is a family


def test_quantile_families_partition_every_user():
    data = _tiny()
    cands = candidate_slices(data)
    for family in ("activity=", "target_pop=", "mainstream="):
        members = np.concatenate([v for k, v in cands.items() if k.startswith(family) and " & " not in k])
        assert sorted(members.tolist()) == list(range(data.n_users)), family
    # Train counts: item 6 -> 6, items 1, 2 -> 2, item 3 -> 3; so the top target_pop bin holds the 6s.
    bins = [k for k in cands if k.startswith("target_pop=q") and " & " not in k]
    assert cands[bins[-1]].tolist() == [0, 1, 4] and bins[-1].endswith("[6, 6]")
    assert cands["gender=F & target_pop=high"].tolist() == [1]  # terciles: 2 low, 3 mid, 6 high


def test_filter_counts_the_dropped_slices():
    cands = {"big": np.arange(25), "small": np.arange(3), "edge": np.arange(20)}
    kept, dropped = filter_slices(cands, min_users=20)
    assert list(kept) == ["big", "edge"] and dropped == {"small": 3}


def test_slice_retention_by_hand_and_the_flag():
    rng = np.random.default_rng(0)
    teacher = rng.uniform(0.2, 0.6, size=200)
    compact = teacher.copy()
    compact[:50] *= 0.5          # the compact model loses half on users 0..49
    users = np.arange(200)[::-1].copy()  # per-user arrays in reverse user order: mapping must follow it
    parts = {"hurt": np.arange(150, 200), "fine": np.arange(0, 100), "tiny": np.array([3])}
    rows = {r["name"]: r for r in slice_retention(teacher, compact, users, parts, n_boot=300)}
    assert set(rows) == {"hurt", "fine"}  # one user: no CI, no row
    hurt = rows["hurt"]
    assert hurt["n"] == 50 and hurt["retention"] == pytest.approx(0.5)
    assert hurt["teacher"] == pytest.approx(teacher[:50].mean())
    assert hurt["ci95"][0] <= 0.5 <= hurt["ci95"][1] < 1
    assert hurt["flagged"] and not rows["fine"]["flagged"]
    assert rows["fine"]["retention"] == 1.0 and rows["fine"]["p_value"] == 1.0
    assert hurt["p_holm"] == pytest.approx(min(1.0, 2 * hurt["p_value"])) and hurt["p_value"] < 1e-6


def test_slice_retention_reads_per_user_dicts_and_handles_a_zero_teacher():
    teacher = {"ndcg@10": np.array([0.0, 0.0, 0.5, 0.5])}
    compact = {"ndcg@10": np.array([0.1, 0.0, 0.5, 0.4])}
    rows = slice_retention(teacher, compact, [0, 1, 2, 3], {"zero": np.array([0, 1]), "rest": np.array([2, 3])},
                           n_boot=200)
    assert np.isnan(rows[0]["retention"]) and not rows[0]["flagged"]
    assert rows[1]["retention"] == pytest.approx(0.9) and rows[1]["metric"] == "ndcg@10"
    with pytest.raises(KeyError, match="mrr"):
        slice_retention(teacher, compact, [0, 1, 2, 3], {}, metric="mrr")


@pytest.fixture(scope="module")
def ml100k():
    from layerwise.data import load_dataset
    from layerwise.data.movielens import find_recbole_copy

    folder = find_recbole_copy()  # never download in a test
    if folder is None:
        pytest.skip("ml-100k is not installed locally (pip install --no-deps recbole)")
    return load_dataset(folder, progress=False)


@pytest.mark.slow
def test_ml100k_has_over_100_slices_of_20_users(ml100k):
    cands = candidate_slices(ml100k)
    kept, dropped = filter_slices(cands, min_users=20)
    assert len(kept) >= 100 and all(len(v) >= 20 for v in kept.values())
    assert len(kept) + len(dropped) == len(cands) and dropped  # some occupations are too small
    families = {name.split("=")[0] for name in kept if " & " not in name}
    assert {"activity", "history_len", "target_pop", "target_genre", "age", "gender", "occupation"} <= families
    assert sum(name.startswith("occupation=") for name in kept) >= 10
    assert list(slices(ml100k)) == list(kept)
