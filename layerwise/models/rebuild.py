"""Make a LoRA-trained model whole again from its pretrained backbone and its adapters.

A recommender trained with LoRA on a pretrained LLM saves its backbone with the adapters merged (hundreds of
MB) and, beside it, the adapter matrices and its own weights (a few MB: `layerwise.models.checkpoint`). A copy
may keep only the small files: the merged backbone follows from the pretrained model, which every machine
converts from the same published file, and the adapters, merged by `merged_weight`, whose result has the
same bits on any CPU. So a study archive can carry an LLM teacher in ~25 MB and another machine can continue
from exactly that teacher:

    if rebuildable(model_dir):
        rebuild_backbone(model_dir)          # writes backbone/model.safetensors; checks every digest
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file

from layerwise.models.checkpoint import (
    LORA, STRIPPED, atomic_directory, file_digests, missing_weights, read_manifest, weight_digests,
)

BACKBONE_WEIGHTS = "backbone/model.safetensors"


def rebuildable(model_dir: str | Path) -> bool:
    """Whether a stripped copy lacks only its merged backbone, which its adapters and the pretrained model
    it names make again (rebuild_backbone)."""
    model_dir = Path(model_dir)
    if missing_weights(model_dir) != [BACKBONE_WEIGHTS]:
        return False
    record = read_manifest(model_dir).get("lora") or {}
    return bool(record.get("base")) and (model_dir / LORA).is_file()


def rebuild_backbone(model_dir: str | Path, pretrained: str | Path | None = None) -> None:
    """Write the merged backbone of a stripped LoRA model (rebuildable) in place, and check that every weight
    file then has the digest its weights.json lists.

    pretrained: the base model's directory; default: the name the manifest records, resolved (and converted
    from its GGUF the first time) by layerwise.models.pretrained. Raises ValueError when the base is not the
    one the adapters were trained on, or the result differs from the listed digests; the copy is unchanged.
    """
    from layerwise.models.lora import apply_lora_state, base_digest
    from layerwise.models.presets import load_backbone

    model_dir = Path(model_dir)
    if not rebuildable(model_dir):
        raise ValueError(f"{model_dir} is no LoRA model stripped of its merged backbone alone "
                         f"(missing: {missing_weights(model_dir) or 'nothing'})")
    record = read_manifest(model_dir)["lora"]
    listed = weight_digests(model_dir)
    kept = file_digests(model_dir)
    if any(listed.get(name) != digest for name, digest in kept.items()):  # a copy must not mix two models
        raise ValueError(f"{model_dir}: its kept weight files are not those its {STRIPPED} lists")
    if pretrained is None:
        from layerwise.models.pretrained import resolve_pretrained

        pretrained = resolve_pretrained(record["base"])
    config = json.loads((model_dir / "backbone" / "config.json").read_text())
    backbone = load_backbone(str(pretrained))
    _as_trained(backbone, config)
    found = base_digest(backbone)
    if found != record["base_sha256"]:
        raise ValueError(f"{model_dir}: the base model {pretrained} is not the one its adapters were trained on "
                         f"(weights digest {found[:16]}, the manifest's {record['base_sha256'][:16]})")
    apply_lora_state(backbone, load_file(str(model_dir / LORA)), record["scaling"])
    with atomic_directory(model_dir / "backbone") as tmp:
        backbone.save_pretrained(tmp, safe_serialization=True)
        shutil.copy2(model_dir / "backbone" / "config.json", tmp / "config.json")  # the saved one, as it was
        made = file_digests(tmp)
        expected = {name.removeprefix("backbone/"): digest for name, digest in listed.items()
                    if name.startswith("backbone/")}
        if made != expected:
            raise ValueError(f"{model_dir}: the rebuilt backbone's weights ({made}) are not the listed ones "
                             f"({expected}); nothing was written")
    (model_dir / STRIPPED).unlink()  # whole again


def kept_files(model_dir: str | Path) -> tuple[str, ...] | None:
    """The weight files of a whole LoRA-trained model that a copy keeps so that rebuild_backbone can make it
    whole again (all but the merged backbone), or None for a model that cannot be rebuilt so."""
    model_dir = Path(model_dir)
    record = read_manifest(model_dir).get("lora") or {}
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*.safetensors"))
    if not record.get("base") or LORA not in files or BACKBONE_WEIGHTS not in files:
        return None
    return tuple(f for f in files if f != BACKBONE_WEIGHTS)


def _as_trained(backbone, config: dict) -> None:
    """Cut a freshly loaded pretrained backbone as the LLM recommender did before training (its first n
    layers, the 2-row token table: layerwise.models.llm.apply_llm_setup), by the saved backbone's config.
    Anything else that differs shows in the base digest."""
    from layerwise.models.families import family_of
    from layerwise.models.llm import drop_token_table

    family = family_of(backbone.config)
    n_layers = len(family.layers(backbone))
    wanted = config.get("num_hidden_layers", n_layers)
    if wanted < n_layers:
        family.keep_layers(backbone, list(range(wanted)))
    if config.get("vocab_size") == 2 and backbone.config.vocab_size != 2:
        drop_token_table(backbone)
