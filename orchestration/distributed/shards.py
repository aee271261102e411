"""Layer importance per model shard as Ray tasks; ablation and dependency as one Ray task each.

The driver traces the calibration batches once (`layerwise.compression.tracing.trace_layers`: one forward pass,
one backward pass) and cuts the trace at the shard boundaries (`layerwise.compression.importance.shard_inputs`).
Each shard task receives through the object store only its input states, its output gradients, its
layers' recorded calls and token masks, and only its own layers' weights; it rebuilds those layers on
its own (the backbone built on the meta device, so the rest of the model never takes memory there) and
runs `layerwise.compression.importance.local_scores`. The concatenated result equals `compute_importance`.

    PYTHONPATH=. .venv/bin/python -c "
    from orchestration.distributed.ray_runtime import ray_session
    from orchestration.distributed.shards import sharded_importance
    from layerwise.models import SequentialRecommender, build_backbone, preset_config; import torch
    model = SequentialRecommender(build_backbone(preset_config('llama', 'tiny', n_layers=4)), 20)
    x = torch.randint(1, 21, (8, 12)); batches = [(x[:, :-1], x[:, 1:])]
    with ray_session(num_cpus=2, object_store_mb=150): print(sharded_importance(model, batches, 2))"

Tasks retry (`max_retries`) when their worker dies, and on the transient errors in `TRANSIENT`; a
shard task is a pure function of its inputs, so a retried shard gives the identical scores.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn as nn
from torch import Tensor
from transformers import AutoConfig

from layerwise.compression.dependency import dependency_matrix
from layerwise.compression.importance import LOCAL_METHODS, ablation, local_scores, shard_inputs
from layerwise.models import FAMILIES, SequentialRecommender, build_backbone
from layerwise.compression.tracing import LayerCall, trace_layers
from orchestration.distributed.ray_runtime import cpu_fraction, gpu_request, init_ray, task_device

MAX_RETRIES = 3
# Application errors worth another attempt (a full disk or a dropped connection while spilling or
# fetching objects). A deterministic error (ValueError, a shape mismatch) would fail again: not retried.
TRANSIENT = (OSError,)
_GRADIENT_METHODS = frozenset({"fisher", "taylor", "param_fisher"})


def split_shards(n_layers: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges covering 0..n_layers, sizes differing by at most one.

    The earlier shards take the extra layers: split_shards(5, 2) == [(0, 3), (3, 5)].
    """
    if not 1 <= n_shards <= n_layers:
        raise ValueError(f"n_shards must be between 1 and n_layers={n_layers}, got {n_shards}")
    size, extra = divmod(n_layers, n_shards)
    bounds = [0]
    for s in range(n_shards):
        bounds.append(bounds[-1] + size + (s < extra))
    return list(zip(bounds[:-1], bounds[1:]))


# --- what travels: weights as tensors plus the recipe to rebuild the modules ----------------------
def _backbone_recipe(model: SequentialRecommender) -> dict[str, Any]:
    config = model.backbone.config
    # `to_dict` drops the attention implementation; sdpa and eager differ in the last bits.
    return {"family": model.family.name, "config": config.to_dict(),
            "attn_implementation": getattr(config, "_attn_implementation", None)}


def _rebuild_config(recipe: dict[str, Any]):
    config = AutoConfig.for_model(**recipe["config"])
    if recipe["attn_implementation"]:
        config._attn_implementation = recipe["attn_implementation"]
    return config


def shard_weights(model: SequentialRecommender, start: int, end: int) -> dict[str, Any]:
    """Layers [start, end) of `model` as plain tensors + the recipe to rebuild them (`build_shard`).

    Returns:
        {"family", "config" (the backbone config dict), "attn_implementation", "indices",
         "state": {"<j>.<param name>": tensor} for shard-local layer j = 0..end-start-1}.
    """
    if not 0 <= start < end <= model.n_layers:
        raise ValueError(f"shard [{start}, {end}) out of range for a {model.n_layers}-layer model")
    state = {f"{j}.{name}": value.detach().cpu()  # the object store holds host memory
             for j, layer in enumerate(model.layers[start:end]) for name, value in layer.state_dict().items()}
    return {**_backbone_recipe(model), "indices": list(range(start, end)), "state": state}


def build_shard(weights: dict[str, Any]) -> nn.ModuleList:
    """Rebuild a shard's layer modules from `shard_weights` output, with no other weight allocated.

    The backbone is built on the meta device and only the shard's layers receive real tensors. The
    layers are picked as they sit in the full model (not `Family.keep_layers`, which would move T5's
    position-bias table into a shard that does not own it): same modules, same state dict keys.
    """
    with torch.device("meta"):
        backbone = build_backbone(_rebuild_config(weights))
    every = FAMILIES[weights["family"]].layers(backbone)
    layers = nn.ModuleList([every[i] for i in weights["indices"]])
    layers.load_state_dict(weights["state"], strict=True, assign=True)
    _check_materialised(layers)
    return layers


def _check_materialised(module: nn.Module) -> None:
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"rebuilt modules still have tensors without data: {meta[:5]}")


def model_weights(model: SequentialRecommender) -> dict[str, Any]:
    """The whole recommender as plain tensors + its rebuild recipe (`build_model`). No bridges."""
    if getattr(model, "bridges", None):
        raise ValueError("ablation and dependency are measured on a model without bridges (a teacher)")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {**_backbone_recipe(model), "n_items": model.n_items, "dropout": model.dropout.p,
            "input_norm": model.input_norm, "head": model.head_kind, "state": state}


def build_model(weights: dict[str, Any]) -> SequentialRecommender:
    """Rebuild a recommender from `model_weights` output, in eval mode.

    Built for real (not on the meta device, as `build_shard` does): the whole model runs here anyway,
    and the backbone's non-persistent buffers (LLaMA's rotary frequencies) are not in the state dict.
    """
    model = SequentialRecommender(build_backbone(_rebuild_config(weights)), weights["n_items"],
                                  text_embeddings=weights["state"].get("text_embeddings"),
                                  dropout=weights["dropout"], input_norm=weights["input_norm"],
                                  head=weights["head"])
    model.load_state_dict(weights["state"], strict=True)
    return model.eval()


def put_model(model: SequentialRecommender) -> ray.ObjectRef:
    """Put the model's weights in the object store once, for several `remote_*` calls to share."""
    init_ray()
    return ray.put(model_weights(model))


# --- the tasks ---------------------------------------------------------------------------------------
def _maybe_crash(marker: str | None) -> None:
    """Test hook: the first attempt that finds no `marker` file creates it and kills its own worker."""
    if marker is None:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # an earlier attempt already crashed: this is the retry
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)  # a worker failure, not an exception: Ray sees the process die


def process_memory() -> dict[str, int]:
    """This process's memory from /proc/self/status, in bytes (Linux; {} elsewhere).

    peak_rss (VmHWM, the high-water mark over the process's life), rss (VmRSS now) and its parts
    rss_anon (private memory) and rss_shmem (shared memory mapped in: objects read zero-copy from Ray's
    object store land here, counted once per machine however many workers map them).
    """
    keys = {"VmHWM": "peak_rss", "VmRSS": "rss", "RssAnon": "rss_anon", "RssShmem": "rss_shmem"}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {keys[k]: 1024 * int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in lines) if k in keys}
    return {"pid": os.getpid(), **out}


def _shard_task(weights: dict[str, Any], inputs: dict[str, list], methods: tuple[str, ...],
                crash_marker: str | None = None) -> tuple[dict[str, Tensor], dict[str, int]]:
    _maybe_crash(crash_marker)
    device = task_device()
    scores = local_scores(build_shard(weights).to(device), 0, methods=methods, **_placed(inputs, device))
    return scores, process_memory()


def _placed(value, device: torch.device):
    """Tensors inside lists, tuples, dicts and `LayerCall`s moved to `device` (on the same device: the
    tensors themselves)."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_placed(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _placed(v, device) for k, v in value.items()}
    if isinstance(value, LayerCall):
        return dataclasses.replace(value, args=_placed(value.args, device), kwargs=_placed(value.kwargs, device),
                                   carried_grad=_placed(value.carried_grad, device))
    return value


# One function, two remotes (both titled ray::_shard_task). Ray takes max_calls only here, not in
# .options(): with it the worker process exits after its one task.
_fresh_shard_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=list(TRANSIENT), max_calls=1)(_shard_task)
_shard_task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=list(TRANSIENT))(_shard_task)


_EVALUATIONS = {"ablation": ablation, "dependency": dependency_matrix}


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=list(TRANSIENT))
def _evaluation_task(kind: str, weights: dict[str, Any], batches, data, kwargs: dict) -> Tensor:
    return _EVALUATIONS[kind](build_model(weights).to(task_device()), batches, data, **kwargs)


# --- the driver side ---------------------------------------------------------------------------------
def sharded_importance(model: SequentialRecommender, batches: Iterable, n_shards: int,
                       methods: Sequence[str] = LOCAL_METHODS, num_cpus: float | None = None,
                       worker_memory: list | None = None, fresh_workers: bool = False,
                       _crash_marker: str | None = None, device: str | None = "cpu") -> dict[str, Tensor]:
    """Local importance estimators with one Ray task per contiguous shard of layers.

    Uses the connected Ray, or starts one with `init_ray()` (never Ray's own unbounded auto-start). Equals
    `layerwise.compression.importance.compute_importance(model, batches, methods)` to float rounding.

    Args:
        model: a `SequentialRecommender` without bridges (L layers).
        batches: calibration `(inputs (B, T), targets (B, T))` pairs (docs/CONTRACTS.md).
        n_shards: number of shards S, 1 <= S <= L (`split_shards`).
        methods: a subset of `layerwise.compression.importance.LOCAL_METHODS`.
        num_cpus: CPU request per shard task (default `cpu_fraction()`).
        worker_memory: if a list, each shard task's `process_memory()`, taken in the worker after its
            scores, is appended in shard order (a reused Ray worker's peak covers its earlier tasks too:
            measure with fresh_workers).
        fresh_workers: run each shard task in a newly started worker process that exits after it, so a
            worker's peak memory is its shard's alone and its memory is freed at once; costs a worker start
            (seconds) per shard. Ray hands a task only to a worker of the same runtime env, so a unique
            env var per task rules out an idle worker left by earlier work; max_calls=1 ends the worker.
        _crash_marker: test hook, a file path: the first shard attempt that finds no file there creates
            it and kills its own worker, so the task must be retried.
        device: the stage's device setting (`layerwise.device`); one that asks for a GPU gives each task
            a share of one (`gpu_request`), and the task runs its layers there.

    Returns:
        method -> (L,) float64 scores, higher = more important.
    """
    methods = tuple(methods)
    unknown = set(methods) - set(LOCAL_METHODS)
    if unknown or not methods:
        raise ValueError(f"unknown local methods {sorted(unknown)}; choose from {LOCAL_METHODS}")
    shards = split_shards(model.n_layers, n_shards)
    init_ray()
    traces = trace_layers(model, batches, backward=bool(_GRADIENT_METHODS & set(methods)))
    cpus = num_cpus if num_cpus is not None else cpu_fraction()
    gpus = gpu_request(device)
    refs, run = [], uuid.uuid4().hex
    for start, end in shards:
        inputs = ray.put(_placed(shard_inputs(traces, start, end), torch.device("cpu")))
        weights = ray.put(shard_weights(model, start, end))
        if fresh_workers:
            fresh = {"env_vars": {"LAYERWISE_SHARD_WORKER": f"{run}-{start}"}}
            task = _fresh_shard_task.options(num_cpus=cpus, num_gpus=gpus, runtime_env=fresh)
        else:
            task = _shard_task.options(num_cpus=cpus, num_gpus=gpus)
        refs.append(task.remote(weights, inputs, methods, _crash_marker))
    del traces  # the object store holds what the tasks need
    parts = ray.get(refs)
    if worker_memory is not None:
        worker_memory.extend(memory for _, memory in parts)
    return {m: torch.cat([scores[m] for scores, _ in parts]) for m in methods}


def submit_ablation(model, batches, data=None, metric: str = "ndcg@10", max_users: int | None = None,
                    removed: Iterable[int] = (), max_len: int = 50, seed: int = 0,
                    num_cpus: float | None = None, device: str | None = "cpu") -> ray.ObjectRef:
    """Start `layerwise.compression.importance.ablation` as one Ray task; `ray.get` the ref for (L,) float64.

    `model` is a `SequentialRecommender` or the ref `put_model` returned (weights put once, shared).
    """
    kwargs = {"metric": metric, "max_users": max_users, "removed": list(removed), "max_len": max_len,
              "seed": seed}
    return _submit("ablation", model, batches, data, kwargs, num_cpus, device)


def submit_dependency(model, batches, data=None, metric: str = "loss", max_users: int | None = None,
                      max_len: int = 50, seed: int = 0, num_cpus: float | None = None,
                      device: str | None = "cpu") -> ray.ObjectRef:
    """Start `layerwise.compression.dependency.dependency_matrix` as one Ray task; `ray.get` gives (L, L) float64.

    `model` is a `SequentialRecommender` or the ref `put_model` returned.
    """
    kwargs = {"metric": metric, "max_users": max_users, "max_len": max_len, "seed": seed}
    return _submit("dependency", model, batches, data, kwargs, num_cpus, device)


def every_score(model, batches, data, n_shards: int, max_users: int | None = None, device: str | None = "cpu",
                evaluations: Sequence[str] = ("dependency", "ablation_loss", "ablation"),
                ) -> tuple[dict[str, Tensor], Tensor | None]:
    """Every local estimator, sharded, and the `evaluations` asked for, one task each: `ablation` (NDCG@10),
    `ablation_loss` and `dependency` (the loss dependency matrix), all submitted before any is awaited, so
    that they share the CPUs (in turn they took about twice as long on 2 cores). Those evaluate on
    `max_users` sampled validation users (None: all). `device`: where the tasks run (a GPU share each when
    it asks for one). Returns ({method: (L,)}, dependency (L, L), or None when not asked for)."""
    unknown = set(evaluations) - {"dependency", "ablation_loss", "ablation"}
    if unknown:
        raise ValueError(f"unknown evaluations {sorted(unknown)}; choose from dependency, ablation_loss, ablation")
    init_ray()
    weights = put_model(model)
    users = {"max_users": max_users, "device": device}
    submit = {"dependency": lambda: submit_dependency(weights, batches, data, metric="loss", **users),
              "ablation_loss": lambda: submit_ablation(weights, batches, data, metric="loss", **users),
              "ablation": lambda: submit_ablation(weights, batches, data, metric="ndcg@10", **users)}
    pending = {name: make() for name, make in submit.items() if name in evaluations}  # the longest first
    scores = sharded_importance(model, batches, n_shards=n_shards, methods=LOCAL_METHODS, device=device)
    scores.update(zip(pending, ray.get(list(pending.values()))))
    return scores, scores.pop("dependency", None)


def remote_ablation(model, batches, data=None, metric: str = "ndcg@10", **kwargs) -> Tensor:
    """`submit_ablation` and wait: (L,) float64, equal to the local `ablation` call."""
    return ray.get(submit_ablation(model, batches, data, metric, **kwargs))


def remote_dependency(model, batches, data=None, metric: str = "loss", **kwargs) -> Tensor:
    """`submit_dependency` and wait: (L, L) float64, equal to the local `dependency_matrix` call."""
    return ray.get(submit_dependency(model, batches, data, metric, **kwargs))


def _submit(kind: str, model, batches, data, kwargs: dict, num_cpus: float | None,
            device: str | None = "cpu") -> ray.ObjectRef:
    init_ray()
    weights = model if isinstance(model, ray.ObjectRef) else put_model(model)
    batches = None if batches is None else list(batches)  # a generator cannot travel
    cpus = num_cpus if num_cpus is not None else cpu_fraction()
    return _evaluation_task.options(num_cpus=cpus, num_gpus=gpu_request(device)).remote(
        kind, weights, batches, data, kwargs)
