"""The Parquet cache and load_dataset: round trips, keys, sources, and no partial cache on failure."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layerwise.data import (
    DataError,
    Interactions,
    SequenceData,
    build_sequences,
    generate_synthetic,
    load_dataset,
    load_sequences,
    read_atomic,
    save_sequences,
)
from layerwise.data.cache import read_cache_key


def assert_same(a: SequenceData, b: SequenceData) -> None:
    assert a.name == b.name and a.fingerprint == b.fingerprint and a.protocol == b.protocol
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert np.array_equal(a.offsets, b.offsets) and a.offsets.dtype == b.offsets.dtype
    assert np.array_equal(a.items, b.items) and a.items.dtype == b.items.dtype
    assert a.item_text == b.item_text and a.item_genres == b.item_genres and a.user_features == b.user_features


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LAYERWISE_DATA_DIR", raising=False)
    monkeypatch.delenv("LAYERWISE_CACHE_DIR", raising=False)


@pytest.fixture
def tiny(tiny_atomic):
    return build_sequences(read_atomic(tiny_atomic, "tiny"), "tiny")


def test_round_trip_keeps_everything(tiny, tmp_path):
    path = save_sequences(tiny, tmp_path / "tiny.parquet", key={"k": 1})
    assert_same(load_sequences(path), tiny)
    assert read_cache_key(path) == {"k": 1}


def test_round_trip_without_metadata(tmp_path):
    log = generate_synthetic(50, 40, 400, seed=0)
    bare = build_sequences(Interactions(log.user, log.item, log.timestamp), "bare")
    assert bare.item_text is None and bare.user_features is None
    assert_same(load_sequences(save_sequences(bare, tmp_path / "bare.parquet")), bare)


def test_failed_write_leaves_no_partial_cache(tiny, tmp_path, monkeypatch):
    def write_half_then_fail(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_sequences(tiny, tmp_path / "cache" / "tiny.parquet")
    assert list((tmp_path / "cache").iterdir()) == []


def test_failed_rewrite_keeps_the_previous_entry(tiny, tiny_atomic, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_dataset(tiny_atomic, cache_dir=cache)
    (entry,) = cache.iterdir()
    before = entry.read_bytes()
    monkeypatch.setattr(pq, "write_table", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        load_dataset(tiny_atomic, cache_dir=cache, min_core=1)  # new key -> new entry, which fails
    with pytest.raises(OSError, match="disk full"):
        save_sequences(tiny, entry)  # overwriting the old entry fails too ...
    assert list(cache.iterdir()) == [entry] and entry.read_bytes() == before  # ... and the old one survives


def test_load_dataset_uses_the_cache_when_the_key_matches(tiny_atomic, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_dataset(tiny_atomic, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert read_cache_key(entry)["min_core"] == 0
    monkeypatch.setattr("layerwise.data.cache.build_sequences", lambda *a, **k: pytest.fail("cache not used"))
    assert_same(load_dataset(tiny_atomic, cache_dir=cache), first)


def test_changed_parameters_or_files_make_a_new_entry(tiny_atomic, tmp_path):
    cache = tmp_path / "cache"
    a = load_dataset(tiny_atomic, cache_dir=cache)
    assert load_dataset(tiny_atomic, cache_dir=cache, min_seq=4).user_ids == ["a"]
    assert len(list(cache.iterdir())) == 2
    inter = tiny_atomic / "tiny.inter"
    inter.write_text(inter.read_text() + "b\t1\t5\t7\n")
    b = load_dataset(tiny_atomic, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3 and b.sequence(1).tolist()[-1] == 1 and a.fingerprint != b.fingerprint


def test_damaged_entry_is_rebuilt(tiny_atomic, tmp_path):
    cache = tmp_path / "cache"
    good = load_dataset(tiny_atomic, cache_dir=cache)
    (entry,) = cache.iterdir()
    table = pq.read_table(entry)
    items = pa.array([[7, 7, 7, 7, 7, 7, 7]], type=pa.list_(pa.int32()))
    pq.write_table(table.set_column(table.schema.get_field_index("items"), "items", items), entry)
    with pytest.raises(DataError, match="do not match the recorded fingerprint"):
        load_sequences(entry)
    assert_same(load_dataset(tiny_atomic, cache_dir=cache), good)
    assert_same(load_sequences(entry), good)


def test_cache_dir_from_environment(tiny_atomic, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE_DIR", str(tmp_path / "env-cache"))
    load_dataset(tiny_atomic)
    assert len(list((tmp_path / "env-cache").glob("tiny-*.parquet"))) == 1


def test_sources_agree(tiny_atomic, tiny, tmp_path):
    """A folder, its .inter file, its name inside data_dir, and the same log as CSV/Parquet give one split."""
    assert_same(load_dataset(tiny_atomic), tiny)
    assert_same(load_dataset(tiny_atomic / "tiny.inter"), tiny)
    assert_same(load_dataset("tiny", data_dir=tiny_atomic.parent), tiny)
    log = read_atomic(tiny_atomic, "tiny")
    table = pa.table({"user_id": log.user, "item_id": log.item, "timestamp": log.timestamp})
    pq.write_table(table, tmp_path / "tiny.parquet")
    rows = zip(*table.to_pydict().values())
    (tmp_path / "tiny.csv").write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    for path in (tmp_path / "tiny.parquet", tmp_path / "tiny.csv"):
        loaded = load_dataset(path)
        assert loaded.fingerprint == tiny.fingerprint and loaded.item_text is None


def test_synthetic_spec(tmp_path):
    data = load_dataset("synthetic:300:100:3000:5", cache_dir=tmp_path)
    assert data.name == "synthetic-300x100x3000-s5" and data.n_users == 300 and len(data.items) == 3000
    assert data.fingerprint == build_sequences(generate_synthetic(300, 100, 3000, seed=5), "x").fingerprint
    assert load_dataset("synthetic:300:100:3000", cache_dir=tmp_path).name.endswith("-s0")
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("spec, problem", [
    ("synthetic:10:x:100", "bad synthetic spec"),
    ("no-such-set", "unknown data set"),
])
def test_bad_specs(spec, problem, tmp_path):
    with pytest.raises(DataError, match=problem):
        load_dataset(spec, data_dir=tmp_path)


def test_folder_with_several_inter_files(tiny_atomic, tiny):
    (tiny_atomic / "other.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nz\t1\t1\n")
    assert_same(load_dataset(tiny_atomic), tiny)  # the file named like its folder wins
    mixed = tiny_atomic.rename(tiny_atomic.parent / "mixed")
    with pytest.raises(DataError, match="several .inter files \\(other, tiny\\); pass one of them"):
        load_dataset(mixed)
