"""Save and load recommenders as safetensors + JSON. No pickle anywhere.

Layout of a model directory:
    backbone/                 stock `save_pretrained` output (config.json + model.safetensors);
                              `transformers.AutoModel.from_pretrained` loads it with no custom code
    recommender.safetensors   item embeddings, item bias, text projection and features, bridges
    manifest.json             family, catalogue size, kept teacher layers, bridge spec, data fingerprint,
                              metrics: everything needed to rebuild and to audit the model
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from layerwise.models.lora import has_lora, merge_lora
from layerwise.models.presets import load_backbone
from layerwise.models.recommender import SequentialRecommender

FORMAT = "layerwise/1"


def save_recommender(model: SequentialRecommender, out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `model` to `out_dir` atomically (a temp dir renamed into place); returns the path."""
    out_dir = Path(out_dir)
    if has_lora(model):
        # Adapter keys in the backbone would make it non-stock; merge them into a copy, never the caller's.
        model = copy.deepcopy(model)
        merge_lora(model)
    with atomic_directory(out_dir) as tmp:
        model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
        own = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if not k.startswith("backbone.")}
        save_file(own, str(tmp / "recommender.safetensors"))
        full = {
            "format": FORMAT, "family": model.family.name, "n_items": model.n_items,
            "n_layers": model.n_layers, "dropout": model.dropout.p, "input_norm": model.input_norm,
            "head": model.head_kind, "has_text": model.text_projection is not None,
            "bridges": _bridge_spec(model), **manifest,
        }
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2, default=_jsonable))
    return out_dir


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """A temp directory beside `out_dir` to write into; it replaces `out_dir` only when the block
    finishes, and is removed if it fails, so a partial directory never stands under the final name."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache or model from other users
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The manifest of a saved model, with a clear error when the directory is not one."""
    path = Path(model_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a layerwise model directory (no manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_recommender(model_dir: str | Path,
                     adapters: Callable[[SequentialRecommender, dict[str, Any]], None] | None = None
                     ) -> SequentialRecommender:
    """Rebuild a saved recommender in eval mode.

    adapters: called as adapters(model, manifest) before the weights load, to add the modules the manifest
        lists beyond the recommender itself (a compact model's bridges: `layerwise.compact.load_compact`
        passes `layerwise.bridges.restore_bridges`). Without it, a model saved with bridges is refused.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if (manifest.get("bridges") or {}).get("slots") and adapters is None:
        raise ValueError(f"{model_dir} is a compact model with bridge adapters; load it with "
                         f"layerwise.compact.load_compact")
    backbone = load_backbone(str(model_dir / "backbone"))
    state = load_file(str(model_dir / "recommender.safetensors"))
    text = state.get("text_embeddings")
    model = SequentialRecommender(backbone, manifest["n_items"], text_embeddings=text,
                                  dropout=manifest.get("dropout", 0.0), input_norm=manifest.get("input_norm"),
                                  head=manifest.get("head", "dot"))
    if adapters is not None:
        adapters(model, manifest)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match the manifest "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


def _bridge_spec(model: SequentialRecommender) -> dict[str, Any]:
    bridges = getattr(model, "bridges", None)
    if not bridges:
        return {"slots": [], "rank": 0}
    return {"slots": sorted(int(k) for k in bridges), "rank": next(iter(bridges.values())).rank}


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
