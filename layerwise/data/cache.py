"""Load a data set by name or path, through a Parquet cache of its `SequenceData`.

A cache entry is one Parquet file with a single row: the arrays and id lists as list columns, and JSON
metadata (format, name, fingerprint, protocol and the key it was built from) in the schema metadata. It is
written atomically, so an interrupted write leaves either the previous entry or nothing. On load the key
must match (source + parameters; for files, their sizes and modification times) and the fingerprint is
recomputed, so a stale or damaged entry is rebuilt rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from layerwise.data.atomic import atomic_path
from layerwise.data.benchmarks import is_sequence_spec, sequence_source
from layerwise.data.movielens import resolve_ml100k
from layerwise.data.readers import DataError, Interactions, read_atomic
from layerwise.data.tabular import read_table
from layerwise.data.split import SequenceData, build_sequences, fingerprint
from layerwise.data.synthetic import GENERATOR_VERSION, generate_synthetic

CACHE_FORMAT = 1
_META_KEY = b"layerwise"
_SYNTH = re.compile(r"^synthetic:(\d+):(\d+):(\d+)(?::(\d+))?$")
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


def load_dataset(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    min_core: int = 0,
    *,
    min_seq: int = 3,
    progress: bool = True,
) -> SequenceData:
    """Load, filter and split a data set, reusing a cached split when its key matches.

    Args:
        name_or_path: "ml-100k"; "synthetic:USERS:ITEMS:INTERACTIONS[:SEED]"; "beauty", "sports", "toys",
            "yelp" (the literature's benchmarks); "seqfile:PATH" (one line per user, `user item item ...`,
            oldest first); a folder of RecBole atomic files; a `.inter` file; a `.csv`/`.tsv`/`.parquet`
            file with user_id, item_id, timestamp columns; or the name of a folder or `.inter` stem inside
            `data_dir`.
        data_dir: where local data sets live (default `$LAYERWISE_DATA_DIR`).
        cache_dir: where split data sets are cached (default `$LAYERWISE_CACHE_DIR`; no cache if neither).
        min_core: k-core filter (0 = off).
        min_seq: users with fewer interactions are dropped.
        progress: show a progress bar if ml-100k or a benchmark has to be downloaded.

    Example:
        data = load_dataset("synthetic:1000:200:20000:0")
    """
    data_dir = data_dir if data_dir is not None else os.environ.get("LAYERWISE_DATA_DIR")
    name, source, read = _source(str(name_or_path), data_dir, progress)
    cache_dir = cache_dir if cache_dir is not None else os.environ.get("LAYERWISE_CACHE_DIR")
    if not cache_dir:
        return build_sequences(read(), name, min_core=min_core, min_seq=min_seq)
    key = {"format": CACHE_FORMAT, "source": source, "min_core": int(min_core), "min_seq": int(min_seq)}
    path = _cache_path(Path(cache_dir), name, key)
    if path.is_file():
        try:
            if read_cache_key(path) == key:
                return load_sequences(path)
        except (DataError, OSError, pa.ArrowException):
            pass  # a damaged entry is rebuilt and replaced below
    data = build_sequences(read(), name, min_core=min_core, min_seq=min_seq)
    save_sequences(data, path, key=key)
    return data


def _cache_path(cache_dir: Path, name: str, key: dict) -> Path:
    """`<cache_dir>/<name>-<16 hex of sha256(key)>.parquet`: one entry per source and parameters."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}-{digest}.parquet"


def _source(spec: str, data_dir: str | Path | None, progress: bool) -> tuple[str, dict, Callable[[], Interactions]]:
    """(data set name, JSON-able description of the source for the cache key, reader)."""
    if spec == "ml-100k":
        folder = resolve_ml100k(data_dir, progress=progress)
        return spec, {"kind": "atomic", "files": _stat(folder, spec)}, lambda: read_atomic(folder, spec)
    if is_sequence_spec(spec):
        return sequence_source(spec, data_dir, progress)
    if spec.startswith("synthetic:"):
        m = _SYNTH.match(spec)
        if not m:
            raise DataError(f"bad synthetic spec {spec!r}: expected synthetic:USERS:ITEMS:INTERACTIONS[:SEED]")
        users, items, inter, seed = (int(g) for g in m.groups(default="0"))
        params = {"kind": "synthetic", "version": GENERATOR_VERSION, "users": users, "items": items,
                  "interactions": inter, "seed": seed}
        return (f"synthetic-{users}x{items}x{inter}-s{seed}", params,
                lambda: generate_synthetic(users, items, inter, seed=seed))
    path = Path(spec)
    if not path.exists() and data_dir is not None:
        inside = [Path(data_dir) / spec, Path(data_dir) / f"{spec}.inter"]
        path = next((p for p in inside if p.exists()), path)
    if path.is_dir() or path.suffix == ".inter":
        folder, stem = (path, _atomic_stem(path)) if path.is_dir() else (path.parent, path.stem)
        return stem, {"kind": "atomic", "files": _stat(folder, stem)}, lambda: read_atomic(folder, stem)
    if path.suffix.lower() in _TABLE_SUFFIXES and path.is_file():
        files = {str(path.resolve()): [path.stat().st_size, path.stat().st_mtime_ns]}
        return path.stem, {"kind": "table", "files": files}, lambda: read_table(path)
    raise DataError(f"{spec}: unknown data set: expected 'ml-100k', 'synthetic:USERS:ITEMS:INTERACTIONS[:SEED]', "
                    "'beauty', 'sports', 'toys', 'yelp', 'seqfile:PATH', a folder of RecBole atomic files, "
                    "or an existing .inter/.csv/.tsv/.parquet file")


def _atomic_stem(folder: Path) -> str:
    """The stem of the one `.inter` file in `folder` (or the one named like the folder)."""
    stems = sorted(p.stem for p in folder.glob("*.inter"))
    if len(stems) == 1:
        return stems[0]
    if folder.name in stems:
        return folder.name
    what = "no .inter file" if not stems else f"several .inter files ({', '.join(stems)}); pass one of them"
    raise DataError(f"{folder}: {what}")


def _stat(folder: Path, stem: str) -> dict[str, list[int]]:
    """{absolute path: [size, mtime_ns]} of the atomic files: a changed file changes the cache key."""
    files = [folder / f"{stem}.{ext}" for ext in ("inter", "item", "user")]
    return {str(f.resolve()): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}


def save_sequences(data: SequenceData, path: str | Path, key: dict | None = None) -> Path:
    """Write `data` to one Parquet file atomically (no partial file survives a failure).

    Args:
        data: the sequences.
        path: the file to (re)place.
        key: JSON-able description of what the data was built from; `load_dataset` compares it.
    """
    features = data.user_features or {}
    columns = {
        "offsets": _one_row(pa.array(data.offsets, type=pa.int64())),
        "items": _one_row(pa.array(data.items, type=pa.int32())),
        "user_ids": _one_row(pa.array(data.user_ids, type=pa.string())),
        "item_ids": _one_row(pa.array(data.item_ids, type=pa.string())),
        "item_text": pa.array([data.item_text], type=pa.list_(pa.string())),
        "item_genres": pa.array([data.item_genres], type=pa.list_(pa.list_(pa.string()))),
    }
    columns.update({f"user_feature:{f}": _one_row(pa.array(v, type=pa.string())) for f, v in features.items()})
    meta = {"format": CACHE_FORMAT, "name": data.name, "fingerprint": data.fingerprint,
            "protocol": data.protocol, "key": key, "user_features": list(features),
            "has_user_features": data.user_features is not None}
    table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _one_row(values: pa.Array) -> pa.ListArray:
    """A one-row list column holding `values` (built from offsets, without a Python-level copy)."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], type=pa.int32()), values)


def _read_meta(path: Path) -> dict:
    raw = (pq.read_schema(path).metadata or {}).get(_META_KEY)
    if raw is None:
        raise DataError(f"{path}: not a layerwise data cache (no metadata)")
    meta = json.loads(raw)
    if meta.get("format") != CACHE_FORMAT:
        raise DataError(f"{path}: cache format {meta.get('format')}, expected {CACHE_FORMAT}")
    return meta


def read_cache_key(path: str | Path) -> dict | None:
    """The key a cache file was written with (reads only the footer)."""
    return _read_meta(Path(path))["key"]


def load_sequences(path: str | Path) -> SequenceData:
    """Read a file written by `save_sequences`, checking its fingerprint.

    Raises:
        DataError: not a cache file, or its contents do not match the recorded fingerprint.
    """
    path = Path(path)
    meta = _read_meta(path)
    table = pq.read_table(path)

    def column(name: str):
        value = table.column(name)[0]
        return None if not value.is_valid else value.values

    offsets = column("offsets").to_numpy().astype("int64")
    items = column("items").to_numpy().astype("int32")
    user_ids, item_ids = column("user_ids").to_pylist(), column("item_ids").to_pylist()
    text, genres = column("item_text"), column("item_genres")
    features = {f: column(f"user_feature:{f}").to_pylist() for f in meta["user_features"]}
    data = SequenceData(
        name=meta["name"], user_ids=user_ids, item_ids=item_ids, offsets=offsets, items=items,
        item_text=None if text is None else text.to_pylist(),
        item_genres=None if genres is None else genres.to_pylist(),
        user_features=features if meta["has_user_features"] else None,
        fingerprint=meta["fingerprint"], protocol=meta["protocol"],
    )
    if fingerprint(offsets, items, user_ids, item_ids) != meta["fingerprint"]:
        raise DataError(f"{path}: contents do not match the recorded fingerprint (damaged cache)")
    return data
