"""RecBole atomic files: good files parse; every kind of bad input names the file, the line and the problem."""

from pathlib import Path

import numpy as np

from layerwise.data import Interactions, read_atomic, write_atomic
from tests.helpers.data_files import error_of, write_lines

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def _inter(tmp_path: Path, lines: list[str], name: str = "x") -> Path:
    write_lines(tmp_path / f"{name}.inter", lines)
    return tmp_path / f"{name}.inter"


def test_read_atomic_parses_columns_and_metadata(tiny_atomic):
    data = read_atomic(tiny_atomic, "tiny")
    assert len(data) == 9
    assert data.user[:3].tolist() == ["a", "a", "b"]
    assert data.item[:3].tolist() == ["9", "2", "3"]
    assert data.timestamp.dtype == np.float64 and data.timestamp[:3].tolist() == [3.0, 1.0, 5.0]
    assert data.rating[:3].tolist() == [4.0, 5.0, 3.0]
    assert data.item_meta == {"1": ("Alpha", ["Drama"]), "2": ("Beta", ["Comedy", "Drama"]), "9": ("Gamma", [])}
    assert data.user_features == {"age": {"a": "24", "b": "53"}, "gender": {"a": "M", "b": "F"}}


def test_missing_inter_file(tmp_path):
    msg = error_of(read_atomic, tmp_path, "nope")
    assert str(tmp_path / "nope.inter") in msg and "file not found" in msg


def test_missing_column_names_file_line_and_column(tmp_path):
    path = _inter(tmp_path, ["user_id:token\titem_id:token\trating:float", "1\t2\t3"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 1" in msg and "missing column 'timestamp'" in msg


def test_non_numeric_timestamp_names_line(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER, "1\t2\t3\t100", "1\t3\t3\tyesterday", "1\t4\t3\t300"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 3" in msg and "non-numeric timestamp 'yesterday'" in msg


def test_non_numeric_rating_names_line(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER, "1\t2\tgood\t100"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 2" in msg and "non-numeric rating 'good'" in msg


def test_non_finite_timestamp_names_line(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER, "1\t2\t3\t100", "1\t3\t3\tnan"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 3" in msg and "non-finite timestamp 'nan'" in msg


def test_empty_value_in_float_column_names_line(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER, "1\t2\t3\t"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 2" in msg and "non-numeric timestamp ''" in msg


def test_line_numbers_count_blank_lines(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER, "1\t2\t3\t100", "", "1\t3\t3\tbad"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 4" in msg


def test_wrong_field_count_names_line(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER, "1\t2\t3\t100", "1\t2\t3\t4", "1\t5\t100"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 4" in msg and "expected 4 fields, got 3" in msg


def test_empty_user_id_names_line(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER, "1\t2\t3\t100", "\t2\t3\t100"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 3" in msg and "empty user_id" in msg


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "x.inter"
    path.write_bytes((INTER_HEADER + "\n1\t2\t3\t100\n").encode() + b"\xff\xfe\t2\t3\t100\n")
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 3" in msg and "not valid UTF-8" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "x.inter"
    path.write_bytes(b"")
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 1" in msg and "empty file" in msg


def test_header_only(tmp_path):
    path = _inter(tmp_path, [INTER_HEADER])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 1" in msg and "header only" in msg


def test_duplicate_column(tmp_path):
    path = _inter(tmp_path, ["user_id:token\titem_id:token\titem_id:token\ttimestamp:float", "1\t2\t2\t3"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 1" in msg and "duplicate column 'item_id'" in msg


def test_unknown_header_type(tmp_path):
    path = _inter(tmp_path, ["user_id:token\titem_id:token\ttimestamp:decimal", "1\t2\t3"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 1" in msg and "unknown type 'decimal'" in msg


def test_untyped_header(tmp_path):
    path = _inter(tmp_path, ["user_id\titem_id\ttimestamp", "1\t2\t3"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 1" in msg and "'user_id' is not of the form 'name:type'" in msg


def test_wrong_declared_type(tmp_path):
    path = _inter(tmp_path, ["user_id:token\titem_id:token\ttimestamp:token", "1\t2\t3"])
    msg = error_of(read_atomic, tmp_path, "x")
    assert f"{path}, line 1" in msg and "'timestamp' is declared :token, expected :float" in msg


def test_duplicate_item_in_item_file_names_line(tiny_atomic):
    item = tiny_atomic / "tiny.item"
    item.write_text(item.read_text() + "2\tBeta again\t1991\tDrama\n")
    msg = error_of(read_atomic, tiny_atomic, "tiny")
    assert f"{item}, line 5" in msg and "duplicate item id '2'" in msg


def test_item_file_without_item_id(tiny_atomic):
    item = write_lines(tiny_atomic / "tiny.item", ["movie_title:token_seq", "Alpha"])
    msg = error_of(read_atomic, tiny_atomic, "tiny")
    assert f"{item}, line 1" in msg and "missing column 'item_id'" in msg


# ----------------------------------------------------------------------------- CSV and Parquet


def test_write_atomic_keeps_quotes_literally(tmp_path):
    log = Interactions(np.array(['say "hi"', "b"]), np.array(["x", "y"]), np.array([1.5, 2.0]),
                       rating=np.array([4.0, 3.0]))
    write_atomic(log, tmp_path, "q")
    back = read_atomic(tmp_path, "q")
    assert back.user.tolist() == ['say "hi"', "b"] and back.timestamp.tolist() == [1.5, 2.0]
    assert back.rating.tolist() == [4.0, 3.0]


def test_write_atomic_refuses_tabs_and_leaves_nothing(tmp_path):
    log = Interactions(np.array(["a", "b\tc"]), np.array(["x", "y"]), np.array([1.0, 2.0]))
    msg = error_of(write_atomic, log, tmp_path, "t")
    assert f"{tmp_path / 't.inter'}, line 3" in msg and "contains a tab or newline" in msg
    assert list(tmp_path.iterdir()) == []
