"""Request, response and application-argument models of the recommender service, and the body parser.

Every request body goes through `parse_request`, which answers each kind of bad input with its own status
and a message that names what is wrong:

    413  body larger than `max_body_bytes` (checked on Content-Length and again while reading)
    415  Content-Type missing or not application/json
    400  body not UTF-8, not JSON, or JSON with NaN/Infinity (not JSON by RFC 8259)
    422  valid JSON that does not fit `RecommendRequest` (unknown fields, wrong types, k < 1, ...)

Checks that need the catalogue (unknown item or user ids, k above the catalogue size, history longer
than `max_history`) happen in the deployment, also with 422.

A refused body is still read to its end (and dropped), up to DRAIN_BYTES, before the answer goes out. The
HTTP server closes a connection after answering a request that asked for it (`Connection: close`), and
closing a socket with unread bytes in it sends a TCP reset: a client still sending its body would see
"connection reset by peer" and never read the 413.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    model_validator,
)

DEFAULT_MODEL = "models:/layerwise-compact@champion"
DRAIN_BYTES = 64 * 2**20  # a larger refused body is answered at once: the client may then see a reset
MAX_ID_CHARS = 256
_MAX_INT_ID = 2**63  # ids beyond int64 cannot be anyone's item or user id; say so instead of looking them up


class BadRequest(Exception):
    """A request refused before it reaches the model: HTTP `status` with a human `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _check_raw_id(value: Any) -> str | int:
    # Raw ids are the data set's own ids: strings, or JSON integers looked up as their decimal string.
    # bool is an int subclass in Python, and true/false are never ids, so it is refused explicitly.
    if isinstance(value, str):
        if not 0 < len(value) <= MAX_ID_CHARS:
            raise ValueError(f"an id string must have 1..{MAX_ID_CHARS} characters, got {len(value)}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < _MAX_INT_ID:
            raise ValueError(f"an integer id must be in [0, 2**63), got {value}")
        return value
    shown = "null" if value is None else json.dumps(value) if isinstance(value, bool) else repr(value)[:60]
    raise ValueError(f"an id must be a string or a non-negative integer, got {shown} ({_json_type(value)})")


RawId = Annotated[Any, AfterValidator(_check_raw_id)]


class RecommendRequest(BaseModel):
    """POST /recommend. Give exactly one of `history` (raw item ids, oldest first) or `user_id`.

    Repeated ids in a history are allowed and kept as given: a sequence model treats a re-consumption as
    a real event, so deduplicating would change what it sees (the response notes them in `warnings`).
    Histories longer than the model's max_len are truncated to their most recent max_len items (noted in
    `warnings`); histories longer than the service's `max_history` are refused.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    history: list[RawId] | None = Field(None, min_length=1, description="raw item ids, oldest first")
    user_id: RawId | None = Field(None, description="a known user's raw id: their full history is used")
    k: StrictInt = Field(10, ge=1, description="how many items to return (at most the catalogue size)")
    exclude_seen: StrictBool = Field(True, description="never recommend an item of the history")

    @model_validator(mode="after")
    def _one_source(self) -> RecommendRequest:
        if self.history is not None and self.user_id is not None:
            raise ValueError("give either 'history' or 'user_id', not both")
        if self.history is None and self.user_id is None:
            raise ValueError("give 'history' (a list of raw item ids) or 'user_id' (a known user)")
        return self


class RecommendedItem(BaseModel):
    item_id: str = Field(description="the data set's raw item id")
    score: float
    title: str | None = Field(description="title and genres from the catalogue, if the data set has them")


class RecommendResponse(BaseModel):
    """Top-k items, best first. `batch_size`: how many requests shared the model call (dynamic batching)."""

    items: list[RecommendedItem]
    k: int
    history_length: int = Field(description="items in the given (or the known user's) history")
    used_length: int = Field(description="items the model saw: the most recent max_len of them")
    batch_size: int
    warnings: list[str]


class AppArgs(BaseModel):
    """Arguments of `serve.app:build_app` (the `args:` block of serve/config.yaml). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="model directory or MLflow URI (models:/name@alias, runs:/...)")
    dataset: str | None = Field(None, description="data set name or path; default: the manifest's 'dataset'")
    cache_dir: str | None = Field(None, description="split cache for load_dataset (default $LAYERWISE_CACHE_DIR)")
    data_dir: str | None = Field(None, description="where local data sets live (default $LAYERWISE_DATA_DIR)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ and runs:/ URIs")
    download_dir: str | None = Field(None, description="where MLflow models are downloaded (default: temp dir)")
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)
    max_body_bytes: int = Field(1_048_576, ge=64, description="larger bodies get 413")
    max_history: int = Field(1000, ge=1, description="longer histories get 422")
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, gt=0.0, description="CPUs per replica")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per replica")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where each replica runs the model: auto (a GPU when the replica was given "
                                    "one), cpu, cuda or cuda:N; on CUDA the layers take bf16 autocast")
    num_gpus: float = Field(1.0, gt=0.0, le=8.0, description="GPUs per replica when device asks for one (a "
                                                             "fraction lets replicas share a card)")
    model_call: Literal["loop", "thread"] = Field(
        "loop", description="where a batch's model call runs: 'loop' blocks the replica's user event loop while "
                            "Serve's own loop keeps queueing requests, so the next batch is full; 'thread' runs it "
                            "in a worker thread, which keeps /healthz answering during a call but, on CPU, "
                            "contends with the loop for the GIL and leaves batches small")
    # The bounded queue (docs/serving.md, "Under overload"): a replica holds two batches (one in the model
    # call, one filling), the proxy's gate queues one batch more, and refuses the rest with 503 and
    # Retry-After. Goodput is flat from 16-32 clients on, so a deeper queue adds only latency: with 32 queued,
    # 64 clients answered at p99 3-4x that of 16. Without the gate Serve's own queue holds it, and Serve counts
    # a request as queued while it is being assigned, so a burst can be refused in part by an idle replica.
    max_ongoing_requests: int = Field(32, ge=1, description="per replica; at least max_batch_size to batch fully")
    max_queued_requests: int = Field(
        16, ge=-1, description="requests each caller (the HTTP proxy) holds while every replica is at "
                               "max_ongoing_requests; beyond it they get 503 with Retry-After; -1: no limit")
    retry_after_s: float = Field(1.0, ge=0.0, description="the Retry-After of a 503 (rounded up to whole seconds); "
                                                          "the proxy gate's starts here and grows with the excess")
    retry_after_max_s: float = Field(
        30.0, ge=0.0, description="the longest Retry-After the proxy gate sends: it grows from retry_after_s so "
                                  "that refused clients come back at about a quarter of the answer rate "
                                  "(serve.capacity.RetryAfter); equal to retry_after_s: fixed")
    router_max_backoff_s: float = Field(
        0.02, gt=0.0, le=10.0, description="longest a queued request waits before its router looks for a free "
                                           "replica slot again (Serve's own default, 0.5 s, idles the replica)")
    proxy_gate: bool = Field(False, description="the proxy's admission gate holds the queue (serve.capacity; "
                                                "`layerwise serve` and `bench-serve` start it and set this): Serve's "
                                                "own queue then only absorbs a slot freed after its answer left")


# The replica settings that `layerwise serve` and `layerwise bench-serve` both take, with AppArgs' defaults.
REPLICA_ARGUMENTS = {
    "--replicas": ("num_replicas", int, "replicas per app"),
    "--num-cpus": ("num_cpus", float, "CPUs per replica"),
    "--torch-threads": ("torch_threads", int, "torch intra-op threads per replica"),
    "--max-batch-size": ("max_batch_size", int, "histories scored in one model call"),
    "--batch-wait-timeout-s": ("batch_wait_timeout_s", float, "how long a batch's first request waits for company"),
    "--max-ongoing-requests": ("max_ongoing_requests", int, "requests a replica holds at once (>= max batch size)"),
    "--max-queued-requests": ("max_queued_requests", int,
                              "requests the proxy queues when replicas are full; more get 503 (-1: no limit)"),
    "--retry-after-s": ("retry_after_s", float, "Retry-After of a 503, in seconds (the gate's smallest)"),
    "--retry-after-max-s": ("retry_after_max_s", float,
                            "the gate's longest Retry-After, reached as the excess grows (= --retry-after-s: fixed)"),
    "--router-max-backoff-s": ("router_max_backoff_s", float,
                               "longest wait of a queued request before its router retries the replicas"),
}


def add_replica_arguments(parser) -> None:
    """Add the replica options (above, and --model-call) to an argparse parser; their defaults are AppArgs'."""
    fields = AppArgs.model_fields
    for flag, (field, kind, text) in REPLICA_ARGUMENTS.items():
        parser.add_argument(flag, dest=field, type=kind, default=fields[field].default,
                            metavar=flag.lstrip("-").upper().replace("-", "_"), help=f"{text} (default: %(default)s)")
    parser.add_argument("--no-proxy-gate", dest="proxy_gate", action="store_false",
                        help="leave the bounded queue to Serve's router (which polls the replicas while it waits) "
                             "instead of the proxy's admission gate (serve.capacity.AdmissionGate)")
    parser.add_argument("--model-call", dest="model_call", choices=["loop", "thread"],
                        default=fields["model_call"].default,
                        help="'loop' (default): the model call blocks the replica's event loop while Serve queues "
                             "the next batch; 'thread': a worker thread, so /healthz answers during a call")


def replica_options(args) -> dict:
    """The AppArgs fields that `add_replica_arguments` set on parsed `args`."""
    return {field: getattr(args, field) for field, *_ in REPLICA_ARGUMENTS.values()} | {"model_call": args.model_call}


async def parse_request(request, max_body_bytes: int) -> RecommendRequest:
    """Read and validate a Starlette request's JSON body; raises `BadRequest` with the right status."""
    try:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise BadRequest(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
        body = await _read_limited(request, max_body_bytes)
    except BadRequest:
        await _drain(request, DRAIN_BYTES)  # so that the client, still sending, can read the answer
        raise
    return validate_body(body)


def validate_body(body: bytes) -> RecommendRequest:
    """JSON bytes -> RecommendRequest, or `BadRequest` 400 (not JSON) / 422 (does not fit the schema)."""
    if not body.strip():
        raise BadRequest(400, "empty body: send a JSON object such as {\"history\": [\"1\", \"2\"], \"k\": 10}")
    try:
        payload = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise BadRequest(400, f"body is not UTF-8: {err}") from None
    except RecursionError:
        raise BadRequest(400, "malformed JSON body: nested too deeply") from None
    except ValueError as err:
        raise BadRequest(400, f"malformed JSON body: {err}") from None
    if not isinstance(payload, dict):
        raise BadRequest(422, f"the body must be a JSON object, got a JSON {_json_type(payload)}")
    try:
        return RecommendRequest.model_validate(payload)
    except ValidationError as err:
        raise BadRequest(422, describe_errors(err)) from None


def describe_errors(err: ValidationError) -> str:
    """One line naming each offending field: 'invalid request: k: Input should be ...; history.2: ...'."""
    allowed = ", ".join(RecommendRequest.model_fields)
    parts = []
    for e in err.errors(include_url=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".") or "body"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = f"unknown field (allowed: {allowed})"
        parts.append(f"{where}: {message}")
    return "invalid request: " + "; ".join(parts)


async def _read_limited(request, limit: int) -> bytes:
    # Content-Length refuses an honest big body before reading it; counting while reading catches a
    # chunked or lying one without ever holding more than `limit` bytes.
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BadRequest(413, f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"body exceeds the limit of {limit} bytes")
    return bytes(body)


async def _drain(request, bound: int) -> None:
    """Read and drop the rest of a refused request's body, unless it is declared larger than `bound`;
    stop after `bound` bytes (a chunked body declares nothing), or when the client goes away."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > bound:
        return
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > bound:
                return
    except (ClientDisconnect, RuntimeError):  # gone, or the body was already read to its end
        return


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (RFC 8259 has no NaN or Infinity)")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
