"""The body of a refusal at capacity: Serve's proxy answers 503 in plain text, this makes it JSON.

When every replica holds `max_ongoing_requests` and the proxy already queues `max_queued_requests`, the
proxy refuses the next request itself, before any application code runs: 503, `Retry-After` from the
deployment's backpressure config, and a plain-text body. `CapacityJSON` wraps the proxy's ASGI app and
rewrites that one response into the app's own error shape:

    503 Retry-After: 1
    {"detail": "server at capacity: ... retry after 1 s", "retry_after_s": 1}

Serve builds its proxy's middlewares from the function named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH,
read when the proxy starts, so the variable must be in the environment of the process that starts Ray
(`proxy_environment` sets it there; `layerwise serve` and `bench-serve` call it). Without it refusals keep
their status and header, with Serve's text body. Nothing here imports torch or Ray.

`AdmissionGate` holds the bounded queue itself, in the proxy, in front of Serve's router. Serve's own queue
is a poll: while every replica is full, each queued request's router sleeps (up to `router_max_backoff_s`)
and asks the replicas again, and each ask is a call that the replicas' CPU answers. With 32 queued on the
default compact model (2 cores), the 4x-overload level answered 83% of the peak's goodput at load average
4.7; with Serve's queue cut to 4 it answered 94% at 2.0 (benchmarks/results/serve_sweep_compact*.json). The
gate lets in at most `in_flight` scoring requests (the replicas' `max_ongoing_requests` summed), parks up to
`waiting` more on futures that cost nothing while they wait, and answers the rest with 503 at once. A
finished request hands its slot to the oldest waiter, so Serve's router finds a free replica slot at the
first look. The limits reach the proxy as JSON in LAYERWISE_SERVE_ADMISSION (`proxy_environment`).

A refusal is not free either: it is an HTTP exchange on the cores that score. With a fixed Retry-After of
1 s, 1,024 clients against a gate of 96 send about 900 refusals a second. `RetryAfter` makes the gate's
Retry-After grow with the excess, so the refused come back at a bounded share of the answer rate.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import time

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.capacity:proxy_middlewares"
ADMISSION_VARIABLE = "LAYERWISE_SERVE_ADMISSION"
GATED_SUFFIX = "/recommend"  # the scoring route; health, model info and errors pass without a slot
_SERVE_REFUSAL = b"Request dropped due to backpressure"
REFUSAL_SHARE = 0.25  # the refused come back at about this share of the answer rate (RetryAfter)


class CapacityJSON:
    """Pure ASGI middleware: a 503 whose plain-text body is Serve's backpressure refusal becomes JSON.
    Every other response passes through untouched (the app's own 503s are already JSON)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held = None

        async def send_json_refusal(message):
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 503 and _is_text(message):
                held = message  # wait for the body: only Serve's own refusal is rewritten
                return
            if held is not None and message["type"] == "http.response.body":
                start, body = refusal_json(held, message.get("body", b""))
                held = None
                await send(start)
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        await self.app(scope, receive, send_json_refusal)


def refusal_json(start: dict, body: bytes) -> tuple[dict, bytes]:
    """(response start, body) of a refusal: JSON if `body` is Serve's backpressure text, else unchanged."""
    if not body.startswith(_SERVE_REFUSAL):
        return start, body
    headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-type", b"content-length")]
    retry = next((v.decode() for k, v in headers if k.lower() == b"retry-after"), None)
    wait = f"retry after {retry} s" if retry else "retry later"
    payload = {"detail": f"server at capacity: every replica is busy and the queue in front of them is full; "
                         f"{wait} ({body.decode(errors='replace').strip()})",
               "retry_after_s": int(retry) if retry and retry.isdigit() else None}
    encoded = json.dumps(payload).encode()
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(encoded)).encode())]
    return {**start, "headers": headers}, encoded


class RetryAfter:
    """The Retry-After of the gate's refusals, in whole seconds between `floor_s` and `ceiling_s`, grown with
    the excess so that refusals cost a bounded share of the work.

    A refused client that honours its Retry-After stays away that long, so the clients being refused number
    about E = (the seconds told in a window) / (the window's length) (Little's law). Telling the next ones
    T = E / (share x answers/s) on average brings them back at `share` of the answer rate, whatever the
    excess: at 4x the gate's size most clients wait their turn away from the server instead of costing it a
    refusal every second. Each is told T times a uniform draw from [0.5, 1.5), rounded and clipped, so that a
    crowd refused in one burst does not come back in one burst (a wave of 400 returning at once queued its
    503s for 0.6 s in the proxy). T is re-estimated at the first event after each window of max(1 s, T). A
    mild excess keeps the floor (32 refused clients against 150 answers/s); after an excess the floor returns
    with the first quiet window (within two windows); `ceiling_s` equal to `floor_s` fixes it."""

    def __init__(self, floor_s: float = 1.0, ceiling_s: float | None = None, share: float = REFUSAL_SHARE,
                 clock=time.monotonic, rng: random.Random | None = None):
        self.floor = max(1, math.ceil(floor_s))  # HTTP's Retry-After: whole seconds
        self.ceiling = max(self.floor, math.ceil(ceiling_s if ceiling_s is not None else floor_s))
        self.share, self.clock, self.rng = share, clock, rng or random.Random()
        self.target = float(self.floor)  # T, the mean wait told
        self._start, self._told, self._answered = clock(), 0, 0

    def answered(self) -> None:
        self._answered += 1
        self._update()

    def refused(self) -> int:
        """Count a refusal; the Retry-After (seconds) to send with it."""
        self._update()
        wait = min(self.ceiling, max(self.floor, round(self.target * (0.5 + self.rng.random()))))
        self._told += wait
        return wait

    def _update(self) -> None:
        now = self.clock()
        span = now - self._start
        if span < max(1.0, self.target):
            return
        away = self._told / span  # clients backing off now, on average
        budget = self.share * max(self._answered / span, 1.0)  # refusals a second that the work can carry
        self.target = min(float(self.ceiling), max(float(self.floor), away / budget))
        self._start, self._told, self._answered = now, 0, 0


class AdmissionGate:
    """Pure ASGI middleware: at most `in_flight` POST .../recommend requests past it, `waiting` more parked
    in arrival order, the rest refused at once with 503, `Retry-After` and a JSON body. One gate per proxy
    (a proxy is one event loop, so the counts need no lock); on a cluster of N proxies each holds its own.
    The Retry-After grows from `retry_after_s` up to `retry_after_max_s` with the excess (`RetryAfter`)."""

    def __init__(self, app, in_flight: int | None = None, waiting: int = 0, retry_after_s: float = 1.0,
                 retry_after_max_s: float | None = None, clock=time.monotonic):
        if in_flight is None:  # as the proxy builds it: the limits from the environment, if any
            limits = admission_limits() or {}
            in_flight, waiting = limits.get("in_flight"), limits.get("waiting", 0)
            retry_after_s = limits.get("retry_after_s", 1.0)
            retry_after_max_s = limits.get("retry_after_max_s", retry_after_s)
        self.app, self.limit, self.max_waiting = app, in_flight, waiting
        self.retry_after = RetryAfter(retry_after_s, retry_after_max_s, clock=clock)
        self.in_flight = 0
        self.waiting: collections.deque[asyncio.Future] = collections.deque()

    async def __call__(self, scope, receive, send):
        if (self.limit is None or scope["type"] != "http" or scope["method"] != "POST"
                or not scope["path"].rstrip("/").endswith(GATED_SUFFIX)):
            return await self.app(scope, receive, send)
        if self.in_flight < self.limit:
            self.in_flight += 1
        elif len(self.waiting) < self.max_waiting:
            turn = asyncio.get_running_loop().create_future()
            self.waiting.append(turn)
            try:
                await turn  # a finishing request handed its slot over: in_flight already counts this one
            except asyncio.CancelledError:  # the client went away while waiting
                if turn.done() and not turn.cancelled():
                    self._release()  # the slot came with the cancellation: pass it on
                else:
                    self.waiting.remove(turn)
                raise
        else:
            return await self._refuse(receive, send)
        done = False

        async def send_and_release(message):
            # The slot is free once the last byte of the answer is handed over, not when the app returns: the
            # client's next request on this connection can arrive before that, and would find its own slot taken.
            nonlocal done
            if not done and message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
                self._finished()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            if not done:  # no complete answer (an error, the client gone): the slot is free all the same
                self._finished()

    def _finished(self) -> None:
        """A let-in request is over: its slot goes to the oldest waiter (or back), and it counts as answered."""
        self._release()
        self.retry_after.answered()

    def _release(self) -> None:
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.in_flight -= 1

    async def _refuse(self, receive, send) -> None:
        while True:  # read the (small, already sent) body, so the connection stays usable for the next request
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        retry_after = self.retry_after.refused()
        body = json.dumps({"detail": f"server at capacity: {self.limit} requests are being scored and "
                                     f"{self.max_waiting} wait for a slot; retry after {retry_after} s",
                           "retry_after_s": retry_after}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(retry_after).encode())]})
        await send({"type": "http.response.body", "body": body})


def admission_limits() -> dict | None:
    """The gate's limits from LAYERWISE_SERVE_ADMISSION ({"in_flight", "waiting", "retry_after_s"} and
    optionally "retry_after_max_s"), or None (no gate: Serve's own queue alone). A malformed value is an error
    that names the variable."""
    raw = os.environ.get(ADMISSION_VARIABLE)
    if not raw:
        return None
    try:
        limits = json.loads(raw)
        ok = (isinstance(limits, dict) and isinstance(limits.get("in_flight"), int) and limits["in_flight"] >= 1
              and isinstance(limits.get("waiting"), int) and limits["waiting"] >= 0
              and isinstance(limits.get("retry_after_s"), (int, float)) and limits["retry_after_s"] > 0
              and isinstance(limits.get("retry_after_max_s", limits["retry_after_s"]), (int, float))
              and limits.get("retry_after_max_s", limits["retry_after_s"]) >= limits["retry_after_s"])
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise ValueError(f"{ADMISSION_VARIABLE} must be JSON like {{\"in_flight\": 32, \"waiting\": 32, "
                         f"\"retry_after_s\": 1, \"retry_after_max_s\": 30}} (in_flight >= 1, waiting >= 0, "
                         f"retry_after_max_s >= retry_after_s > 0), got {raw!r}")
    return limits


def admission(max_ongoing_requests: int, max_queued_requests: int, retry_after_s: float,
              num_replicas: int = 1, retry_after_max_s: float | None = None) -> dict | None:
    """The gate's limits for a deployment's settings; None where the queue is unbounded (-1)."""
    if max_queued_requests < 0:
        return None
    return {"in_flight": max_ongoing_requests * num_replicas, "waiting": max_queued_requests,
            "retry_after_s": retry_after_s,
            "retry_after_max_s": max(retry_after_s, retry_after_max_s if retry_after_max_s is not None
                                     else retry_after_s)}


def _is_text(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/plain") for k, v in start["headers"])


def proxy_middlewares() -> list:
    """What Serve's proxy calls (CALLBACK): the middlewares it wraps its ASGI app in."""
    from starlette.middleware import Middleware

    return [Middleware(CapacityJSON), Middleware(AdmissionGate)]


def proxy_environment(limits: dict | None = None) -> None:
    """Name `proxy_middlewares` to the Serve proxies that a Ray started from this process will run, with the
    admission gate's `limits` (`admission(...)`; None: no gate); call it before Ray starts. A callback
    already set (another one) is kept."""
    os.environ.setdefault(CALLBACK_VARIABLE, CALLBACK)
    if limits is None:
        os.environ.pop(ADMISSION_VARIABLE, None)
    else:
        os.environ[ADMISSION_VARIABLE] = json.dumps(limits)
