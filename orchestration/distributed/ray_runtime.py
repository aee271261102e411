"""The one place that starts or joins Ray; every other module calls `init_ray` or `ray_session`.

Embedded on one machine by default (`ray.init()` starts a private cluster in this process's session);
an `address` argument or the `RAY_ADDRESS` environment variable joins a running cluster instead (one
started by `ray up cluster.yaml`). Small machines get a bounded object store and fractional CPU requests,
or a 2-core box would reserve 30% of its RAM for objects and schedule only two tasks at a time.

    .venv/bin/python -c "from orchestration.distributed.ray_runtime import init_ray; print(init_ray(num_cpus=2))"

    with ray_session(num_cpus=2, object_store_mb=150) as resources:
        ...  # Ray tasks; Ray is shut down on exit only if this block started it
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import psutil
import ray
import torch

SMALL_MACHINE_CPUS = 4
# On a small machine the object store gets this share of RAM, at most SMALL_STORE_CAP_MB: calibration
# traces and shard weights of the models we run there are tens of MB, and the rest of RAM is needed by
# the workers themselves.
SMALL_STORE_FRACTION = 0.2
SMALL_STORE_CAP_MB = 1024
# Tasks of one stage that share one GPU at once (two shards and two evaluations; or seeds of a study).
GPU_TASKS_PER_CARD = 4


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None,
             quiet: bool = True) -> dict[str, float]:
    """Start an embedded Ray, or join a cluster; do nothing if this process is already connected.

    Args:
        address: a cluster to join ("auto", "ray://host:10001", "host:6379"); default: `RAY_ADDRESS`
            from the environment, and if that is unset too, start Ray embedded in this process.
        num_cpus: CPUs the embedded Ray offers (default: all). Ignored when joining: the cluster decides.
        object_store_mb: object store size of the embedded Ray (default: Ray's own choice, bounded on
            machines with <= SMALL_MACHINE_CPUS cores). Ignored when joining.
        quiet: log warnings only, and do not forward workers' stdout/stderr to this process (task
            errors still come back as exceptions with their traceback).

    Returns:
        The cluster's total resources, e.g. {"CPU": 2.0, "memory": ..., "object_store_memory": ...}.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS") or None
    options = {"logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": not quiet}
    if address:
        ray.init(address=address, **options)
    else:
        store_mb = object_store_mb if object_store_mb is not None else _default_store_mb()
        _start_embedded(num_cpus=num_cpus, include_dashboard=False,
                        object_store_memory=None if store_mb is None else int(store_mb * 2**20), **options)
    return ray.cluster_resources()


# Ray waits a fixed 30 s for a new raylet to register with its GCS, and on a loaded 2-core machine (a study
# beside the test suite, load average above 8) it once took longer: one more try, after the first's
# processes are gone, rather than losing the run.
STARTUP_TRIES = 2
STARTUP_TIMEOUT = "timed out during startup"  # ray._private.node.Node's message


def _start_embedded(**options) -> None:
    """`ray.init(address="local", **options)`, tried again once when the new node times out registering;
    the processes the failed try started (its GCS, raylet, agents) are ended first."""
    for attempt in range(1, STARTUP_TRIES + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", **options)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(error) or attempt == STARTUP_TRIES:
                raise
            ray.shutdown()
            end_new_children(before)
            logging.getLogger(__name__).warning("Ray's node %s; starting it again (try %d of %d)",
                                                STARTUP_TIMEOUT, attempt + 1, STARTUP_TRIES)


def end_new_children(before: set[int], timeout: float = 10.0) -> list[int]:
    """End this process's descendants whose pids are not in `before` (terminate, then kill the ones still
    alive after `timeout`); returns their pids."""
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for process in new:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(new, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    return [p.pid for p in new]


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, object_store_mb: int | None = None,
                quiet: bool = True) -> Iterator[dict[str, float]]:
    """`init_ray` for a block; on exit, shut Ray down only if this block started (or joined) it.

    A caller that is already connected (a test fixture, an outer pipeline) keeps its Ray. Yields the
    cluster's resources (see `init_ray`).
    """
    started = not ray.is_initialized()
    resources = init_ray(address, num_cpus, object_store_mb, quiet)
    try:
        yield resources
    finally:
        if started and ray.is_initialized():
            ray.shutdown()  # disconnects from a joined cluster; stops only an embedded one


def cpu_fraction(total_cpus: float | None = None) -> float:
    """A per-task CPU request that lets several tasks share a small machine: total/4, in [0.25, 1].

    0.5 on 2 cores (four tasks at once: two shards plus an evaluation and a Serve replica), 1.0 on 4
    cores or more. Whole CPUs on a big machine keep torch's thread count (Ray sets OMP_NUM_THREADS from
    the request) and the task count per node honest.

    Args:
        total_cpus: CPUs to size for; default: the connected cluster's CPUs, else this machine's cores.
    """
    if total_cpus is None:
        total_cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else os.cpu_count() or 1
    return float(min(1.0, max(0.25, total_cpus / 4)))


def gpu_request(device: str | None, share: int = GPU_TASKS_PER_CARD) -> float:
    """num_gpus for a task whose stage runs on `device` (a `layerwise.device` setting): 0 when it asks for
    no GPU (cpu, or auto where none is visible), else 1/share of a card, so that the `share` tasks of a
    stage (shards and evaluations, or seeds) run on one GPU at once, as cpu_fraction lets them share CPUs."""
    from layerwise.device import wants_gpu

    return 1.0 / share if wants_gpu(device) else 0.0


def task_device() -> torch.device:
    """Inside a Ray task: the GPU Ray assigned it (its only visible one), else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def _default_store_mb() -> int | None:
    """Bounded object store on small machines; None (Ray's default, 30% of RAM) elsewhere."""
    if (os.cpu_count() or 1) > SMALL_MACHINE_CPUS:
        return None
    total_mb = psutil.virtual_memory().total / 2**20
    return int(min(SMALL_STORE_CAP_MB, SMALL_STORE_FRACTION * total_mb))
