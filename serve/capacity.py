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
"""

from __future__ import annotations

import json
import os

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve.capacity:proxy_middlewares"
_SERVE_REFUSAL = b"Request dropped due to backpressure"


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


def _is_text(start: dict) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/plain") for k, v in start["headers"])


def proxy_middlewares() -> list:
    """What Serve's proxy calls (CALLBACK): the middlewares it wraps its ASGI app in."""
    from starlette.middleware import Middleware

    return [Middleware(CapacityJSON)]


def proxy_environment() -> None:
    """Name `proxy_middlewares` to the Serve proxies that a Ray started from this process will run; call it
    before Ray starts. A value already set (another callback) is kept."""
    os.environ.setdefault(CALLBACK_VARIABLE, CALLBACK)
