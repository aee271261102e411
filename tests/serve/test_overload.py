"""Overload on 127.0.0.1: a tiny model's deployment with a bounded queue, hammered by closed-loop clients
on a real local Ray and Serve. What is not answered must be a 503 with Retry-After and a JSON body; nothing
else may fail, time out or reset; the server answers afterwards. Also `bench-serve --sweep` end to end,
and the refusal's JSON rewrite on its own."""

import asyncio
import heapq
import json
import random
import os

import pytest
import ray
import torch
from ray import serve

from layerwise.compression.compact import build_compact, save_compact
from layerwise.data import load_dataset
from layerwise.models import SequentialRecommender, build_backbone, preset_config
from serve import loadtest
from serve.app import build_app
from serve.capacity import (ADMISSION_VARIABLE, CALLBACK_VARIABLE, AdmissionGate, CapacityJSON, RetryAfter, admission, admission_limits,
                            proxy_environment, refusal_json)
from serve.sweep import _exchange, overload_check, paired_check, parse_levels, run_level

DATASET = "synthetic:200:80:3000:0"
# A replica holds 4 requests and the proxy queues 2 more: 48 clients that never wait overload it at once.
LIMITS = {"max_batch_size": 4, "max_ongoing_requests": 4, "max_queued_requests": 2, "retry_after_s": 1.0,
          "router_max_backoff_s": 0.02}
GOOD = json.dumps({"history": ["1", "2", "3"], "k": 5}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An untrained 2-layer tiny llama's compact model, served with LIMITS on a free loopback port."""
    root = tmp_path_factory.mktemp("overload")
    data = load_dataset(DATASET, cache_dir=root / "cache", progress=False)
    torch.manual_seed(0)
    teacher = SequentialRecommender(build_backbone(preset_config("llama", "tiny", max_len=10, n_layers=2)),
                                    data.n_items).eval()
    save_compact(build_compact(teacher, keep=[0], bridge_rank=0), root / "compact",
                 {"dataset": DATASET, "data_fingerprint": data.fingerprint, "max_len": 10})
    started = not ray.is_initialized()
    if started:  # the proxy reads its middleware callback and the gate's limits from the environment Ray starts with
        proxy_environment(admission(LIMITS["max_ongoing_requests"], LIMITS["max_queued_requests"],
                                    LIMITS["retry_after_s"]))
        ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False)
        os.environ.pop(ADMISSION_VARIABLE)  # Ray has it; a Ray another module starts later must not
    port = loadtest.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": str(root / "compact"), "cache_dir": str(root / "cache"), "num_cpus": 0.5, "proxy_gate": started,
            **LIMITS}
    serve.run(build_app(args), name="overload", route_prefix="/")
    yield {"port": port, "root": root, "json_body": started}
    serve.shutdown()
    if started:
        ray.shutdown()


def _request() -> bytes:
    return (f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(GOOD)}\r\n\r\n").encode() + GOOD


async def _post(port: int) -> tuple[int, dict, bytes]:
    """One request on its own connection: (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(_exchange(reader, writer, _request()), 60)
    finally:
        writer.close()


def _post_burst(port: int, n: int) -> list[tuple[int, dict, bytes]]:
    """n requests sent at once, each on its own connection."""
    async def burst():
        return await asyncio.gather(*(_post(port) for _ in range(n)))

    return asyncio.run(burst())


@pytest.mark.slow
def test_overload_refuses_with_503_and_nothing_else_fails(server):
    url = f"http://127.0.0.1:{server['port']}/recommend"
    for _ in range(3):  # a loaded machine may answer a first burst in time; overload it again, never relax
        level = asyncio.run(run_level(url, [GOOD], 48, seconds=3.0, max_requests=10**6, warmup_s=0.0,
                                      timeout_s=60.0, honor_retry_after=False))
        if level["statuses"].get("503"):
            break
    assert level["statuses"].get("503", 0) > 0 and level["statuses"].get("200", 0) > 0, level
    assert set(level["statuses"]) <= {"200", "503"} and set(level["stragglers"]) <= {"200", "503"}, level
    assert level["timeouts"] == level["resets"] == level["other_failures"] == 0
    assert level["refused_without_retry_after"] == 0  # every 503 told the client when to come back
    assert level["answered_ms"]["p50"] > 0 and 0 < level["refused_share"] < 1


@pytest.mark.slow
def test_a_refusal_is_503_with_retry_after_and_a_json_body(server):
    for _ in range(3):
        answers = _post_burst(server["port"], 40)
        refused = [a for a in answers if a[0] == 503]
        if refused:
            break
    assert refused and {a[0] for a in answers} <= {200, 503}
    status, headers, body = refused[0]
    assert headers["retry-after"] == "1"
    if server["json_body"]:  # Ray started here, with the proxy's middleware named in its environment
        assert headers["content-type"] == "application/json"
        payload = json.loads(body)
        assert "at capacity" in payload["detail"] and payload["retry_after_s"] == 1
        assert int(headers["content-length"]) == len(body)
        assert "4 requests are being scored and 2 wait" in payload["detail"]  # the proxy's gate refused it


@pytest.mark.slow
def test_server_answers_after_the_overload(server):
    _post_burst(server["port"], 40)
    status, _, body = asyncio.run(_post(server["port"]))
    assert status == 200 and len(json.loads(body)["items"]) == 5


@pytest.mark.slow
def test_bench_serve_sweep_writes_json_and_plot(server, tmp_path, monkeypatch):
    out = tmp_path / "sweep.json"
    for name in (ADMISSION_VARIABLE, CALLBACK_VARIABLE):  # bench-serve sets them for the Ray it would start
        monkeypatch.delenv(name, raising=False)          # undone after the test: no Ray started later sees them
    rc = loadtest.main(["--model", str(server["root"] / "compact"), "--cache-dir", str(server["root"] / "cache"),
                        "--port", str(server["port"]), "--sweep", "2,8", "--level-seconds", "1.5",
                        "--warmup-seconds", "0.5", "--json", str(out), "--p99-slo-ms", "250", "--overload-pairs", "1",
                        "--max-batch-size", "4", "--max-ongoing-requests", "4", "--max-queued-requests", "2"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["levels"] == [2, 8] and report["p99_slo_ms"] == 250
    assert report["settings"]["max_queued_requests"] == 2 and report["settings"]["max_ongoing_requests"] == 4
    (model,) = report["models"]
    assert [lv["concurrency"] for lv in model["levels"]] == [2, 8]
    for level in model["levels"]:
        assert level["goodput_per_s"] > 0 and level["statuses"]["200"] > 0
        assert set(level["statuses"]) <= {"200", "503"} and level["other_failures"] == 0
        assert level["answered_ms"]["p50"] <= level["answered_ms"]["p99"] and len(level["load_avg"]) == 2
    assert model["overload"]["peak_concurrency"] in (2, 8)
    (paired,) = model["overload"]["paired"]["levels"]  # one round: the peak's level and 4x it, back to back
    assert set(paired) == {"peak", "overload"} and paired["overload"]["concurrency"] == 4 * paired["peak"]["concurrency"]
    assert model["overload"]["paired"]["goodput_ratio"] > 0
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The sweep removed its app and left the main one answering.
    assert asyncio.run(_post(server["port"]))[0] == 200


def test_sweep_levels_are_checked():
    assert parse_levels("8,16, 32") == [8, 16, 32]
    for bad in ("8,4", "0,8", "8,8", "eight", ""):
        with pytest.raises(ValueError, match="--sweep"):
            parse_levels(bad)
    with pytest.raises(SystemExit, match="needs --json"):
        loadtest.main(["--model", "m", "--sweep", "8,16"])
    with pytest.raises(SystemExit, match="strictly rising"):
        loadtest.main(["--model", "m", "--sweep", "16,8", "--json", "x.json"])
    with pytest.raises(SystemExit, match="--overload-pairs >= 0"):
        loadtest.main(["--model", "m", "--sweep", "8,16", "--json", "x.json", "--overload-pairs", "-1"])


def _level(concurrency, goodput, p50, p99, refused=0.0, refused_p99=None, other=0):
    return {"concurrency": concurrency, "goodput_per_s": goodput, "answered_ms": {"p50": p50, "p99": p99},
            "refused_share": refused, "refused_ms": {"p99": refused_p99}, "other_failures": other,
            "refused_without_retry_after": 0}


def test_overload_check_reads_the_level_at_four_times_the_peak():
    levels = [_level(8, 100.0, 40, 80), _level(16, 120.0, 60, 100), _level(64, 110.0, 70, 250, 0.5, 20.0)]
    check = overload_check(levels)
    assert check["peak_concurrency"] == 16 and check["overload_concurrency"] == 64
    assert check["goodput_ratio"] == pytest.approx(110 / 120) and check["p99_ratio"] == pytest.approx(2.5)
    assert check["met"] == {"goodput": True, "p99": True, "fast_503": True, "all": True}
    levels[2] = _level(64, 100.0, 70, 400, 0.5, 90.0, other=1)  # slower, slow refusals, one reset
    check = overload_check(levels)
    assert check["met"] == {"goodput": False, "p99": False, "fast_503": False, "all": False}
    assert overload_check(levels[:2])["measured"] is False  # 64 clients were not swept: no verdict


def test_the_paired_check_reads_the_median_round_and_needs_every_refusal_fast():
    rounds = [{"peak": _level(32, 150.0, 200, 300), "overload": _level(128, 141.0, 210, 330, 0.2, 20.0)},
              {"peak": _level(32, 120.0, 250, 360), "overload": _level(128, 100.0, 260, 400, 0.2, 25.0)},
              {"peak": _level(32, 140.0, 210, 310), "overload": _level(128, 133.0, 220, 320, 0.2, 30.0)}]
    paired = paired_check(rounds)
    assert [round(r["goodput_ratio"], 3) for r in paired["rounds"]] == [0.94, 0.833, 0.95]
    assert paired["goodput_ratio"] == pytest.approx(0.94)  # the median round, not the mean or the best
    assert paired["p99_ratio"] == pytest.approx(1.1) and paired["met"]["all"]
    rounds[2]["overload"] = _level(128, 133.0, 220, 320, 0.2, 400.0)  # one slow refusal round fails it
    assert paired_check(rounds)["met"] == {"goodput": True, "p99": True, "fast_503": False, "all": False}


SERVE_REFUSAL = [{"type": "http.response.start", "status": 503,
                  "headers": [[b"content-type", b"text/plain; charset=utf-8"], [b"retry-after", b"2"],
                              [b"x-request-id", b"abc"]]},
                 {"type": "http.response.body",
                  "body": b"Request dropped due to backpressure (num_queued_requests=2, max_queued_requests=2)."}]


def _through_middleware(messages):
    sent = []

    async def app(scope, receive, send):
        for message in messages:
            await send(dict(message))

    async def send(message):
        sent.append(message)

    asyncio.run(CapacityJSON(app)({"type": "http"}, None, send))
    return sent


def test_serve_refusal_becomes_json_and_other_responses_pass_unchanged():
    start, body = _through_middleware(SERVE_REFUSAL)
    headers = dict((bytes(k), bytes(v)) for k, v in start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"2" and headers[b"x-request-id"] == b"abc"
    assert headers[b"content-type"] == b"application/json" and int(headers[b"content-length"]) == len(body["body"])
    payload = json.loads(body["body"])
    assert payload["retry_after_s"] == 2 and "at capacity" in payload["detail"] and "retry after 2 s" in payload["detail"]
    other_503 = [{**SERVE_REFUSAL[0]}, {"type": "http.response.body", "body": b"Deployment is unavailable."}]
    assert _through_middleware(other_503) == other_503  # a text 503 that is not a refusal is left alone
    ok = [{"type": "http.response.start", "status": 200, "headers": [[b"content-type", b"application/json"]]},
          {"type": "http.response.body", "body": b"{}"}]
    assert _through_middleware(ok) == ok
    assert refusal_json(SERVE_REFUSAL[0], b"other text") == (SERVE_REFUSAL[0], b"other text")


class _Held:
    """An ASGI app that answers 200 once `open` is set, counting the requests inside it."""

    def __init__(self):
        self.open, self.inside, self.most = asyncio.Event(), 0, 0

    async def __call__(self, scope, receive, send):
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.open.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
        finally:
            self.inside -= 1


async def _call(app, method: str = "POST", path: str = "/recommend") -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": GOOD, "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": method, "path": path}, receive, send)
    return sent


def test_the_gate_lets_in_its_limit_parks_the_queue_and_refuses_the_rest_at_once():
    async def scenario():
        inner = _Held()
        gate = AdmissionGate(inner, in_flight=2, waiting=1, retry_after_s=2.0)
        calls = [asyncio.create_task(_call(gate)) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert inner.inside == 2 and len(gate.waiting) == 1  # two in, one parked
        refused = [c for c in calls if c.done()]
        assert len(refused) == 1  # the fourth, answered without waiting for a slot
        start, body = refused[0].result()
        headers = dict(start["headers"])
        assert start["status"] == 503 and headers[b"retry-after"] == b"2"
        assert headers[b"content-type"] == b"application/json"
        assert json.loads(body["body"])["retry_after_s"] == 2 and "at capacity" in json.loads(body["body"])["detail"]
        inner.open.set()
        answered = await asyncio.gather(*(c for c in calls if c is not refused[0]))
        assert [a[0]["status"] for a in answered] == [200, 200, 200]
        assert inner.most == 2 and gate.in_flight == 0 and not gate.waiting  # never more than the limit inside
    asyncio.run(scenario())


def test_a_waiter_that_goes_away_gives_up_its_place_and_other_routes_pass():
    async def scenario():
        inner = _Held()
        gate = AdmissionGate(inner, in_flight=1, waiting=2, retry_after_s=1.0)
        first, gone, last = (asyncio.create_task(_call(gate)) for _ in range(3))
        await asyncio.sleep(0.05)
        assert len(gate.waiting) == 2
        gone.cancel()
        await asyncio.sleep(0.01)
        assert len(gate.waiting) == 1 and gone.cancelled()
        inner.open.set()
        assert [(await t)[0]["status"] for t in (first, last)] == [200, 200]
        assert gate.in_flight == 0 and not gate.waiting
        ungated = AdmissionGate(inner, in_flight=1, waiting=0)
        ungated.in_flight = 1  # full: a scoring request would be refused, the model info is not
        assert (await _call(ungated, "GET", "/model"))[0]["status"] == 200
        assert (await _call(ungated, "POST", "/recommend"))[0]["status"] == 503
    asyncio.run(scenario())


class _Lingering:
    """An ASGI app that answers at once and then stays in its call until `leave` is set (Serve's proxy does
    its own bookkeeping after the last byte has gone)."""

    def __init__(self):
        self.leave = asyncio.Event()

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
        await self.leave.wait()


def test_a_slot_is_free_once_the_answer_is_sent_not_when_the_app_returns():
    async def scenario():
        inner = _Lingering()
        gate = AdmissionGate(inner, in_flight=1, waiting=0)
        first = asyncio.create_task(_call(gate))
        await asyncio.sleep(0.05)
        assert not first.done() and gate.in_flight == 0  # answered, still in the app: its slot is free
        # The client's next request comes in now: it gets the slot instead of a 503.
        second = asyncio.create_task(_call(gate))
        await asyncio.sleep(0.05)
        assert gate.in_flight == 0
        inner.leave.set()
        assert [(await t)[0]["status"] for t in (first, second)] == [200, 200]
        assert gate.in_flight == 0 and not gate.waiting  # released once each, never twice
    asyncio.run(scenario())


def test_gate_limits_come_from_the_environment_and_a_bad_value_is_named(monkeypatch):
    assert admission(32, 32, 1.0, num_replicas=2) == {"in_flight": 64, "waiting": 32, "retry_after_s": 1.0,
                                                      "retry_after_max_s": 1.0}
    assert admission(32, 32, 1.0, retry_after_max_s=30.0)["retry_after_max_s"] == 30.0
    assert admission(32, -1, 1.0) is None  # an unbounded queue: no gate
    monkeypatch.delenv(ADMISSION_VARIABLE, raising=False)
    assert admission_limits() is None and AdmissionGate(None).limit is None
    monkeypatch.setenv(ADMISSION_VARIABLE, json.dumps({"in_flight": 3, "waiting": 5, "retry_after_s": 2}))
    gate = AdmissionGate(None)
    assert (gate.limit, gate.max_waiting, gate.retry_after.floor, gate.retry_after.ceiling) == (3, 5, 2, 2)
    monkeypatch.setenv(ADMISSION_VARIABLE, json.dumps({"in_flight": 3, "waiting": 5, "retry_after_s": 1,
                                                       "retry_after_max_s": 30}))
    assert (AdmissionGate(None).retry_after.floor, AdmissionGate(None).retry_after.ceiling) == (1, 30)
    for bad in ("{", '{"in_flight": 0, "waiting": 1, "retry_after_s": 1}', '{"in_flight": 2}',
                '{"in_flight": 2, "waiting": 1, "retry_after_s": 5, "retry_after_max_s": 2}'):
        monkeypatch.setenv(ADMISSION_VARIABLE, bad)
        with pytest.raises(ValueError, match=ADMISSION_VARIABLE):
            admission_limits()


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _closed_loop(retry, clock, clients: int, seconds: float, answers_per_s: float = 150.0) -> list[tuple[float, int]]:
    """`clients` beyond the gate's size, each sending again as soon as its Retry-After is over (a closed
    loop), while the gate answers at a steady rate; (time, Retry-After) of each refusal."""
    end = clock.now + seconds
    returns = [(clock.now + i / clients, i) for i in range(clients)]  # they arrive over the first second
    heapq.heapify(returns)
    next_answer, told = clock.now, []
    while True:
        if next_answer <= returns[0][0]:
            clock.now = next_answer
            next_answer += 1.0 / answers_per_s
            if clock.now >= end:
                return told
            retry.answered()
        else:
            clock.now, client = heapq.heappop(returns)
            told.append((clock.now, retry.refused()))
            heapq.heappush(returns, (clock.now + told[-1][1], client))


def test_retry_after_grows_with_the_excess_so_refusals_cost_a_bounded_share():
    clock = _Clock()
    retry = RetryAfter(1.0, 30.0, share=0.25, clock=clock, rng=random.Random(0))
    # A mild excess (32 clients refused each second against 150 answers a second) keeps the floor.
    assert {r for _, r in _closed_loop(retry, clock, 32, 10.0)} == {1}
    # 900 clients told 1 s would be 900 refusals a second; once the estimate has settled they are told ~24 s
    # on average, spread over 12-30 s, and come back at about a quarter of the answer rate (37.5 a second).
    told = _closed_loop(retry, clock, 900, 150.0)
    settled = [r for t, r in told if t > clock.now - 75.0]
    assert 21.0 <= retry.target <= 27.0 and min(settled) >= 10 and max(settled) == 30
    assert len(set(settled)) > 10  # spread, so a crowd refused together does not come back together
    assert 0.8 * 37.5 <= len(settled) / 75.0 <= 1.25 * 37.5
    # A bigger excess stops at the ceiling; once the clients are gone, the floor is back after the window that
    # held their last refusals and a quiet one (at most two windows of the ceiling).
    _closed_loop(retry, clock, 5000, 120.0)
    assert retry.target == 30.0
    for _ in range(2):
        clock.now += 31.0
        retry.answered()
    assert retry.refused() == 1
    # A ceiling equal to the floor fixes it, whatever the excess.
    fixed = RetryAfter(2.0, 2.0, clock=clock)
    assert {r for _, r in _closed_loop(fixed, clock, 900, 10.0)} == {2}


def test_the_gate_tells_refused_clients_a_longer_retry_after_as_the_excess_grows():
    async def scenario():
        clock = _Clock()
        inner = _Held()
        gate = AdmissionGate(inner, in_flight=1, waiting=0, retry_after_s=1.0, retry_after_max_s=10.0, clock=clock)
        held = asyncio.create_task(_call(gate))
        await asyncio.sleep(0.01)
        for _ in range(50):  # 50 refusals in the first second, no answer: the excess is all of them
            await _call(gate)
        clock.now = 1.5
        start, body = await _call(gate)
        headers = dict(start["headers"])
        # 50 clients away against the floor's budget: the target is capped at 10 s, each told 5-10 s
        wait = int(headers[b"retry-after"])
        assert start["status"] == 503 and 5 <= wait <= 10 and gate.retry_after.target == 10.0
        assert json.loads(body["body"])["retry_after_s"] == wait and f"retry after {wait} s" in json.loads(body["body"])["detail"]
        inner.open.set()
        assert (await held)[0]["status"] == 200
    asyncio.run(scenario())
