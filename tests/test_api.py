"""The top-level Python API: lazy to import, thin over the library, and strict about the data set."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

import layerwise as lw
from layerwise.compression.compress import default_selection
from tests.helpers.tiny_models import cyclic_data, tiny_model


def test_import_layerwise_loads_neither_torch_nor_transformers():
    code = "import sys, layerwise; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_functions_named_like_modules_stay_functions():
    import layerwise.compression.compress  # noqa: F401  (a submodule loaded must not hide the function of its name)
    import layerwise.evaluation.evaluate  # noqa: F401
    import layerwise.training.train  # noqa: F401

    assert callable(lw.train) and callable(lw.compress) and callable(lw.evaluate)
    assert lw.compress.__module__ == lw.train.__module__ == "layerwise.api"
    assert sys.modules["layerwise.training.train"].TrainConfig is lw.TrainConfig
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lw.nope  # noqa: B018


def test_default_selection_needs_no_dependency_matrix_past_12_layers():
    assert default_selection(8) == {"selector": "beam", "method": None}
    assert default_selection(12)["selector"] == "beam"
    assert default_selection(30) == {"selector": "topk", "method": "combined"}


def test_save_then_load_checks_the_data_set(tmp_path):
    data = cyclic_data(n_users=30)
    model = tiny_model("llama", n_layers=2, n_items=data.n_items)
    lw.save(model, tmp_path / "m", data, dataset="cyclic")
    loaded = lw.load(tmp_path / "m", data)
    assert loaded.n_layers == 2 and lw.load(tmp_path / "m").n_items == data.n_items
    other_items = cyclic_data(n_users=30, n_items=25)
    with pytest.raises(ValueError, match="trained on 20 items but data set .* has 25"):
        lw.load(tmp_path / "m", other_items)
    other_split = replace(data, fingerprint="another-split")  # the same catalogue size, another split
    with pytest.raises(ValueError, match="fingerprint fake-fingerp, but data set .fake. has another-spli"):
        lw.load(tmp_path / "m", other_split)
