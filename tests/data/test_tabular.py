"""CSV and Parquet: good files parse; every kind of bad input names the file, the line (or row) and the problem."""

import pyarrow as pa
import pyarrow.parquet as pq

from layerwise.data import read_table
from tests.helpers.data_files import error_of, write_lines


def test_read_csv_with_named_columns(tmp_path):
    path = write_lines(tmp_path / "log.csv", ["uid,when,iid,extra", "7,100.5,a,x", '8,200,"b,c",y'])
    data = read_table(path, user_col="uid", item_col="iid", time_col="when")
    assert data.user.tolist() == ["7", "8"] and data.item.tolist() == ["a", "b,c"]
    assert data.timestamp.tolist() == [100.5, 200.0] and data.rating is None


def test_csv_missing_file(tmp_path):
    msg = error_of(read_table, tmp_path / "none.csv")
    assert str(tmp_path / "none.csv") in msg and "file not found" in msg


def test_csv_missing_column(tmp_path):
    path = write_lines(tmp_path / "log.csv", ["user_id,item_id,time", "1,2,3"])
    msg = error_of(read_table, path)
    assert f"{path}, line 1" in msg and "missing timestamp column 'timestamp'" in msg


def test_csv_non_numeric_timestamp_names_line(tmp_path):
    path = write_lines(tmp_path / "log.csv", ["user_id,item_id,timestamp", "1,2,3", "1,3,4", "1,4,2021-01-01"])
    msg = error_of(read_table, path)
    assert f"{path}, line 4" in msg and "non-numeric timestamp '2021-01-01'" in msg


def test_csv_empty_file(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("")
    msg = error_of(read_table, path)
    assert f"{path}, line 1" in msg and "empty file" in msg


def test_csv_header_only(tmp_path):
    path = write_lines(tmp_path / "log.csv", ["user_id,item_id,timestamp"])
    msg = error_of(read_table, path)
    assert f"{path}, line 1" in msg and "header only" in msg


def test_csv_duplicate_column(tmp_path):
    path = write_lines(tmp_path / "log.csv", ["user_id,item_id,user_id,timestamp", "1,2,1,3"])
    msg = error_of(read_table, path)
    assert f"{path}, line 1" in msg and "duplicate column 'user_id'" in msg


def test_unsupported_suffix(tmp_path):
    path = write_lines(tmp_path / "log.json", ["{}"])
    assert "unsupported file type '.json'" in error_of(read_table, path)


def test_read_parquet_casts_ids_and_timestamps(tmp_path):
    path = tmp_path / "log.parquet"
    when = pa.array([1_000_000_000_000, 2_000_000_000_000], type=pa.timestamp("ms"))
    pq.write_table(pa.table({"user_id": [1, 2], "item_id": ["x", "y"], "timestamp": when}), path)
    data = read_table(path)
    assert data.user.tolist() == ["1", "2"] and data.item.tolist() == ["x", "y"]
    assert data.timestamp.tolist() == [1e9, 2e9]


def test_parquet_non_numeric_timestamp_names_row(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["1", "2"], "item_id": ["x", "y"], "timestamp": ["5", "soon"]}), path)
    msg = error_of(read_table, path)
    assert str(path) in msg and "non-numeric timestamp 'soon' at row 2" in msg


def test_parquet_null_id_names_row(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["1", None], "item_id": ["x", "y"], "timestamp": [1.0, 2.0]}), path)
    assert "null user_id at row 2" in error_of(read_table, path)


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["1"], "item_id": ["x"]}), path)
    msg = error_of(read_table, path)
    assert str(path) in msg and "missing timestamp column 'timestamp'" in msg


def test_parquet_not_a_parquet_file(tmp_path):
    path = write_lines(tmp_path / "log.parquet", ["user_id,item_id,timestamp"])
    assert "not a readable Parquet file" in error_of(read_table, path)


# ----------------------------------------------------------------------------- writing atomic files
