"""Read interaction logs from CSV (.csv, .tsv) and Parquet (.parquet, .pq) files with named columns.

    inter = read_table("ratings.csv", user_col="userId", item_col="movieId", time_col="timestamp")

Same contract as the atomic-file reader (`layerwise.data.readers`): an `Interactions` table of raw ids, and a
`DataError` naming the file, the line (or row) and the problem.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from layerwise.data.readers import Interactions, check_row, convert_options, fail, values_ok


def read_table(
    path: Path | str,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    rating_col: str | None = None,
) -> Interactions:
    """Read a CSV (.csv, .tsv) or Parquet (.parquet, .pq) file with named columns.

    Args:
        path: the file.
        user_col, item_col, time_col: column names; ids may be numbers or strings, times must be numbers
            (seconds) or, in Parquet, timestamps/dates.
        rating_col: optional rating column.
    """
    path = Path(path)
    if not path.is_file():
        raise fail(path, "file not found")
    cols = {"user": user_col, "item": item_col, "timestamp": time_col}
    if rating_col:
        cols["rating"] = rating_col
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = _read_csv_columns(path, cols, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".parquet", ".pq"):
        table = _read_parquet_columns(path, cols)
    else:
        raise fail(path, f"unsupported file type {suffix!r}: expected .csv, .tsv, .parquet or .pq")
    return Interactions(
        user=table["user"].to_numpy(zero_copy_only=False),
        item=table["item"].to_numpy(zero_copy_only=False),
        timestamp=table["timestamp"].to_numpy(),
        rating=table["rating"].to_numpy() if "rating" in table else None,
    )


def _read_csv_columns(path: Path, cols: dict[str, str], delimiter: str) -> dict[str, pa.Array]:
    """Read the named CSV columns with explicit types; returns {role: array}."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
    except UnicodeDecodeError as err:
        raise fail(path, f"not valid UTF-8 ({err.reason}) in the first block") from None
    if not header or not any(h.strip() for h in header):
        raise fail(path, "empty file: expected a header row naming the columns", line=1)
    dup = next((h for i, h in enumerate(header) if h in header[:i]), None)
    if dup is not None:
        raise fail(path, f"duplicate column {dup!r} in the header", line=1)
    for role, col in cols.items():
        if col not in header:
            raise fail(path, f"missing {role} column {col!r} (the header has {', '.join(header)})", line=1)
    types = {c: pa.float64() if role in ("timestamp", "rating") else pa.string() for role, c in cols.items()}
    try:
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                               convert_options=convert_options(types, list(types)))
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        _scan_csv(path, header, types, (cols["user"], cols["item"]), delimiter)
        raise fail(path, f"could not parse: {err}") from err
    if table.num_rows == 0:
        raise fail(path, "header only: the file has no data rows", line=1)
    out = {role: table.column(c).combine_chunks() for role, c in cols.items()}
    if not values_ok({c: table.column(c).combine_chunks() for c in types}, types, (cols["user"], cols["item"])):
        _scan_csv(path, header, types, (cols["user"], cols["item"]), delimiter)
        raise fail(path, "an id is empty or a number is not finite")
    return out


def _scan_csv(path: Path, header: list[str], types: dict[str, pa.DataType], ids: tuple[str, ...],
              delimiter: str) -> None:
    """Walk a CSV with the csv module (which honours quoting) and raise at the first bad line."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            next(reader, None)
            for fields in reader:
                if fields:
                    check_row(path, reader.line_num, dict(zip(header, fields)), len(fields), len(header),
                               types, ids)
        except UnicodeDecodeError as err:  # text mode decodes ahead in blocks: the line is approximate
            raise fail(path, f"not valid UTF-8 ({err.reason}) after line {reader.line_num}") from None


def _read_parquet_columns(path: Path, cols: dict[str, str]) -> dict[str, pa.Array]:
    """Read the named Parquet columns, casting ids to strings and times to float64 seconds."""
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as err:
        raise fail(path, f"not a readable Parquet file ({err})") from err
    dup = next((h for i, h in enumerate(names) if h in names[:i]), None)
    if dup is not None:
        raise fail(path, f"duplicate column {dup!r}")
    for role, col in cols.items():
        if col not in names:
            raise fail(path, f"missing {role} column {col!r} (the file has {', '.join(names) or 'no columns'})")
    table = pq.read_table(path, columns=list(dict.fromkeys(cols.values())))
    if table.num_rows == 0:
        raise fail(path, "the file has no rows")
    out = {}
    for role, col in cols.items():
        arr = table.column(col).combine_chunks()
        null = _first(pc.is_null(arr))
        if null is not None:
            raise fail(path, f"null {col} at row {null + 1}")
        out[role] = _parquet_ids(path, col, arr) if role in ("user", "item") else _parquet_numbers(path, col, arr)
    return out


def _first(mask: pa.Array) -> int | None:
    """Index of the first true value of a boolean array, or None."""
    hits = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    return int(hits[0]) if len(hits) else None


def _parquet_ids(path: Path, col: str, arr: pa.Array) -> pa.Array:
    if not (pa.types.is_integer(arr.type) or pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise fail(path, f"column {col!r} has type {arr.type}; ids must be integers or strings")
    arr = pc.cast(arr, pa.string())
    empty = _first(pc.equal(pc.utf8_length(arr), 0))
    if empty is not None:
        raise fail(path, f"empty {col} at row {empty + 1}")
    return arr


def _parquet_numbers(path: Path, col: str, arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_timestamp(t):
        scale = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[t.unit]
        arr = pc.divide(pc.cast(pc.cast(arr, pa.int64()), pa.float64()), scale)
    elif pa.types.is_date(t):
        arr = pc.multiply(pc.cast(pc.cast(arr, pa.date32()).cast(pa.int32()), pa.float64()), 86400.0)
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        arr = pc.cast(arr, pa.float64())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        values = arr.to_pylist()
        for row, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise fail(path, f"non-numeric {col} {v!r} at row {row + 1}") from None
        arr = pc.cast(arr, pa.float64())
    else:
        raise fail(path, f"column {col!r} has type {t}; expected numbers or timestamps")
    bad = _first(pc.invert(pc.is_finite(arr)))
    if bad is not None:
        raise fail(path, f"non-finite {col} at row {bad + 1}")
    return arr
