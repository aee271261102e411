"""Save and load recommenders as safetensors + JSON. No pickle anywhere.

Layout of a model directory:
    backbone/                 stock `save_pretrained` output (config.json + model.safetensors);
                              `transformers.AutoModel.from_pretrained` loads it with no custom code
    recommender.safetensors   item embeddings, item bias, text projection and features, bridges
    lora.safetensors          a model trained with LoRA on a pretrained backbone: the adapter matrices, which
                              the backbone holds merged (`layerwise.models.rebuild` makes the backbone again
                              from the pretrained model and these)
    manifest.json             family, catalogue size, kept teacher layers, bridge spec, data fingerprint,
                              metrics: everything needed to rebuild and to audit the model

A stripped copy (`strip_weights`) keeps everything but the *.safetensors files, and lists in weights.json
each one's SHA-256 and its tensors' names, dtypes and shapes: a few KB that say exactly which weights the
model had, so a model trained again can be checked against them (`weight_digests`), and the architecture
can be rebuilt with fresh values (`load_recommender(..., architecture_only=True)`) to time it. A copy may
keep some weight files (`strip_weights(keep=...)`: a LoRA model's small ones); weights.json lists them all.
"""

from __future__ import annotations

import copy
import hashlib
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
from transformers import AutoConfig

from layerwise.models.lora import base_digest, has_lora, lora_state, merge_lora
from layerwise.models.presets import build_backbone, load_backbone
from layerwise.models.recommender import SequentialRecommender

FORMAT = "layerwise/1"
STRIPPED = "weights.json"  # what a stripped model directory keeps of its weight files
LORA = "lora.safetensors"  # a LoRA-trained model's adapter matrices (merged into its backbone too)


def save_recommender(model: SequentialRecommender, out_dir: str | Path, manifest: dict[str, Any],
                     weights_dtype: torch.dtype | None = None) -> Path:
    """Write `model` to `out_dir` atomically (a temp dir renamed into place); returns the path.

    weights_dtype: store the LoRA adapters and the recommender's own floating-point weights (items, head,
        norms) in this dtype (torch.float16 halves a LoRA teacher's small files: 12 MB for SmolLM2 on
        ml-100k). The backbone is merged from the stored adapters, so the model `load_recommender` gives
        back, here or rebuilt on another machine (layerwise.models.rebuild), is exactly the stored one; the
        caller's model is left as it was and differs from it by the rounding. The manifest records the dtype.
    """
    out_dir = Path(out_dir)
    adapters, lora = {}, None
    if weights_dtype is not None:
        model = copy.deepcopy(model)
        _round_own_weights(model, weights_dtype)
        manifest = {**manifest, "weights_dtype": str(weights_dtype).removeprefix("torch.")}
    if has_lora(model):
        # Adapter keys in the backbone would make it non-stock; merge them into a copy, never the caller's.
        # The adapters are kept too: with the pretrained model they make the backbone again (a few % of it).
        adapters, record = lora_state(model)
        lora = {**record, "base": manifest.get("pretrained"), "base_sha256": base_digest(model.backbone)}
        model = copy.deepcopy(model) if weights_dtype is None else model  # (a copy already)
        merge_lora(model)
    stored = weights_dtype or torch.float32
    with atomic_directory(out_dir) as tmp:
        model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
        if adapters:
            save_file({k: v.to(stored).cpu() for k, v in adapters.items()}, str(tmp / LORA))
        own = {k: (v.to(stored) if weights_dtype is not None and v.is_floating_point() else v).detach()
               .contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        save_file(own, str(tmp / "recommender.safetensors"))
        full = {
            "format": FORMAT, "family": model.family.name, "n_items": model.n_items,
            "n_layers": model.n_layers, "dropout": model.dropout.p, "input_norm": model.input_norm,
            "head": model.head_kind, "has_text": model.text_projection is not None,
            "bridges": _bridge_spec(model), **manifest, **({"lora": lora} if lora else {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2, default=_jsonable))
    return out_dir


@torch.no_grad()
def _round_own_weights(model: SequentialRecommender, dtype: torch.dtype) -> None:
    """Round, in place, the LoRA adapters and every floating-point weight outside the backbone to `dtype`'s
    values, keeping their own dtype: what save_recommender(weights_dtype=dtype) stores and merges from."""
    own = [t for name, t in model.state_dict(keep_vars=True).items()
           if (not name.startswith("backbone.") or "lora_" in name) and t.is_floating_point()]
    for tensor in own:
        tensor.copy_(tensor.to(dtype))


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


def check_data(manifest: dict[str, Any], data, model_dir: str | Path) -> None:
    """Refuse `data` (a SequenceData) for the model saved at `model_dir` unless it is the data set the model
    was trained on: the same catalogue size (item ids index the model's item table) and, where the manifest
    records one, the same split fingerprint (the same size with other items would rank the wrong ones)."""
    if manifest["n_items"] != data.n_items:
        raise ValueError(f"model {model_dir} was trained on {manifest['n_items']} items but data set "
                         f"{data.name!r} has {data.n_items}; use the data set it was trained on")
    expected = manifest.get("data_fingerprint")
    if expected and expected != data.fingerprint:
        raise ValueError(f"model {model_dir} was trained on data with fingerprint {expected[:12]}, but data set "
                         f"{data.name!r} has {data.fingerprint[:12]}: its item indices would not match")


def load_recommender(model_dir: str | Path,
                     adapters: Callable[[SequentialRecommender, dict[str, Any]], None] | None = None,
                     architecture_only: bool = False) -> SequentialRecommender:
    """Rebuild a saved recommender in eval mode.

    adapters: called as adapters(model, manifest) before the weights load, to add the modules the manifest
        lists beyond the recommender itself (a compact model's bridges: `layerwise.compression.compact.load_compact`
        passes `layerwise.compression.bridges.restore_bridges`). Without it, a model saved with bridges is refused.
    architecture_only: allow a stripped directory (`strip_weights`): the same modules and shapes with fresh
        random values, for timing only. Its scores mean nothing. Without it, a stripped directory is refused.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if (manifest.get("bridges") or {}).get("slots") and adapters is None:
        raise ValueError(f"{model_dir} is a compact model with bridge adapters; load it with "
                         f"layerwise.compression.compact.load_compact")
    if is_stripped(model_dir):
        if not architecture_only:
            if (model_dir / LORA).is_file() and (manifest.get("lora") or {}).get("base"):
                raise ValueError(f"{model_dir} keeps its LoRA adapters, not its merged backbone: make it whole "
                                 f"in a copy with `layerwise models rebuild {model_dir} --out DIR` "
                                 f"(layerwise.models.rebuild), then use DIR")
            raise ValueError(f"{model_dir} holds the architecture only: its weights were stripped "
                             f"({STRIPPED} lists them); train it again, or pass architecture_only=True to time it")
        backbone = build_backbone(AutoConfig.from_pretrained(str(model_dir / "backbone"), trust_remote_code=False))
        state = _fresh_tensors(json.loads((model_dir / STRIPPED).read_text())["recommender.safetensors"])
    else:
        backbone = load_backbone(str(model_dir / "backbone"))
        state = load_file(str(model_dir / "recommender.safetensors"))
    if manifest.get("weights_dtype"):  # stored in half precision, computed in float32 as trained
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
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


def is_stripped(model_dir: str | Path) -> bool:
    """Whether `model_dir` is a stripped copy (weights listed in weights.json, some of them not present)."""
    return bool(missing_weights(model_dir))


def missing_weights(model_dir: str | Path) -> list[str]:
    """The weight files a stripped copy lists in weights.json but does not hold; [] for a whole model."""
    model_dir = Path(model_dir)
    if not (model_dir / STRIPPED).is_file():
        return []
    return sorted(name for name in json.loads((model_dir / STRIPPED).read_text()) if not (model_dir / name).exists())


def weight_digests(model_dir: str | Path) -> dict[str, str]:
    """SHA-256 of each weight file of a saved model, by its path inside the directory; of a stripped copy,
    the digests its weights.json recorded."""
    model_dir = Path(model_dir)
    if is_stripped(model_dir):
        return {name: entry["sha256"] for name, entry in json.loads((model_dir / STRIPPED).read_text()).items()}
    return file_digests(model_dir)


def file_digests(folder: str | Path) -> dict[str, str]:
    """SHA-256 of each .safetensors file under `folder`, by its path inside it."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): _sha256(path) for path in sorted(folder.rglob("*.safetensors"))}


def strip_weights(model_dir: str | Path, out_dir: str | Path, keep: tuple[str, ...] = ()) -> Path:
    """Copy a saved model to `out_dir` without its weight files, listing each one's digest and tensor
    shapes in weights.json (a few KB instead of the weights). keep: weight files (paths inside the model)
    copied all the same, and listed too."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    read_manifest(model_dir)
    if is_stripped(model_dir):
        raise ValueError(f"{model_dir} is stripped already")
    absent = [name for name in keep if not (model_dir / name).is_file()]
    if absent:
        raise FileNotFoundError(f"{model_dir} has no {', '.join(absent)} to keep")
    listed = {}
    with atomic_directory(out_dir) as tmp:
        for path in sorted(model_dir.rglob("*")):
            name = path.relative_to(model_dir).as_posix()
            if path.is_dir():
                continue
            if path.suffix == ".safetensors":
                listed[name] = {"sha256": _sha256(path), "tensors": _tensor_shapes(path)}
            if path.suffix != ".safetensors" or name in keep:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / name)
        (tmp / STRIPPED).write_text(json.dumps(listed, indent=1))
    return out_dir


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_shapes(path: Path) -> dict[str, list]:
    """{tensor name: [dtype, shape]} from a safetensors file's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: [str(f.get_slice(name).get_dtype()), list(f.get_slice(name).get_shape())]
                for name in f.keys()}


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _fresh_tensors(listed: dict) -> dict[str, torch.Tensor]:
    """Tensors of the listed dtypes and shapes with fresh values (N(0, 0.02) for floats, zeros otherwise)."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, (dtype, shape) in listed["tensors"].items():
        kind = _DTYPES[dtype]
        values = torch.randn(shape, generator=generator) * 0.02 if kind.is_floating_point else torch.zeros(shape)
        out[name] = values.to(kind)
    return out


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
