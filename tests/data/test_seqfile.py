"""The one-line-per-user sequence reader: positions follow line order; bad lines are named; nothing cached."""

from pathlib import Path

import numpy as np
import pytest

from layerwise.data import DataError, build_sequences, load_dataset, read_seqfile
from tests.data.conftest import write_lines


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LAYERWISE_DATA_DIR", raising=False)
    monkeypatch.delenv("LAYERWISE_CACHE_DIR", raising=False)


def _error(path: Path) -> str:
    with pytest.raises(DataError) as info:
        read_seqfile(path)
    return str(info.value)


def test_positions_replace_timestamps_and_ids_are_canonical(tmp_path):
    path = write_lines(tmp_path / "s.txt", ["7 30 10 20", "3 5 05 9 1"])
    log = read_seqfile(path)
    assert log.user.tolist() == ["7"] * 3 + ["3"] * 4
    assert log.item.tolist() == ["30", "10", "20", "5", "5", "9", "1"]  # "05" is item 5
    assert log.timestamp.dtype == np.float64
    assert log.timestamp.tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert log.rating is None and log.item_meta is None


def test_leave_one_out_follows_line_order_not_id_order(tmp_path):
    # Items in descending id order: a split by id would pick 2 as test; line order picks the last, 1.
    path = write_lines(tmp_path / "s.txt", ["1 9 7 5 3 1", "2 4 8 6"])
    data = build_sequences(read_seqfile(path), "s")
    raw = lambda idx: [data.item_ids[i] for i in np.atleast_1d(idx)]  # noqa: E731
    assert raw(data.sequence(0)) == ["9", "7", "5", "3", "1"]
    assert raw(data.targets("test")) == ["1", "6"]
    assert raw(data.targets("valid")) == ["3", "8"]
    assert raw(data.history(1, "test")) == ["4", "8"]


def test_windows_line_endings_and_tabs_are_whitespace(tmp_path):
    path = tmp_path / "s.txt"
    path.write_bytes(b"1\t2 3  4\r\n2 5 6 7")  # no newline at the end of the last line either
    log = read_seqfile(path)
    assert log.item.tolist() == ["2", "3", "4", "5", "6", "7"]


@pytest.mark.parametrize("token, shown", [("x", "'x'"), ("1.5", "'1.5'"), ("-3", "'-3'"), ("٣", "'٣'")])
def test_non_integer_item_names_file_line_and_token(tmp_path, token, shown):
    path = write_lines(tmp_path / "s.txt", ["1 2 3 4", f"2 5 {token} 6 7"])
    msg = _error(path)
    assert msg.startswith(f"{path}, line 2: item 2 {shown} is not a non-negative integer")


def test_non_integer_user_id(tmp_path):
    path = write_lines(tmp_path / "s.txt", ["u1 2 3 4"])
    assert _error(path) == f"{path}, line 1: user id 'u1' is not a non-negative integer"


def test_duplicate_user_names_both_lines(tmp_path):
    path = write_lines(tmp_path / "s.txt", ["1 2 3 4", "2 5 6 7", "01 8 9 10"])
    msg = _error(path)
    assert msg.startswith(f"{path}, line 3: user 1 has a second line (the first is line 1)")


@pytest.mark.parametrize("lines, bad", [(["1 2 3 4", "", "2 5 6 7"], 2), (["1 2 3 4", "   "], 2),
                                        (["1 2 3 4", "2 5 6 7", ""], 3)])
def test_empty_line_names_its_line(tmp_path, lines, bad):
    path = write_lines(tmp_path / "s.txt", lines)
    assert _error(path).startswith(f"{path}, line {bad}: empty line")


@pytest.mark.parametrize("line, n", [("2 5 6", 2), ("2", 0)])
def test_user_with_fewer_than_three_items(tmp_path, line, n):
    path = write_lines(tmp_path / "s.txt", ["1 2 3 4", line])
    msg = _error(path)
    assert msg.startswith(f"{path}, line 2: user 2 has {n} item(s); leave-one-out needs at least 3")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert _error(empty).startswith(f"{empty}: empty file")
    assert _error(tmp_path / "nope.txt") == f"{tmp_path / 'nope.txt'}: file not found"


def test_bad_file_leaves_no_cache_entry_and_a_fixed_one_is_reread(tmp_path):
    path = write_lines(tmp_path / "s.txt", ["1 2 3 4", "2 5 x 7"])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="line 2"):
        load_dataset(f"seqfile:{path}", cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())
    write_lines(path, ["1 2 3 4", "2 5 6 7"])
    first = load_dataset(f"seqfile:{path}", cache_dir=cache)
    assert (first.name, first.n_users, first.n_items) == ("s", 2, 6)
    assert len(list(cache.glob("s-*.parquet"))) == 1
    # The cache is keyed by the file's content: an edited file is read again, not served stale.
    write_lines(path, ["1 2 3 4", "2 5 6 7 8"])
    assert load_dataset(f"seqfile:{path}", cache_dir=cache).n_items == 7


def test_relative_seqfile_is_looked_up_in_data_dir(tmp_path):
    write_lines(tmp_path / "s.txt", ["1 2 3 4"])
    assert load_dataset("seqfile:s.txt", data_dir=tmp_path).n_users == 1
    with pytest.raises(DataError, match="file not found"):
        load_dataset("seqfile:absent.txt", data_dir=tmp_path)
