"""Read interaction logs: RecBole atomic files (`.inter/.item/.user`) here, CSV and Parquet in
`layerwise.data.tabular`; the `Interactions` table, `DataError` and the value checks they share.

Every reader returns an `Interactions` table of raw ids. Bad input raises `DataError` whose message names
the file, the 1-based line (for text files) and the problem. Parsing goes through pyarrow with explicit
column types, so a million rows take well under a second; only when pyarrow rejects a file (or a value is
empty or not finite) do we scan it line by line in Python, to name the offending line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_COLUMNS = ("movie_title", "title", "name")
GENRE_COLUMNS = ("class", "genre", "genres")


class DataError(ValueError):
    """Bad input data. The message names the file, the line where known, and what is wrong."""


def fail(path: Path | str, problem: str, line: int | None = None) -> DataError:
    """Build a `DataError` whose message reads `path, line N: problem`."""
    where = f"{path}" if line is None else f"{path}, line {line}"
    return DataError(f"{where}: {problem}")


@dataclass(frozen=True, eq=False)
class Interactions:
    """One interaction log, raw ids as read (nothing filtered, nothing re-indexed).

    Attributes:
        user: (n,) raw user ids (str).
        item: (n,) raw item ids (str).
        timestamp: (n,) float64 seconds; only their order matters.
        rating: (n,) float64 or None.
        item_meta: raw item id -> (title, genres) or None.
        user_features: feature name -> (raw user id -> value) or None.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray | None = None
    item_meta: dict[str, tuple[str, list[str]]] | None = None
    user_features: dict[str, dict[str, str]] | None = None

    def __post_init__(self) -> None:
        n = len(self.user)
        sizes = {"item": len(self.item), "timestamp": len(self.timestamp)}
        if self.rating is not None:
            sizes["rating"] = len(self.rating)
        bad = {k: v for k, v in sizes.items() if v != n}
        if bad:
            raise ValueError(f"Interactions columns differ in length: user has {n}, {bad}")
        if self.timestamp.dtype != np.float64:
            raise ValueError(f"timestamp must be float64, got {self.timestamp.dtype}")

    def __len__(self) -> int:
        return len(self.user)


# --------------------------------------------------------------------------- RecBole atomic files


def read_atomic(directory: Path | str, name: str) -> Interactions:
    """Read RecBole atomic files `{name}.inter` and, when present, `{name}.item` and `{name}.user`.

    Args:
        directory: folder holding the files.
        name: data set name, the files' common stem (e.g. "ml-100k").

    Returns:
        The interactions with item titles/genres and user features attached when their files exist.
    """
    directory = Path(directory)
    inter = directory / f"{name}.inter"
    cols = _read_atomic_file(
        inter,
        required={"user_id": ("token",), "item_id": ("token",), "timestamp": ("float",)},
        optional={"rating": ("float",)},
        ids=("user_id", "item_id"),
    )
    item_path, user_path = directory / f"{name}.item", directory / f"{name}.user"
    return Interactions(
        user=cols["user_id"].to_numpy(zero_copy_only=False),
        item=cols["item_id"].to_numpy(zero_copy_only=False),
        timestamp=cols["timestamp"].to_numpy(),
        rating=cols["rating"].to_numpy() if "rating" in cols else None,
        item_meta=_read_item_file(item_path) if item_path.exists() else None,
        user_features=_read_user_file(user_path) if user_path.exists() else None,
    )


def _read_item_file(path: Path) -> dict[str, tuple[str, list[str]]]:
    """`.item` -> {raw item id: (title, genres)}; genres are the space-separated tokens of `class`."""
    fields = read_atomic_header(path)
    names = [f for f, _ in fields]
    title = next((c for c in TITLE_COLUMNS if c in names), None)
    genre = next((c for c in GENRE_COLUMNS if c in names), None)
    optional = {c: ("token", "token_seq") for c in (title, genre) if c}
    cols = _read_atomic_file(path, {"item_id": ("token",)}, optional, ids=("item_id",), fields=fields)
    ids = cols["item_id"].to_pylist()
    _check_unique(path, ids, "item id")
    titles = cols[title].to_pylist() if title else [""] * len(ids)
    genres = [g.split() for g in cols[genre].to_pylist()] if genre else [[] for _ in ids]
    return {i: (t, g) for i, t, g in zip(ids, titles, genres)}


def _read_user_file(path: Path) -> dict[str, dict[str, str]]:
    """`.user` -> {feature: {raw user id: value}} for every column but user_id."""
    fields = read_atomic_header(path)
    optional = {f: ("token", "token_seq", "float") for f, _ in fields if f != "user_id"}
    cols = _read_atomic_file(path, {"user_id": ("token",)}, optional, ids=("user_id",), fields=fields,
                             as_text=True)
    ids = cols["user_id"].to_pylist()
    _check_unique(path, ids, "user id")
    return {f: dict(zip(ids, col.to_pylist())) for f, col in cols.items() if f != "user_id"}


def read_atomic_header(path: Path) -> list[tuple[str, str]]:
    """Parse and check an atomic file's typed header `name:type<TAB>name:type...`.

    Returns:
        [(column name, type)] in file order.
    """
    if not path.is_file():
        raise fail(path, "file not found")
    with open(path, "rb") as f:
        first = f.readline()
    text = first.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if not text.strip():
        raise fail(path, "empty file: expected a typed header such as "
                         "'user_id:token<TAB>item_id:token<TAB>timestamp:float'", line=1)
    fields: list[tuple[str, str]] = []
    for raw in text.split("\t"):
        name, sep, kind = raw.strip().partition(":")
        if not sep or not name:
            raise fail(path, f"header column {raw!r} is not of the form 'name:type'", line=1)
        if kind not in ATOMIC_TYPES:
            raise fail(path, f"header column {raw!r} has unknown type {kind!r}; "
                             f"expected one of {', '.join(ATOMIC_TYPES)}", line=1)
        if any(name == seen for seen, _ in fields):
            raise fail(path, f"duplicate column {name!r} in the header", line=1)
        fields.append((name, kind))
    return fields


def _read_atomic_file(
    path: Path,
    required: dict[str, tuple[str, ...]],
    optional: dict[str, tuple[str, ...]],
    ids: tuple[str, ...],
    fields: list[tuple[str, str]] | None = None,
    as_text: bool = False,
) -> dict[str, pa.Array]:
    """Read the wanted columns of one atomic file, checking declared types and every value."""
    fields = fields if fields is not None else read_atomic_header(path)
    kinds = dict(fields)
    for col in required:
        if col not in kinds:
            raise fail(path, f"missing column {col!r} (the header has {', '.join(kinds)})", line=1)
    for col, allowed in {**required, **optional}.items():
        if col in kinds and kinds[col] not in allowed:
            raise fail(path, f"column {col!r} is declared :{kinds[col]}, expected "
                             f"{' or '.join(':' + a for a in allowed)}", line=1)
    wanted = [c for c in {**required, **optional} if c in kinds]
    types = {c: pa.float64() if kinds[c] == "float" and not as_text else pa.string() for c in wanted}
    names = [f for f, _ in fields]
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=names),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=convert_options(types, wanted),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        _scan_atomic(path, names, types, ids)
        raise fail(path, f"could not parse: {err}") from err
    if table.num_rows == 0:
        raise fail(path, "header only: the file has no data rows", line=1)
    cols = {c: table.column(c).combine_chunks() for c in wanted}
    if not values_ok(cols, types, ids):
        _scan_atomic(path, names, types, ids)
        raise fail(path, "an id is empty or a number is not finite")  # the scan should have named the line
    return cols


def convert_options(types: dict[str, pa.DataType], wanted: list[str]) -> pacsv.ConvertOptions:
    """pyarrow CSV options that read exactly `wanted` with `types` and accept no value as null."""
    # No null spellings: an empty or "NA" value must fail loudly, never turn into a silent null.
    return pacsv.ConvertOptions(column_types=types, include_columns=wanted, null_values=[],
                                strings_can_be_null=False, quoted_strings_can_be_null=False)


def values_ok(cols: dict[str, pa.Array], types: dict[str, pa.DataType], ids: tuple[str, ...]) -> bool:
    """True when no id is empty and every float is finite (the cheap, vectorised check)."""
    for c in ids:
        if c in cols and pc.any(pc.equal(pc.utf8_length(cols[c]), 0)).as_py():
            return False
    floats = [c for c, t in types.items() if t == pa.float64()]
    return all(pc.all(pc.is_finite(cols[c])).as_py() for c in floats)


def _scan_atomic(path: Path, names: list[str], types: dict[str, pa.DataType], ids: tuple[str, ...]) -> None:
    """Walk a tab-separated file line by line and raise `DataError` at the first bad line."""
    with open(path, "rb") as f:  # bytes, decoded per line, so a bad byte is pinned to its line
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                continue
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise fail(path, f"not valid UTF-8 ({err.reason} at byte {err.start})", line=lineno) from None
            if line:  # pyarrow skips empty lines too
                fields = line.split("\t")
                check_row(path, lineno, dict(zip(names, fields)), len(fields), len(names), types, ids)


def check_row(path: Path, lineno: int, row: dict[str, str], n_got: int, n_want: int,
               types: dict[str, pa.DataType], ids: tuple[str, ...]) -> None:
    """Raise at this line if it has the wrong field count, an empty id or a bad number."""
    if n_got != n_want:
        raise fail(path, f"expected {n_want} fields, got {n_got}", line=lineno)
    for c in ids:
        if not row[c].strip():
            raise fail(path, f"empty {c}", line=lineno)
    for c, t in types.items():
        if t != pa.float64():
            continue
        try:
            value = float(row[c])
        except ValueError:
            raise fail(path, f"non-numeric {c} {row[c]!r}", line=lineno) from None
        if not math.isfinite(value):
            raise fail(path, f"non-finite {c} {row[c]!r}", line=lineno)


def _check_unique(path: Path, ids: list[str], what: str) -> None:
    """Raise naming the line of the first repeated id (header is line 1, blank lines skipped)."""
    if len(set(ids)) == len(ids):
        return
    seen: set[str] = set()
    for row, i in enumerate(ids):
        if i in seen:
            raise fail(path, f"duplicate {what} {i!r}", line=_line_of_row(path, row))
        seen.add(i)


def _line_of_row(path: Path, row: int) -> int:
    """1-based line number of data row `row` (0-based), counting the header and skipping blank lines."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        seen = -1
        for lineno, line in enumerate(f, start=1):
            if lineno > 1 and line.rstrip("\r\n"):
                seen += 1
                if seen == row:
                    return lineno
    return lineno
