"""dataset_stats on a hand-checked tiny split."""

import json

import pytest

from layerwise.data import build_sequences, dataset_stats, read_atomic


def test_stats_of_the_tiny_set(tiny_atomic):
    data = build_sequences(read_atomic(tiny_atomic, "tiny"), "tiny")
    stats = dataset_stats(data)
    # a: [2, 6, 5, 1], b: [3, 7, 4]; 7 items each seen once.
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 7, 7)
    assert stats["density"] == pytest.approx(7 / 14)
    assert stats["history_mean"] == 3.5 and stats["history_median"] == 3.5
    assert (stats["history_min"], stats["history_max"]) == (3, 4)
    assert stats["train_interactions"] == 3  # a: 2, 6; b: 3
    assert stats["cold_items"] == 4  # 1, 4, 5, 7 appear only as valid/test targets
    assert stats["item_gini"] == pytest.approx(0.0)  # every item seen exactly once
    assert stats["top10pct_item_share"] == pytest.approx(1 / 7)
    assert stats["fingerprint"] == data.fingerprint
    json.dumps(stats)  # JSON-able, so it can be logged as is
