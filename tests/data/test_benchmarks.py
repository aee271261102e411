"""The named benchmarks: the local folder, the checksum, the download path (local HTTP only), the stats.

The real files live in ../shared/data/amazon-yelp/ beside the repository, never inside it. Downloads are
served by an `http.server` on 127.0.0.1 or refused by a closed port on 127.0.0.1: no test leaves the host.
"""

import functools
import hashlib
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from layerwise.data import BENCHMARKS, DataError, benchmark_stats, format_stats_table, load_dataset
from layerwise.data import LITERATURE_METRICS, resolve_benchmark
from layerwise.evaluation.evaluate import evaluate

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "amazon-yelp"
needs_shared = pytest.mark.skipif(not (SHARED / "Beauty.txt").is_file(),
                                  reason=f"the benchmark files are not in {SHARED}")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LAYERWISE_DATA_DIR", raising=False)
    monkeypatch.delenv("LAYERWISE_CACHE_DIR", raising=False)


def _closed_port_url() -> str:
    """A 127.0.0.1 URL nobody listens on: the connection is refused at once, no network involved."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data"


@pytest.fixture
def serve(tmp_path):
    """Start a real HTTP server on 127.0.0.1 for a folder; yields a function folder -> base URL."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # A short poll interval makes shutdown() at teardown quick (the default waits up to 0.5 s).
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@needs_shared
def test_local_folder_wins_and_loads_with_the_literature_split(tmp_path):
    path = resolve_benchmark("beauty", SHARED, base_url=_closed_port_url(), cache_dir=tmp_path / "c")
    assert path == SHARED / "Beauty.txt"
    data = load_dataset("beauty", data_dir=SHARED)
    assert (data.name, data.n_users, data.n_items, len(data.items)) == ("beauty", 22_363, 12_101, 198_502)
    lines = (SHARED / "Beauty.txt").read_text().splitlines()
    first = lines[0].split()  # "1 1 2 3 4 5": user 1, items oldest first
    assert data.user_ids[0] == first[0] and [data.item_ids[i] for i in data.sequence(0)] == first[1:]
    # Leave-one-out on line order, for every user: the last item is test, the one before it validation.
    by_user = {line.split()[0]: line.split()[1:] for line in lines}
    test = [data.item_ids[i] for i in data.targets("test")]
    valid = [data.item_ids[i] for i in data.targets("valid")]
    assert test == [by_user[u][-1] for u in data.user_ids]
    assert valid == [by_user[u][-2] for u in data.user_ids]
    assert data.protocol["dropped"]["interactions"] == 0


@needs_shared
def test_env_var_and_the_amazon_yelp_subfolder(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_DATA_DIR", str(SHARED.parent))  # .../data, holding amazon-yelp/
    path = resolve_benchmark("toys", base_url=_closed_port_url(), cache_dir=tmp_path / "c")
    assert path == SHARED.parent / "amazon-yelp" / "Toys_and_Games.txt"


@needs_shared
def test_stats_match_the_published_table():
    rows = benchmark_stats(data_dir=SHARED, base_url=_closed_port_url())
    assert [r["name"] for r in rows] == ["beauty", "sports", "toys", "yelp"]
    assert [(r["users"], r["items"], r["interactions"]) for r in rows] == [
        (22_363, 12_101, 198_502), (35_598, 18_357, 296_337), (19_412, 11_924, 167_597), (30_431, 20_033, 316_354)]
    assert all(r["matches"] for r in rows)
    table = format_stats_table(rows)
    assert table.splitlines()[2] == "| Beauty.txt | 22,363 | 12,101 | 198,502 |"
    assert table.splitlines()[5] == "| Yelp.txt | 30,431 | 20,033 | 316,354 |"


def test_local_checksum_mismatch_is_an_error_and_the_file_is_not_used(tmp_path):
    local = tmp_path / "data"
    local.mkdir()
    (local / "Beauty.txt").write_text("1 1 2 3\n")
    with pytest.raises(DataError) as info:
        resolve_benchmark("beauty", local, base_url=_closed_port_url(), cache_dir=tmp_path / "c")
    msg = str(info.value)
    wrong = hashlib.sha256(b"1 1 2 3\n").hexdigest()
    assert msg.startswith(f"{local / 'Beauty.txt'}: sha256 {wrong} does not match the published "
                          f"{BENCHMARKS['beauty'].sha256}")
    assert "it was not used" in msg
    with pytest.raises(DataError, match="does not match"):  # nothing is cached from it either
        load_dataset("beauty", data_dir=local, cache_dir=tmp_path / "split")
    assert not (tmp_path / "split").exists()


def test_offline_names_the_folders_and_where_to_put_the_file(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DataError) as info:
        resolve_benchmark("yelp", tmp_path / "empty", progress=False, base_url=url, cache_dir=tmp_path / "c",
                          timeout=2.0)
    msg = str(info.value)
    assert msg.startswith(f"yelp: Yelp.txt was not found in {tmp_path / 'empty'}, {tmp_path / 'c'}, "
                          f"and the download from {url}/Yelp.txt failed")
    assert "LAYERWISE_DATA_DIR" in msg and BENCHMARKS["yelp"].sha256 in msg
    assert str(tmp_path / "c" / "amazon-yelp" / "Yelp.txt") in msg
    assert not (tmp_path / "c").exists()


def test_downloaded_mismatch_is_an_error_and_nothing_is_kept(tmp_path, serve):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    (upstream / "Sports_and_Outdoors.txt").write_text("1 1 2 3\n2 4 5 6\n")  # the wrong bytes
    base = serve(upstream)
    cache = tmp_path / "c"
    with pytest.raises(DataError) as info:
        resolve_benchmark("sports", tmp_path / "empty", progress=False, base_url=base, cache_dir=cache)
    msg = str(info.value)
    assert msg.startswith(f"{base}/Sports_and_Outdoors.txt: sha256 ")
    assert f"does not match the published {BENCHMARKS['sports'].sha256}" in msg and "not kept" in msg
    folder = cache / "amazon-yelp"
    assert not folder.exists() or list(folder.iterdir()) == []  # no file, no temporary file


@needs_shared
def test_download_with_matching_checksum_lands_in_the_cache(tmp_path, serve):
    cache = tmp_path / "c"
    path = resolve_benchmark("toys", tmp_path / "empty", progress=False, base_url=serve(SHARED),
                             cache_dir=cache)
    assert path == cache / "amazon-yelp" / "Toys_and_Games.txt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["Toys_and_Games.txt"]
    assert path.read_bytes() == (SHARED / "Toys_and_Games.txt").read_bytes()
    # Found in the cache afterwards, without the network.
    assert resolve_benchmark("toys", tmp_path / "empty", base_url=_closed_port_url(), cache_dir=cache) == path


def test_unknown_benchmark_name():
    with pytest.raises(DataError, match="unknown benchmark 'movies': expected one of beauty, sports, toys, yelp"):
        resolve_benchmark("movies")


@needs_shared
def test_split_cache_round_trip_keeps_the_fingerprint(tmp_path):
    first = load_dataset("toys", data_dir=SHARED, cache_dir=tmp_path / "split")
    again = load_dataset("toys", data_dir=SHARED, cache_dir=tmp_path / "split")
    assert again.fingerprint == first.fingerprint
    assert np.array_equal(again.items, first.items) and len(list((tmp_path / "split").glob("toys-*"))) == 1


def test_literature_protocol_is_the_evaluation_default(tmp_path):
    """Leave-one-out on line order, the last 50 items as history, full ranking, the history excluded."""
    path = tmp_path / "s.txt"
    path.write_text("1 " + " ".join(str(i) for i in range(1, 61)) + "\n2 61 62 63 5\n")
    data = load_dataset(f"seqfile:{path}")
    assert data.item_ids[1:] == [str(i) for i in range(1, 64)]  # index i is raw item i
    seen = []

    def by_id(histories):  # higher item ids score higher, whatever the history
        seen.append(histories.clone())
        return torch.arange(64, dtype=torch.float32).expand(len(histories), -1)

    result = evaluate(by_id, data)
    # evaluate calls the scorer in order of history length (layerwise.data.batching); the results below
    # come back in user order.
    rows = [row.tolist() for row in seen[0]]
    assert list(range(10, 60)) in rows  # user 1: the 50 items before the target 60
    assert [0] * 47 + [61, 62, 63] in rows and len(rows) == 2
    # User 1: 1..59 are excluded, 61-63 beat 60: rank 3. User 2: 61-63 are excluded, 6..60 beat 5: rank 55.
    assert set(LITERATURE_METRICS) <= set(result.means)
    assert result.per_user["hr@5"].tolist() == [1.0, 0.0] and result.per_user["hr@20"].tolist() == [1.0, 0.0]
    assert result.per_user["ndcg@10"].tolist() == pytest.approx([1 / np.log2(5), 0.0])
    assert result.per_user["mrr"].tolist() == pytest.approx([1 / 4, 1 / 56])  # 1 / 59 if 61-63 were ranked
    assert result.protocol["ranking"] == "full" and result.protocol["exclude_seen"] is True
    assert result.protocol["max_len"] == 50 and result.protocol["stage"] == "test"
