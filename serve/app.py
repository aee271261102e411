"""Ray Serve application: the winning compact recommender over HTTP, with dynamic batching.

Smallest CPU run (a saved model directory whose manifest names its data set; binds 127.0.0.1):
    .venv/bin/python -c "from serve.app import serve_main; serve_main('runs/compact', port=8000)"
    curl -s -H 'Content-Type: application/json' -d '{"history": ["1", "2"], "k": 5}' \
        http://127.0.0.1:8000/recommend
or from a Serve config file (edit `args.model` first; the default is the registry champion):
    .venv/bin/serve run serve/config.yaml

Endpoints:
    POST /recommend  {"history": [raw item ids], "k": 10, "exclude_seen": true} or {"user_id": id, "k": 10}
    GET  /model      family, kept and teacher layers, bridge rank, metrics, speedup, batching counters
    GET  /healthz    200 once the model and catalogue are loaded

Requests wait up to `batch_wait_timeout_s` to share one model call of up to `max_batch_size` histories
(`@serve.batch`); k and exclude_seen are applied per request afterwards by `layerwise.evaluation.evaluate.recommend`,
the same ranking code the offline evaluation uses. Bad input gets 4xx with a message (serve/schemas.py).
The model call blocks the replica's user event loop (`model_call: loop`) while Serve's own loop queues the
requests that arrive meanwhile, so batches fill; `model_call: thread` keeps /healthz answering during a
call instead.
"""

# No `from __future__ import annotations`: Serve re-creates the ingress methods, and FastAPI would then
# fail to resolve the string annotation of `request: Request` (it becomes a required query parameter).
import asyncio
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from layerwise.compression.compact import load_compact
from layerwise.device import inference_autocast, model_device, resolve_device, wants_gpu
from layerwise.data import DataError, load_dataset
from layerwise.evaluation.evaluate import recommend
from layerwise.models.checkpoint import read_manifest
from serve.schemas import (
    DEFAULT_MODEL,
    AppArgs,
    BadRequest,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
    parse_request,
)

# From here on the name `serve` means Ray Serve; this package is reached by its full name `serve.*`.
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

APP_NAME = "layerwise"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")
_ALIAS = re.compile(r"^models:/([^/@]+)@([^/@]+)$")


# --- where the model comes from ------------------------------------------------------------------------
def resolve_model(model: str, tracking_uri: str | None = None, download_dir: str | None = None) -> Path:
    """A local layerwise model directory for `model`: a directory, or an MLflow URI downloaded locally.

    `models:/NAME@ALIAS` (the registry's champion by default) goes through
    `orchestration.tracking.load_champion`, which reads the pyfunc model that `log_compact_model` logged;
    any other MLflow URI (models:/name/3, runs:/id/path, file://...) through
    `mlflow.artifacts.download_artifacts`.
    Inside the download, the model is the one folder holding a layerwise manifest.json (a pyfunc model
    keeps it under artifacts/). Downloads go to a new folder under `download_dir` (default: the temp dir).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return _find_model_dir(path)
    if not _URI.match(model):
        raise FileNotFoundError(f"model {model!r} is neither a directory nor an MLflow URI "
                                f"(models:/name@alias, runs:/run_id/path)")
    import mlflow  # only the URI branch needs it; a local directory serves without MLflow

    if tracking_uri:  # the registry lives in the tracking store unless a registry URI says otherwise
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    if download_dir:
        Path(download_dir).mkdir(parents=True, exist_ok=True)
    target = tempfile.mkdtemp(prefix="layerwise-model-", dir=download_dir)
    alias = _ALIAS.match(model)
    if alias:
        from orchestration.tracking import load_champion

        return _find_model_dir(load_champion(alias.group(1), alias=alias.group(2), dst_dir=target))
    local = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=target, tracking_uri=tracking_uri)
    return _find_model_dir(Path(local))


def _find_model_dir(root: Path) -> Path:
    if (root / "manifest.json").is_file():
        return root
    found = []
    for manifest in sorted(root.rglob("manifest.json")):
        try:
            read_manifest(manifest.parent)
            found.append(manifest.parent)
        except (ValueError, OSError):
            continue  # some other tool's manifest.json
    if len(found) != 1:
        raise FileNotFoundError(f"{root}: expected one layerwise model directory (manifest.json), found "
                                f"{[str(p) for p in found] or 'none'}")
    return found[0]


# --- the model, its catalogue and the request logic (no Ray in here) -----------------------------------
@dataclass
class Prepared:
    """A request turned into model input. padded: (max_len,) long, left-padded with 0; seen: (1, L) long,
    every item of the history (exclusion covers the whole history, not only the max_len the model sees)."""

    padded: torch.Tensor
    seen: torch.Tensor
    history_length: int
    warnings: list[str] = field(default_factory=list)


class RecommenderCore:
    """A loaded model with its catalogue: turns requests into model input and scores into items."""

    def __init__(self, model, manifest: dict[str, Any], data, source: str, max_history: int):
        self.model, self.manifest, self.data = model, manifest, data
        self.source, self.max_history = source, max_history
        self.max_len = int(manifest.get("max_len") or 50)
        self.user_index = {raw: u for u, raw in enumerate(data.user_ids)}

    @classmethod
    def load(cls, args: AppArgs) -> "RecommenderCore":
        """Resolve and load the model, then its data set, refusing a catalogue it was not trained on."""
        model_dir = resolve_model(args.model, args.tracking_uri, args.download_dir)
        manifest = read_manifest(model_dir)
        dataset = args.dataset or manifest.get("dataset")
        if not dataset:
            raise ValueError(f"{model_dir}: the manifest names no 'dataset'; pass the dataset argument")
        data = load_dataset(dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, progress=False)
        model = load_compact(model_dir, data=data).to(resolve_device(args.device))
        return cls(model, manifest, data, args.model, args.max_history)

    def prepare(self, req: RecommendRequest) -> Prepared:
        """Validate a request against the catalogue (BadRequest 422) and pad its history to max_len."""
        n_items = self.data.n_items
        if req.k > n_items:
            raise BadRequest(422, f"k: must be at most the catalogue size {n_items}, got {req.k}")
        if req.user_id is not None:
            user = self.user_index.get(str(req.user_id))
            if user is None:
                raise BadRequest(422, f"user_id: unknown user {req.user_id!r} (data set {self.data.name} "
                                      f"has {self.data.n_users} users)")
            items = np.asarray(self.data.sequence(user), dtype=np.int64)
        else:
            if len(req.history) > self.max_history:
                raise BadRequest(422, f"history: {len(req.history)} items; at most {self.max_history} "
                                      f"(max_history) are accepted")
            try:
                items = self.data.encode_items(req.history)
            except DataError as err:
                raise BadRequest(422, f"history: {err}") from None
        return Prepared(self._pad(items), torch.from_numpy(items).unsqueeze(0), len(items),
                        self._notes(items, req.history))

    def _pad(self, items: np.ndarray) -> torch.Tensor:
        used = items[-self.max_len:]
        padded = np.zeros(self.max_len, dtype=np.int64)
        padded[self.max_len - len(used):] = used
        return torch.from_numpy(padded)

    def _notes(self, items: np.ndarray, raw: list | None) -> list[str]:
        notes = []
        if len(items) > self.max_len:
            notes.append(f"history has {len(items)} items; the model saw the most recent {self.max_len} "
                         f"(max_len); exclude_seen still covers all of them")
        if raw is not None and len(set(items.tolist())) < len(items):
            repeated = sorted({str(r) for r, n in Counter(str(x) for x in raw).items() if n > 1})
            notes.append(f"repeated item ids kept as given (a repeat is a real event): {repeated[:10]}")
        return notes

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: (B, max_len) long -> scores (B, n_items + 1) float, in one model call, where the model is."""
        with torch.inference_mode(), inference_autocast(model_device(self.model)):
            return self.model.score(batch)

    def rank(self, scores: torch.Tensor, prepared: Prepared, k: int, exclude_seen: bool) -> list[RecommendedItem]:
        """scores: (1, n_items + 1) of this request -> up to k items, best first.

        The model already ran in the batch, so the scorer handed to `recommend` returns these scores; it
        only masks the seen items and takes the top k. Items masked to -inf (fewer than k unseen) are
        dropped and noted, because JSON has no -inf.
        """
        indices, values = recommend(lambda _seen: scores, prepared.seen, k=k, exclude_seen=exclude_seen)
        text = self.data.item_text
        items = [RecommendedItem(item_id=self.data.item_ids[i], score=v, title=text[i] if text else None)
                 for i, v in zip(indices[0].tolist(), values[0].tolist()) if v != float("-inf")]
        if len(items) < k:
            prepared.warnings.append(f"only {len(items)} items are not in the history; returned {len(items)}")
        return items

    def info(self) -> dict[str, Any]:
        """What GET /model reports: the model's shape and evidence from its manifest."""
        m, bridges = self.manifest, self.manifest.get("bridges") or {}
        return {
            "source": self.source, "family": m["family"], "kind": m.get("kind", "teacher"),
            "layers": self.model.n_layers, "kept_layers": list(self.model.kept),
            "teacher_layers": self.model.teacher_layers, "bridge_rank": int(bridges.get("rank") or 0),
            "bridge_slots": list(bridges.get("slots") or []), "metrics": m.get("metrics", m.get("valid")),
            "speedup": m.get("speedup"), "dataset": self.data.name, "data_fingerprint": self.data.fingerprint,
            "n_items": self.data.n_items, "n_users": self.data.n_users, "max_len": self.max_len,
            "max_history": self.max_history,
        }


class BatchStats:
    """Counts of the batch sizes this replica's model calls had (evidence that batching happens), and the
    time spent in them: `model_seconds` per call, and `request_model_seconds`, each call's time counted
    once for every request in its batch (each of them waited for the whole call), so that divided by the
    requests' summed latency it is the model's share of a request's time."""

    def __init__(self):
        self.sizes: Counter[int] = Counter()
        self.seconds = 0.0
        self.request_seconds = 0.0

    def record(self, size: int, seconds: float = 0.0) -> None:
        self.sizes[size] += 1
        self.seconds += seconds
        self.request_seconds += seconds * size

    def summary(self) -> dict[str, Any]:
        return {"calls": sum(self.sizes.values()), "requests": sum(s * n for s, n in self.sizes.items()),
                "largest": max(self.sizes, default=0), "sizes": {str(s): n for s, n in sorted(self.sizes.items())},
                "model_seconds": self.seconds, "request_model_seconds": self.request_seconds}


# --- the deployment ------------------------------------------------------------------------------------
api = FastAPI(title="layerwise recommender", description="Top-k next items from a compact recommender.")
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": RecommendRequest.model_json_schema()}}}}


@serve.deployment(name="Recommender")
@serve.ingress(api)
class Recommender:
    """One replica: the model, the catalogue, and a batch queue in front of the model call."""

    def __init__(self, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        self.core = RecommenderCore.load(self.args)
        self.batches = BatchStats()
        self.started = time.time()
        self._score.set_max_batch_size(self.args.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid(), "started": self.started, "n_items": self.core.data.n_items}

    @api.get("/model")
    def model_info(self) -> dict[str, Any]:
        batching = {"max_batch_size": self.args.max_batch_size,
                    "batch_wait_timeout_s": self.args.batch_wait_timeout_s, **self.batches.summary()}
        return {**self.core.info(), "batching": batching}

    @api.post("/recommend", response_model=RecommendResponse, openapi_extra=_BODY_DOC)
    async def recommend(self, request: Request):
        try:
            req = await parse_request(request, self.args.max_body_bytes)
            prepared = self.core.prepare(req)
        except BadRequest as err:
            return JSONResponse(status_code=err.status, content={"detail": err.message})
        scores, batch_size = await self._score(prepared.padded)
        items = self.core.rank(scores, prepared, req.k, req.exclude_seen)
        return RecommendResponse(items=items, k=req.k, history_length=prepared.history_length,
                                 used_length=min(prepared.history_length, self.core.max_len),
                                 batch_size=batch_size, warnings=prepared.warnings)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)  # both reset from args in __init__
    async def _score(self, histories: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        batch = torch.stack(histories)
        start = time.perf_counter()
        if self.args.model_call == "thread":  # /healthz answers during the call; batches stay small on CPU
            scores = await asyncio.to_thread(self.core.score, batch)
        else:
            # Serve runs this code on its own event loop thread, so while the call blocks it, Serve's loop
            # keeps accepting requests; they all join the next batch. With the call in a worker thread, the
            # model and the loop's per-request work competed for the GIL and the replica's CPU, and requests
            # reached the batch queue one at a time: on the SmolLM2 models, batches of 1.8 against 7 here
            # (README "Serving", benchmarks/results/serve_smollm2_k8*.json).
            scores = self.core.score(batch)
        self.batches.record(len(histories), time.perf_counter() - start)
        return [(scores[i : i + 1], len(histories)) for i in range(len(histories))]


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder (`import_path: serve.app:build_app`); `args` are `AppArgs` fields.

    Replicas and CPUs per replica come from args. The model is loaded in each replica, not here.
    """
    config = AppArgs.model_validate(dict(args or {}))
    if not _URI.match(config.model) and not Path(config.model).expanduser().is_dir():
        raise FileNotFoundError(f"model {config.model!r} is neither a directory nor an MLflow URI")
    if config.max_ongoing_requests < config.max_batch_size:
        raise ValueError(f"max_ongoing_requests ({config.max_ongoing_requests}) must be >= max_batch_size "
                         f"({config.max_batch_size}) or batches can never fill")
    if config.max_queued_requests == 0:
        raise ValueError("max_queued_requests must be -1 (no limit) or at least 1 (Serve's own rule)")
    gpus = config.num_gpus if wants_gpu(config.device) else 0  # a replica sees a GPU only if Ray gives it one
    queued = config.max_queued_requests
    if queued > 0 and config.proxy_gate:
        # The proxy's gate holds the queue and refuses (serve.capacity.AdmissionGate). It lets no more requests
        # through than the replicas hold, but a replica frees its slot a moment after its answer has left the
        # proxy: Serve's own queue absorbs that moment instead of refusing what the gate let in.
        queued += config.max_ongoing_requests * config.num_replicas
    deployment = Recommender.options(num_replicas=config.num_replicas,
                                     max_ongoing_requests=config.max_ongoing_requests,
                                     max_queued_requests=queued,
                                     backpressure_config=BackpressureConfig(status_code=503,
                                                                            retry_after_s=config.retry_after_s),
                                     request_router_config=_router_config(config.router_max_backoff_s),
                                     ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": gpus})
    return deployment.bind(config.model_dump())


def _router_config(max_backoff_s: float) -> RequestRouterConfig:
    # While every replica is at max_ongoing_requests, a queued request's router sleeps between looks for a
    # free slot, doubling the sleep from 25 ms up to max_backoff_s; a replica that frees its slots during
    # that sleep stays idle until the router wakes.
    return RequestRouterConfig(initial_backoff_s=min(0.025, max_backoff_s), max_backoff_s=max_backoff_s)


def proxy_admission(replicas: int, options: dict[str, Any]) -> dict | None:
    """The proxy gate's limits (serve.capacity.admission) for these AppArgs options, the defaults elsewhere."""
    from serve.capacity import admission

    fields = AppArgs.model_fields
    value = {name: options.get(name, fields[name].default)
             for name in ("max_ongoing_requests", "max_queued_requests", "retry_after_s", "retry_after_max_s")}
    return admission(**value, num_replicas=replicas)


def serve_main(model: str | None, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
               num_cpus: float = 0.5, dataset: str | None = None, blocking: bool = True,
               proxy_gate: bool = True, **options: Any) -> str:
    """Start Ray (or join RAY_ADDRESS) and Serve on host:port, deploy the recommender at "/".

    Args:
        model: model directory or MLflow URI; None means models:/layerwise-compact@champion.
        host: bind address; 127.0.0.1 unless told otherwise.
        port: HTTP port of the Serve proxy.
        replicas, num_cpus: replicas of the deployment and CPUs each.
        dataset: data set for the catalogue; default: the manifest's.
        blocking: serve until Ctrl-C, then shut Serve down; False returns at once (Serve keeps running).
        proxy_gate: hold the bounded queue in the proxy (serve.capacity.AdmissionGate), when this process
            starts Ray; False leaves it to Serve's router.
        options: other `AppArgs` fields (cache_dir, max_batch_size, batch_wait_timeout_s, ...).

    Returns:
        The base URL, e.g. "http://127.0.0.1:8000".
    """
    from orchestration.distributed.ray_runtime import init_ray
    from serve.capacity import proxy_environment

    proxy_environment(proxy_admission(replicas, options) if proxy_gate else None)  # when this process starts Ray
    init_ray()
    serve.start(http_options={"host": host, "port": port})
    args = {"model": model or DEFAULT_MODEL, "dataset": dataset, "num_replicas": replicas,
            "num_cpus": num_cpus, "proxy_gate": proxy_gate, **options}
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    if blocking:
        print(f"serving {args['model']} at {url} (POST /recommend, GET /model, GET /healthz); Ctrl-C stops")
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return url
