"""One small embedded Ray per test module (starting Ray costs seconds on 2 busy cores)."""

import os

import pytest

from orchestration.distributed.ray_runtime import ray_session


@pytest.fixture(scope="module")
def ray_local():
    """An embedded 2-CPU Ray with a 150 MB object store, shut down after the module if it started it.

    Yields the cluster resources. RAY_ADDRESS is hidden meanwhile so that tests never join (or start
    work on) a cluster that happens to run on the machine.
    """
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        with ray_session(num_cpus=2, object_store_mb=150) as resources:
            yield resources
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
