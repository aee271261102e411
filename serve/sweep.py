"""Concurrency sweep of the served recommender: closed-loop clients at rising concurrency, loopback only.

Smallest CPU run (a saved model directory; Ray and Serve start on 127.0.0.1 and stop at the end):
    .venv/bin/layerwise bench-serve --model runs/compact --sweep 8,32,128 --level-seconds 10 \
        --json runs/sweep.json --p99-slo-ms 500

At each level C clients each hold one keep-alive connection and send the next request as soon as the last
one is answered (a closed loop). A client refused with 503 waits what its `Retry-After` says before it
sends again, as a well-behaved client does (`--ignore-retry-after`: at once, the worst case). A level
runs `warmup_s` untimed, then a window of `seconds` or until `max_requests` answers came back, whichever
is first; requests still in flight then are awaited (at most `timeout_s`) and tallied as stragglers.
Per level: goodput (answered 200s per second of the window), p50/p99 of the answered requests, the share
refused with 503 (with or without `Retry-After`, and how fast), timeouts, resets and any other status.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from serve.capacity import admission_limits

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
APP_NAME, ROUTE = "sweep", "/sweep"  # the app each swept model is deployed as, beside whatever else is served
OVERLOAD_FACTOR = 4  # the acceptance: at 4x the concurrency of the peak goodput...
GOODPUT_FLOOR = 0.9  # ...goodput at least 90% of the peak,
P99_CEILING = 3.0  # ...p99 of the answered at most 3x the p99 at the peak, every other request a fast 503


def loopback(url: str):
    """urlsplit(url), refusing anything but http on this machine's loopback interface."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK:
        raise ValueError(f"load tests stay on this machine: need http://127.0.0.1:PORT/..., got {url!r}")
    return parts


def get_json(url: str) -> dict[str, Any]:
    """GET a JSON document from a loopback URL; RuntimeError on any status but 200."""
    parts = loopback(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def parse_levels(text: str) -> list[int]:
    """"8,16,32" -> [8, 16, 32]; each level a positive integer, strictly rising."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--sweep takes comma-separated client counts such as 8,16,32, got {text!r}") from None
    if not levels or min(levels) < 1 or levels != sorted(set(levels)):
        raise ValueError(f"--sweep levels must be positive and strictly rising, got {text!r}")
    return levels


async def _exchange(reader, writer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on an open connection; (status, lower-cased headers, body)."""
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("the server closed the connection")
    status = int(status_line.split(b" ", 2)[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
            body += await reader.readexactly(size + 2)
            del body[-2:]
        await reader.readline()
        return status, headers, bytes(body)
    return status, headers, await reader.readexactly(int(headers.get("content-length", 0)))


class _Client:
    """One closed-loop client: a keep-alive connection, reopened after a reset, a timeout or a close."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.streams = None

    async def post(self, path: str, body: bytes) -> tuple[str, float | None]:
        """One request; ("200" | "503" | ... | "timeout" | "reset", Retry-After seconds or None)."""
        request = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        try:
            if self.streams is None:
                self.streams = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.timeout_s)
            status, headers, _ = await asyncio.wait_for(_exchange(*self.streams, request), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            self.close()
            return "timeout", None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            self.close()
            return "reset", None
        if headers.get("connection", "").lower() == "close":
            self.close()
        retry_after = headers.get("retry-after")
        return str(status), (float(retry_after) if retry_after and retry_after.isdigit() else None)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def run_level(url: str, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int,
                    warmup_s: float = 2.0, timeout_s: float = 30.0, honor_retry_after: bool = True) -> dict[str, Any]:
    """One sweep level against `url` (http://127.0.0.1:PORT/path): `concurrency` closed-loop clients.

    Returns `summarize_level`'s figures for the requests answered inside the window, plus `stragglers`:
    the statuses of those answered after it (in flight when the window closed).
    """
    parts = loopback(url)
    loop = asyncio.get_running_loop()
    start = loop.time()
    window = [start + warmup_s, start + warmup_s + seconds]
    done: list[tuple[float, str, float, float | None]] = []  # (end, status, seconds, retry-after)
    closed = asyncio.Event()
    sent = iter(range(10**12))
    answered = [0]  # 200s inside the window so far

    async def client() -> None:
        conn = _Client(parts.hostname, parts.port, timeout_s)
        try:
            while not closed.is_set():
                body = bodies[next(sent) % len(bodies)]
                t0 = loop.time()
                status, retry_after = await conn.post(parts.path, body)
                t1 = loop.time()
                done.append((t1, status, t1 - t0, retry_after))
                answered[0] += status == "200" and t1 >= window[0]
                if t1 >= window[1] or answered[0] >= max_requests:
                    window[1] = min(window[1], t1)
                    closed.set()
                elif status == "503" and honor_retry_after and retry_after:
                    await _sleep_unless(closed, retry_after)
        finally:
            conn.close()

    async def closer() -> None:
        await _sleep_unless(closed, window[1] - loop.time())
        window[1] = min(window[1], loop.time())
        closed.set()

    load = os.getloadavg()[0]
    await asyncio.gather(closer(), *(client() for _ in range(concurrency)))
    inside = [d for d in done if window[0] <= d[0] < window[1]]
    late = Counter(d[1] for d in done if d[0] >= window[1])
    return {**summarize_level(inside, window[1] - window[0], concurrency), "stragglers": dict(late),
            "load_avg": [load, os.getloadavg()[0]]}


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), max(0.0, seconds))
    except (asyncio.TimeoutError, TimeoutError):
        pass


def summarize_level(outcomes: list[tuple[float, str, float, float | None]], seconds: float,
                    concurrency: int) -> dict[str, Any]:
    """Figures of one level from (end time, status, latency s, Retry-After s) of each request in the window."""
    statuses = Counter(o[1] for o in outcomes)
    answered = np.asarray([o[2] for o in outcomes if o[1] == "200"]) * 1000.0
    refused = [o for o in outcomes if o[1] == "503"]
    refused_ms = np.asarray([o[2] for o in refused]) * 1000.0
    total = len(outcomes)
    return {
        "concurrency": concurrency, "seconds": seconds, "requests": total, "statuses": dict(statuses),
        "goodput_per_s": statuses.get("200", 0) / seconds if seconds > 0 else 0.0,
        "answered_ms": _percentiles(answered),
        "refused_share": len(refused) / total if total else 0.0,
        "refused_ms": _percentiles(refused_ms),
        "refused_without_retry_after": sum(1 for o in refused if o[3] is None),
        "timeouts": statuses.get("timeout", 0), "resets": statuses.get("reset", 0),
        "other_failures": total - statuses.get("200", 0) - len(refused),
    }


def _percentiles(ms: np.ndarray) -> dict[str, float | None]:
    if not len(ms):
        return {"p50": None, "p99": None, "max": None}
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max())}


def overload_check(levels: list[dict[str, Any]], factor: int = OVERLOAD_FACTOR) -> dict[str, Any]:
    """The acceptance at `factor` times the concurrency of the peak goodput, from a sweep's levels.

    Met when there goodput >= GOODPUT_FLOOR x peak, the answered p99 <= P99_CEILING x the peak's p99, and
    every request not answered is a 503 carrying Retry-After whose p99 is below the peak's answered p50
    (a refusal is cheaper than a typical answer). `measured: false` when that level was not swept.
    """
    peak = max(levels, key=lambda lv: lv["goodput_per_s"])
    at = next((lv for lv in levels if lv["concurrency"] == factor * peak["concurrency"]), None)
    report = {"peak_concurrency": peak["concurrency"], "peak_goodput_per_s": peak["goodput_per_s"],
              "peak_p99_ms": peak["answered_ms"]["p99"], "overload_concurrency": factor * peak["concurrency"],
              "measured": at is not None}
    if at is None:
        return report
    compared = _compare(peak, at)
    report.update({k: v for k, v in compared.items() if k not in ("fast_503", "overload_goodput_per_s")},
                  other_failures=at["other_failures"],
                  met={"goodput": compared["goodput_ratio"] >= GOODPUT_FLOOR,
                       "p99": compared["p99_ratio"] is not None and compared["p99_ratio"] <= P99_CEILING,
                       "fast_503": compared["fast_503"]})
    report["met"]["all"] = all(report["met"].values())
    return report


def _compare(peak: dict[str, Any], at: dict[str, Any]) -> dict[str, Any]:
    """The level `at` against the `peak` level: goodput and answered-p99 ratios, and whether every request
    not answered was a 503 with Retry-After faster (p99) than the peak's answered p50."""
    p99 = (at["answered_ms"]["p99"] / peak["answered_ms"]["p99"]
           if at["answered_ms"]["p99"] is not None and peak["answered_ms"]["p99"] else None)
    refusal_p99 = at["refused_ms"]["p99"]
    return {"peak_goodput_per_s": peak["goodput_per_s"], "overload_goodput_per_s": at["goodput_per_s"],
            "goodput_ratio": at["goodput_per_s"] / peak["goodput_per_s"] if peak["goodput_per_s"] else 0.0,
            "p99_ratio": p99, "refused_share": at["refused_share"], "refused_p99_ms": refusal_p99,
            "fast_503": (refusal_p99 is None or refusal_p99 <= (peak["answered_ms"]["p50"] or 0.0))
                        and at["other_failures"] == 0 and at["refused_without_retry_after"] == 0}


def paired_check(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The acceptance read from rounds that each ran the peak's level and the level at 4x it back to back
    (`{"peak": level, "overload": level}`, the order alternating between rounds): a ratio within a round is
    not moved by the machine's own speed drifting between levels, which a sweep's one pass is. The verdict
    takes the median round's goodput and p99 ratios; every refusal must be fast and clean in every round."""
    per_round = [_compare(r["peak"], r["overload"]) for r in rounds]
    goodput = float(np.median([r["goodput_ratio"] for r in per_round]))
    p99s = [r["p99_ratio"] for r in per_round if r["p99_ratio"] is not None]
    p99 = float(np.median(p99s)) if len(p99s) == len(per_round) else None
    met = {"goodput": goodput >= GOODPUT_FLOOR, "p99": p99 is not None and p99 <= P99_CEILING,
           "fast_503": all(r["fast_503"] for r in per_round)}
    met["all"] = all(met.values())
    return {"rounds": per_round, "goodput_ratio": goodput, "p99_ratio": p99, "met": met}


def plot_sweep(models: list[dict[str, Any]], path: str | Path, slo_ms: float | None = None) -> Path:
    """Goodput and answered p99 against concurrency, one line per model, the SLO as a dashed line; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in models:
        levels = model["levels"]
        x = [lv["concurrency"] for lv in levels]
        left.plot(x, [lv["goodput_per_s"] for lv in levels], marker="o", label=model["label"])
        right.plot(x, [lv["answered_ms"]["p99"] or float("nan") for lv in levels], marker="o", label=model["label"])
    if slo_ms:
        right.axhline(slo_ms, color="red", linestyle="--", label=f"p99 SLO {slo_ms:g} ms")
    for ax, title in ((left, "goodput (answered req/s)"), (right, "p99 of answered requests (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    left.set_ylim(bottom=0)
    right.set_yscale("log")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_levels(label: str, levels: list[dict[str, Any]], check: dict[str, Any]) -> None:
    """One line per level, then the overload verdict."""
    print(f"{label}: clients  goodput/s  p50 ms  p99 ms  refused  503 p99 ms  timeouts  resets  other  load")
    for lv in levels:
        ms, no = lv["answered_ms"], float("nan")
        print(f"{label}: {lv['concurrency']:7d}  {lv['goodput_per_s']:9.1f}  {ms['p50'] or no:6.0f}  "
              f"{ms['p99'] or no:6.0f}  {100 * lv['refused_share']:6.1f}%  {lv['refused_ms']['p99'] or no:10.1f}  "
              f"{lv['timeouts']:8d}  {lv['resets']:6d}  {lv['other_failures']:5d}  {lv['load_avg'][0]:4.1f}")
    if not check["measured"]:
        print(f"{label}: peak at {check['peak_concurrency']} clients; {check['overload_concurrency']} not swept")
        if check.get("paired"):
            _print_paired(label, check)
        return
    verdict = "met" if check["met"]["all"] else "NOT met"
    print(f"{label}: at {check['overload_concurrency']} clients (4x the peak's {check['peak_concurrency']}): goodput "
          f"{100 * check['goodput_ratio']:.0f}% of peak, p99 {check['p99_ratio'] or float('nan'):.2f}x the peak's, "
          f"{100 * check['refused_share']:.0f}% refused with 503: {verdict} {check['met']}")
    if check.get("paired"):
        _print_paired(label, check)


def _print_paired(label: str, check: dict[str, Any]) -> None:
    paired = check["paired"]
    rounds = ", ".join(f"{100 * r['goodput_ratio']:.0f}%" for r in paired["rounds"])
    verdict = "met" if paired["met"]["all"] else "NOT met"
    print(f"{label}: paired, {len(paired['rounds'])} rounds of {check['peak_concurrency']} and "
          f"{check['overload_concurrency']} clients back to back: goodput {100 * paired['goodput_ratio']:.0f}% of "
          f"the peak's (median; rounds {rounds}), p99 {paired['p99_ratio'] or float('nan'):.2f}x: {verdict} "
          f"{paired['met']}")


def sweep_model(label: str, model: str, port: int, bodies: list[bytes], levels: list[int],
                app_args: dict[str, Any], options: dict[str, Any], pairs: int = 0) -> dict[str, Any]:
    """Deploy `model` at ROUTE on the running Serve, warm it up, run every level, delete it. Then, when
    `pairs`, that many rounds of the peak's level and the level at 4x it back to back (`paired_check`).

    `options`: run_level's keyword arguments (seconds, max_requests, warmup_s, timeout_s, honor_retry_after).
    """
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({**app_args, "model": model}), name=APP_NAME, route_prefix=ROUTE)
    base = f"http://127.0.0.1:{port}{ROUTE}"
    results = []
    try:
        asyncio.run(run_level(f"{base}/recommend", bodies, levels[0], 3.0, 10**9, 0.0, options["timeout_s"]))
        info = get_json(f"{base}/model")
        for concurrency in levels:
            before = get_json(f"{base}/model")["batching"]
            level = asyncio.run(run_level(f"{base}/recommend", bodies, concurrency, **options))
            after = get_json(f"{base}/model")["batching"]
            calls = after["calls"] - before["calls"]
            level["mean_batch_size"] = (after["requests"] - before["requests"]) / calls if calls else 0.0
            results.append(level)
        check = overload_check(results)
        rounds = []
        for i in range(pairs):
            order = ("peak", "overload") if i % 2 == 0 else ("overload", "peak")
            clients = {"peak": check["peak_concurrency"], "overload": check["overload_concurrency"]}
            rounds.append({which: asyncio.run(run_level(f"{base}/recommend", bodies, clients[which], **options))
                           for which in order})
    finally:
        serve.delete(APP_NAME)
    if rounds:
        check["paired"] = paired_check(rounds)
        check["paired"]["levels"] = rounds
    return {"label": label, "model": model, "layers": info["layers"], "teacher_layers": info["teacher_layers"],
            "levels": results, "overload": check}


def sweep_main(models: dict[str, str], port: int, levels: list[int], app_args: dict[str, Any], bodies: list[bytes],
               args) -> int:
    """`layerwise bench-serve --sweep`: sweep each of `models` (label -> dir or URI) on the running Serve with
    the request `bodies`, write the JSON report and the plot. `app_args`: the app's arguments; `args`: the
    parsed command line. 0 when no level saw a timeout, a reset or a status other than 200 and 503; the
    acceptance verdict is printed and reported, not turned into the exit status."""
    options = {"seconds": args.level_seconds, "max_requests": args.level_requests, "warmup_s": args.warmup_seconds,
               "timeout_s": args.timeout_s, "honor_retry_after": not args.ignore_retry_after}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    runs = [sweep_model(label, path, port, bodies, levels, app_args, options, args.overload_pairs)
            for label, path in models.items()]
    report = {"started": started, "dataset": app_args.get("dataset"), "levels": levels, "cpus": os.cpu_count(),
              "settings": {k: v for k, v in app_args.items() if k != "model"}, "client": options,
              "admission": admission_limits() or "Serve's router queue (no proxy gate)",
              "p99_slo_ms": args.p99_slo_ms, "models": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    plot = plot_sweep(runs, args.plot or Path(args.json).with_suffix(".png"), args.p99_slo_ms)
    for run in runs:
        print_levels(run["label"], run["levels"], run["overload"])
    print(f"report: {args.json}; plot: {plot}")
    measured = [lv for run in runs for lv in run["levels"]] + \
        [lv for run in runs for r in run["overload"].get("paired", {}).get("levels", []) for lv in r.values()]
    failed = sum(lv["other_failures"] + sum(n for s, n in lv["stragglers"].items() if s not in ("200", "503"))
                 for lv in measured)
    return 0 if failed == 0 else 1
