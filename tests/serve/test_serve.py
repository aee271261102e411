"""The real Serve application on 127.0.0.1: a tiny trained llama teacher and its compact model, served by a
local Ray instance. Bad input of every kind, exact agreement with the library's `recommend`, dynamic
batching, and a small load run of the compact model and the teacher."""

import http.client
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import torch
from ray import serve

from layerwise.compression.compact import build_compact, load_compact, save_compact
from layerwise.data import load_dataset
from layerwise.evaluation.evaluate import recommend
from layerwise.models import SequentialRecommender, build_backbone, preset_config
from layerwise.models.checkpoint import save_recommender
from layerwise.perf.guard import GROWTH
from layerwise.training.train import TrainConfig, train_recommender
from serve import loadtest
from serve.app import build_app, proxy_admission, serve_main
from serve.capacity import ADMISSION_VARIABLE, proxy_environment

pytestmark = pytest.mark.slow

DATASET = "synthetic:300:120:6000:0"
MAX_LEN = 20
MAX_BODY = 16_384
MAX_HISTORY = 200


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 4-layer tiny llama trained for 2 epochs, and its compact model (layers 0 and 3, rank-4 bridge)."""
    root = tmp_path_factory.mktemp("serve_models")
    data = load_dataset(DATASET, cache_dir=root / "cache", progress=False)
    torch.manual_seed(0)
    config = preset_config("llama", "tiny", max_len=MAX_LEN, dropout=0.0, n_layers=4)
    teacher = SequentialRecommender(build_backbone(config), data.n_items, dropout=0.0)
    train_recommender(teacher, data, TrainConfig(epochs=2, batch_size=64, lr=5e-3, max_len=MAX_LEN,
                                                 eval_every=1, patience=5), progress=False)
    teacher.eval()
    manifest = {"dataset": DATASET, "data_fingerprint": data.fingerprint, "max_len": MAX_LEN}
    save_recommender(teacher, root / "teacher", {"kind": "teacher", **manifest})
    compact = build_compact(teacher, keep=[0, 3], bridge_rank=4)
    save_compact(compact, root / "compact", {**manifest, "metrics": {"ndcg@10": 0.25}, "speedup": 1.7})
    return {"root": root, "teacher": root / "teacher", "compact": root / "compact", "data": data,
            "model": load_compact(root / "compact")}


@pytest.fixture(scope="module")
def server(models):
    """Serve on a free loopback port, started through `serve_main` as `layerwise serve` will."""
    started = not ray.is_initialized()
    options = {"cache_dir": str(models["root"] / "cache"), "max_batch_size": 8, "batch_wait_timeout_s": 0.1,
               "max_body_bytes": MAX_BODY, "max_history": MAX_HISTORY}
    if started:
        # The proxy reads the gate's limits from the environment Ray starts with: these, as serve_main sets
        # them, not what another test left there.
        proxy_environment(proxy_admission(1, options))
        # address="local": never join a cluster another test process started (pytest-xdist runs two).
        ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False)
    port = loadtest.free_port()
    url = serve_main(str(models["compact"]), port=port, num_cpus=0.5, blocking=False, **options)
    os.environ.pop(ADMISSION_VARIABLE, None)  # Ray has it; a Ray another module starts later must not
    yield {"url": url, "port": port}
    serve.shutdown()
    if started:
        ray.shutdown()


def call(port, method, path, body=None, headers=None, chunked=False):
    """One HTTP request to 127.0.0.1; returns (status, parsed JSON or raw text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        if chunked:
            conn.request(method, path, body=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                         headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")
    finally:
        conn.close()


def post(port, payload):
    return call(port, "POST", "/recommend", payload)


JSON = {"Content-Type": "application/json"}
GOOD = {"history": ["1", "2", "3"], "k": 5}
# (name, body: dict/list to send as JSON or raw bytes, headers for raw bytes, status, message fragments)
BAD_JSON = [
    ("unknown item ids", {"history": ["1", "nope", "999999"]}, 422, ["unknown item id 'nope'", "'999999'"]),
    ("empty history", {"history": []}, 422, ["history", "at least 1"]),
    ("history above max_history", {"history": ["1"] * (MAX_HISTORY + 1)}, 422, ["201 items", "max_history"]),
    ("k zero", {**GOOD, "k": 0}, 422, ["k:", "greater than or equal to 1"]),
    ("k negative", {**GOOD, "k": -5}, 422, ["k:", "greater than or equal to 1"]),
    ("k above catalogue", {**GOOD, "k": 121}, 422, ["k:", "catalogue size 120"]),
    ("k huge integer", {**GOOD, "k": 10**30}, 422, ["k:", "catalogue size 120"]),
    ("k string", {**GOOD, "k": "10"}, 422, ["k:", "valid integer"]),
    ("k float", {**GOOD, "k": 2.5}, 422, ["k:", "valid integer"]),
    ("k bool", {**GOOD, "k": True}, 422, ["k:", "valid integer"]),
    ("k null", {**GOOD, "k": None}, 422, ["k:", "valid integer"]),
    ("history not a list", {"history": "1,2,3"}, 422, ["history:", "valid list"]),
    ("history of objects", {"history": [{"id": "1"}]}, 422, ["history[0]", "object"]),
    ("history of lists", {"history": ["1", ["2"]]}, 422, ["history[1]", "array"]),
    ("history of bools", {"history": [True]}, 422, ["history[0]", "boolean"]),
    ("null in history", {"history": ["1", None]}, 422, ["history[1]", "null"]),
    ("float id", {"history": [1.0]}, 422, ["history[0]", "number"]),
    ("negative id", {"history": ["1", -3]}, 422, ["history[1]", "-3"]),
    ("huge integer id", {"history": [10**30]}, 422, ["history[0]", "2**63"]),
    ("padding id", {"history": ["[PAD]"]}, 422, ["unknown item id '[PAD]'"]),
    ("empty id string", {"history": [""]}, 422, ["history[0]", "1..256 characters"]),
    ("unknown user", {"user_id": "no-such-user"}, 422, ["unknown user", "no-such-user"]),
    ("user_id wrong type", {"user_id": {"id": 1}}, 422, ["user_id:", "object"]),
    ("both history and user_id", {"history": ["1"], "user_id": "1"}, 422, ["not both"]),
    ("neither history nor user_id", {"k": 5}, 422, ["give 'history'", "'user_id'"]),
    ("history null", {"history": None, "k": 5}, 422, ["give 'history'"]),
    ("extra field", {**GOOD, "limit": 3}, 422, ["limit: unknown field", "allowed: history"]),
    ("exclude_seen string", {**GOOD, "exclude_seen": "yes"}, 422, ["exclude_seen", "valid boolean"]),
    ("exclude_seen int", {**GOOD, "exclude_seen": 1}, 422, ["exclude_seen", "valid boolean"]),
    ("body is an array", [GOOD], 422, ["JSON object", "array"]),
]
BAD_RAW = [
    ("malformed JSON", b'{"history": ["1",', JSON, 400, ["malformed JSON"]),
    ("empty body", b"", JSON, 400, ["empty body"]),
    ("NaN k", b'{"history": ["1"], "k": NaN}', JSON, 400, ["NaN is not valid JSON"]),
    ("Infinity k", b'{"history": ["1"], "k": Infinity}', JSON, 400, ["Infinity is not valid JSON"]),
    ("overflowing k", b'{"history": ["1"], "k": 1e400}', JSON, 422, ["k:", "valid integer"]),
    ("JSON nested too deeply", b"[" * 10_000, JSON, 400, ["nested too deeply"]),
    ("not UTF-8", b'{"history": ["\xff"]}', JSON, 400, ["not UTF-8"]),
    ("body above the byte limit", json.dumps({"history": ["1"] * 4000}).encode(), JSON, 413,
     [f"limit of {MAX_BODY} bytes"]),
    ("wrong content type", json.dumps(GOOD).encode(), {"Content-Type": "text/plain"}, 415,
     ["application/json", "text/plain"]),
    ("form content type", b"history=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     ["application/json"]),
    ("no content type", json.dumps(GOOD).encode(), {}, 415, ["Content-Type must be application/json"]),
]


def _message(body) -> str:
    return body["detail"] if isinstance(body, dict) else str(body)


@pytest.mark.parametrize("name,payload,status,fragments", BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_bodies_get_a_clear_4xx(server, name, payload, status, fragments):
    got, body = post(server["port"], payload)
    assert got == status, (name, body)
    for fragment in fragments:
        assert fragment in _message(body), (name, body)


@pytest.mark.parametrize("name,raw,headers,status,fragments", BAD_RAW, ids=[c[0] for c in BAD_RAW])
def test_bad_raw_bodies_get_a_clear_4xx(server, name, raw, headers, status, fragments):
    got, body = call(server["port"], "POST", "/recommend", raw, headers)
    assert got == status, (name, body)
    for fragment in fragments:
        assert fragment in _message(body), (name, body)


def test_chunked_body_above_the_limit_gets_413(server):
    # No Content-Length: the limit must hold while the body streams in.
    raw = json.dumps({"history": ["1"] * 4000}).encode()
    status, body = call(server["port"], "POST", "/recommend", raw, JSON, chunked=True)
    assert status == 413 and "exceeds the limit" in body["detail"]


def test_a_client_still_sending_a_large_body_always_reads_its_answer(server):
    # A history of a million items, ~8 MB, 500 times the limit. With "Connection: close" the server closes
    # the socket right after answering; had it not read the body to its end, the close would reset the
    # connection under the client's feet (4 resets in 5 tries before). Keep-alive, close, chunked and
    # a refused content type, 24 tries in a row.
    body = json.dumps({"history": [str(1000 + i % 9000) for i in range(1_000_000)]}).encode()
    assert len(body) > 7_900_000
    tries = [(JSON, False, 413)] * 10 + [({**JSON, "Connection": "close"}, False, 413)] * 10
    tries += [({**JSON, "Connection": "close"}, True, 413)] * 2 + [({"Connection": "close"}, False, 415)] * 2
    for headers, chunked, expected in tries:
        status, answer = call(server["port"], "POST", "/recommend", body, headers, chunked=chunked)
        assert status == expected and ("limit" if expected == 413 else "Content-Type") in answer["detail"]


def test_routing_errors(server):
    assert call(server["port"], "GET", "/recommend")[0] == 405
    assert call(server["port"], "PUT", "/recommend", json.dumps(GOOD).encode(), JSON)[0] == 405
    assert call(server["port"], "POST", "/recommendations", GOOD)[0] == 404
    assert call(server["port"], "GET", "/no/such/path")[0] == 404


def test_replica_survives_every_bad_input(server):
    port = server["port"]
    status, before = call(port, "GET", "/healthz")
    assert status == 200 and before["status"] == "ok"
    for _, payload, expected, _ in BAD_JSON:
        assert post(port, payload)[0] == expected
    for _, raw, headers, expected, _ in BAD_RAW:
        assert call(port, "POST", "/recommend", raw, headers)[0] == expected
    status, after = call(port, "GET", "/healthz")
    assert status == 200 and (after["pid"], after["started"]) == (before["pid"], before["started"])
    status, body = post(port, GOOD)
    assert status == 200 and len(body["items"]) == 5


def _expected(models, padded: torch.Tensor, k: int, exclude_seen: bool):
    indices, values = recommend(models["model"].score, padded, k=k, exclude_seen=exclude_seen)
    data = models["data"]
    return [data.item_ids[i] for i in indices[0].tolist()], values[0].tolist()


def _short_users(data, n: int) -> list[int]:
    """Users whose test history fits max_len, so the model and the exclusion see the same items."""
    return [u for u in range(data.n_users) if len(data.history(u, "test")) <= MAX_LEN][:n]


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_served_top_k_equals_library_recommend(server, models, exclude_seen):
    data = models["data"]
    for u in _short_users(data, 6):
        history = [data.item_ids[i] for i in data.history(u, "test").tolist()]
        status, body = post(server["port"], {"history": history, "k": 10, "exclude_seen": exclude_seen})
        assert status == 200, body
        ids, scores = _expected(models, data.padded_histories([u], "test", MAX_LEN), 10, exclude_seen)
        assert [item["item_id"] for item in body["items"]] == ids
        np.testing.assert_allclose([item["score"] for item in body["items"]], scores, atol=1e-5, rtol=0)
        assert all(item["title"] == data.item_text[data.item_ids.index(item["item_id"])] for item in body["items"])
        assert body["warnings"] == [] and body["history_length"] == len(history)


def test_known_user_uses_full_history(server, models):
    data = models["data"]
    u = next(u for u in range(data.n_users) if len(data.sequence(u)) <= MAX_LEN)
    status, body = post(server["port"], {"user_id": data.user_ids[u], "k": 7})
    assert status == 200, body
    sequence = torch.as_tensor(data.sequence(u), dtype=torch.long)
    padded = torch.cat([torch.zeros(MAX_LEN - len(sequence), dtype=torch.long), sequence]).unsqueeze(0)
    ids, scores = _expected(models, padded, 7, True)
    assert [item["item_id"] for item in body["items"]] == ids
    np.testing.assert_allclose([item["score"] for item in body["items"]], scores, atol=1e-5, rtol=0)
    assert body["history_length"] == len(sequence)


def test_integer_ids_are_looked_up_as_raw_ids(server):
    assert post(server["port"], {"history": [1, 2, 3], "k": 5}) == post(server["port"], GOOD)


def test_long_history_is_truncated_with_a_warning(server, models):
    data, model = models["data"], models["model"]
    u = int(np.argmax(data.lengths))
    seq = data.sequence(u).astype(np.int64)
    assert len(seq) > MAX_LEN
    status, body = post(server["port"], {"history": [data.item_ids[i] for i in seq], "k": 10})
    assert status == 200, body
    assert body["used_length"] == MAX_LEN and body["history_length"] == len(seq)
    assert any(f"most recent {MAX_LEN}" in w for w in body["warnings"])
    # Independent check: the model sees the last MAX_LEN items, exclusion covers all of them.
    with torch.no_grad():
        scores = model.score(torch.as_tensor(seq[-MAX_LEN:]).unsqueeze(0))[0]
    scores[torch.as_tensor(seq)] = float("-inf")
    top = scores.topk(10)
    assert [item["item_id"] for item in body["items"]] == [data.item_ids[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([item["score"] for item in body["items"]], top.values.tolist(), atol=1e-5)


def test_repeated_ids_are_kept_and_noted(server):
    status, body = post(server["port"], {"history": ["1", "2", "1"], "k": 118})
    assert status == 200, body
    assert any("repeated item ids" in w and "'1'" in w for w in body["warnings"])
    assert {item["item_id"] for item in body["items"]}.isdisjoint({"1", "2"})
    assert len(body["items"]) == 118  # 120 items, 2 distinct ones seen


def test_fewer_unseen_items_than_k_returns_what_there_is(server, models):
    ids = models["data"].item_ids
    status, body = post(server["port"], {"history": ids[1:116], "k": 10})  # 115 of the 120 items
    assert status == 200, body
    assert {item["item_id"] for item in body["items"]} == set(ids[116:])
    assert any("only 5 items" in w for w in body["warnings"])


def test_model_and_health_endpoints(server):
    status, info = call(server["port"], "GET", "/model")
    assert status == 200
    assert (info["family"], info["kind"], info["layers"]) == ("llama", "compact", 2)
    assert info["kept_layers"] == [0, 3] and info["teacher_layers"] == 4
    assert info["bridge_rank"] == 4 and info["bridge_slots"] == [1]
    assert info["metrics"] == {"ndcg@10": 0.25} and info["speedup"] == 1.7
    assert (info["n_items"], info["max_len"]) == (120, MAX_LEN)
    assert call(server["port"], "GET", "/healthz")[0] == 200


def test_concurrent_requests_are_batched_and_correct(server, models):
    data = models["data"]
    users = _short_users(data, 16)
    payloads = [{"history": [data.item_ids[i] for i in data.history(u, "test").tolist()], "k": 5}
                for u in users]
    expected = [_expected(models, data.padded_histories([u], "test", MAX_LEN), 5, True)[0] for u in users]
    batch_sizes = []
    for _ in range(3):  # a loaded machine can delay threads past the batch window; retry, never relax
        barrier = threading.Barrier(len(payloads))

        def send(payload):
            barrier.wait()
            return post(server["port"], payload)

        with ThreadPoolExecutor(len(payloads)) as pool:
            results = list(pool.map(send, payloads))
        for (status, body), ids in zip(results, expected):
            assert status == 200 and [item["item_id"] for item in body["items"]] == ids
        batch_sizes = [body["batch_size"] for _, body in results]
        if max(batch_sizes) > 1:
            break
    assert max(batch_sizes) > 1, batch_sizes
    assert max(batch_sizes) <= 8  # max_batch_size
    batching = call(server["port"], "GET", "/model")[1]["batching"]
    assert batching["largest"] > 1 and batching["requests"] > batching["calls"]


def test_load_run_of_compact_and_teacher(server, models, tmp_path):
    out = tmp_path / "load.json"
    rc = loadtest.main(["--model", str(models["compact"]), "--teacher", str(models["teacher"]),
                        "--requests", "200", "--concurrency", "8", "--json", str(out),
                        "--port", str(server["port"]), "--cache-dir", str(models["root"] / "cache"),
                        "--warmup", "10", "--model-call", "thread"])
    report = json.loads(out.read_text())
    assert rc == 0
    assert report["settings"]["model_call"] == "thread"  # the server fixture covers the default, "loop"
    assert [r["label"] for r in report["runs"]] == ["compact", "teacher"]
    assert [r["layers"] for r in report["runs"]] == [2, 4]
    # A pair the machine's load disturbed is loaded again with twice the requests: the runs are the last try's.
    rounds = [a["rounds"] for a in report["guard"]["attempts"]]
    assert rounds == [200 * GROWTH**i for i in range(len(rounds))]
    for run in report["runs"]:
        assert run["requests"] == rounds[-1] and run["errors"] == 0 and run["statuses"] == {"200": rounds[-1]}
        lat = run["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert run["requests_per_s"] > 0 and run["batching"]["mean_batch_size"] >= 1
        # Every request waited for its batch's whole model call, and for HTTP and the queue besides.
        assert 0 < run["model_time"]["share_of_latency"] < 1 and 0 < run["model_time"]["busy"] <= 1
        assert run["model_time"]["ms_per_call"] > 0
    pair = report["compact_vs_teacher"]
    assert pair["bound"] == 2.0 and report["guard"]["attempts"][0]["rounds"] == 200
    if pair["status"] == "ok":
        low, high = pair["p50_latency_ratio_ci95"]
        assert pair["throughput_ratio"] > 0 and low <= pair["p50_latency_ratio"] <= high
    else:  # the machine's load disturbed every attempt: no ratio is reported, only why
        assert pair["throughput_ratio"] is None and pair["p50_latency_ratio"] is None and pair["disturbed_because"]
    assert "samples_ms" not in report["runs"][0]  # per-request latencies feed the CI, not the report
    # The benchmark removed its own app and left the main one serving.
    assert post(server["port"], GOOD)[0] == 200


def test_serves_the_registry_champion_by_mlflow_uri(server, models, tmp_path):
    from orchestration import tracking
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        tracking.ensure_experiment("serve-e2e", tmp_path / "runs")
        with tracking.tracked_run("compact"):
            version = tracking.log_compact_model(models["compact"], "serve-e2e-compact")
        tracking.promote("serve-e2e-compact", version)
    finally:  # MLflow's URIs are process-global: leave them as the next test expects
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    uri = "models:/serve-e2e-compact@champion"
    app = build_app({"model": uri, "tracking_uri": tracking.tracking_uri(tmp_path / "runs"),
                     "download_dir": str(tmp_path / "downloads"), "cache_dir": str(models["root"] / "cache"),
                     "num_cpus": 0.5})
    serve.run(app, name="from-registry", route_prefix="/registry")
    try:
        status, info = call(server["port"], "GET", "/registry/model")
        assert status == 200 and info["source"] == uri and info["kept_layers"] == [0, 3]
        assert list((tmp_path / "downloads").glob("layerwise-model-*"))  # the replica downloaded it here
        served = post_to(server["port"], "/registry/recommend", GOOD)
        assert served[0] == 200 and served == post_to(server["port"], "/recommend", GOOD)
    finally:
        serve.delete("from-registry")


def post_to(port, path, payload):
    """POST without the batch size (it depends on timing, not on the model)."""
    status, body = call(port, "POST", path, payload)
    return status, {k: v for k, v in body.items() if k != "batch_size"}


def _copy_without_dataset(src, dst):
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop("dataset")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return str(dst)


def test_load_run_finds_the_data_set_in_either_manifest(models, tmp_path):
    # A compact model saved without "dataset" (as the LLM benchmark's once were) takes its teacher's.
    cache = {"cache_dir": str(models["root"] / "cache")}
    compact = _copy_without_dataset(models["compact"], tmp_path / "compact")
    name, data, max_len = loadtest._shared_data([compact, str(models["teacher"])], cache)
    assert data.fingerprint == models["data"].fingerprint and max_len == MAX_LEN
    assert name == DATASET  # what every app of the run, the compact's included, is given
    teacher = _copy_without_dataset(models["teacher"], tmp_path / "teacher")
    with pytest.raises(ValueError, match="names its data set; pass --dataset"):
        loadtest._shared_data([compact, teacher], cache)
    _, data, _ = loadtest._shared_data([compact, teacher], {**cache, "dataset": DATASET})
    assert data.fingerprint == models["data"].fingerprint


def test_load_client_refuses_non_loopback_hosts():
    with pytest.raises(ValueError, match="stay on this machine"):
        loadtest.run_load("http://192.0.2.1:8000/recommend", [b"{}"], 1)


def _run(label: str, layers: int, per_s: float, p50: float) -> dict:
    return {"label": label, "layers": layers, "teacher_layers": 4, "requests_per_s": per_s,
            "latency_ms": {"p50": p50}}


def test_load_ratios_pass_the_bench_guard():
    rng = np.random.default_rng(0)
    teacher_ms, compact_ms = list(rng.normal(40, 1, 400)), list(rng.normal(22, 1, 400))
    runs = [_run("compact", 2, 90.0, float(np.median(compact_ms))), _run("teacher", 4, 50.0, float(np.median(teacher_ms)))]
    pair = loadtest.compare(runs, {"teacher": teacher_ms, "compact": compact_ms}, seed=0)
    assert pair["status"] == "ok" and pair["bound"] == 2.0 and pair["throughput_ratio"] == pytest.approx(1.8)
    low, high = pair["p50_latency_ratio_ci95"]
    assert low < pair["p50_latency_ratio"] < high and 1.7 < low < high < 1.9
    slow_teacher = [5 * x for x in teacher_ms]  # a burst of load on the teacher's load run
    runs[1].update(requests_per_s=10.0, latency_ms={"p50": float(np.median(slow_teacher))})
    pair = loadtest.compare(runs, {"teacher": slow_teacher, "compact": compact_ms}, seed=0)
    assert pair["status"] == "disturbed" and pair["p50_latency_ratio"] is None and pair["throughput_ratio"] is None
    assert any("p50 latency ratio" in why for why in pair["disturbed_because"])
    assert any("throughput ratio" in why for why in pair["disturbed_because"])
