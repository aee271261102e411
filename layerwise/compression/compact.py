"""The compact model: the teacher with only the kept layers, physically, plus bridges at the gaps.

No masks, no flags, no skip branches in a full-size model: the removed layers are deleted from the module
tree, the config counts k layers, and `save_pretrained` writes a k-layer backbone that stock
`transformers.AutoModel.from_pretrained` loads. Bridges (layerwise.compression.bridges) join kept layers that were
not neighbours in the teacher; they are saved beside the backbone, never inside it.

    compact = build_compact(teacher, keep=[0, 5], bridge_rank=16)
    save_compact(compact, "runs/compact", {"selector": "beam"})
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from layerwise.compression.bridges import detach_bridges, gap_slots, restore_bridges, set_bridges
from layerwise.models.checkpoint import check_data, load_recommender, read_manifest, save_recommender
from layerwise.models.lora import merge_lora
from layerwise.models.recommender import SequentialRecommender


def build_compact(teacher: SequentialRecommender, keep: list[int], bridge_rank: int = 0,
                  seed: int | None = None) -> SequentialRecommender:
    """A new model holding deep copies of the teacher's layers `keep` (sorted teacher indices).

    bridge_rank: rank of the bridge adapters at the gaps; 0 means no bridges (plain removal).
    seed: seeds the bridges' random initialisation (without touching the global RNG); None draws from it.
    The returned model carries `kept` (teacher indices) and `teacher_layers` (L) for its manifest. A
    teacher's unmerged LoRA (an LLM recommender still in memory) is merged into the student's plain layers,
    as saving would, so that healing can add its own adapters.
    """
    n_teacher = teacher.n_layers
    student = copy.deepcopy(teacher)
    merge_lora(student)
    detach_bridges(student.layers)
    student.family.keep_layers(student.backbone, list(keep))
    if bridge_rank < 0:
        raise ValueError(f"bridge rank must be >= 0, got {bridge_rank}")
    slots = gap_slots(list(keep), n_teacher) if bridge_rank else []
    if slots and seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            set_bridges(student, slots, bridge_rank)
    elif slots:
        set_bridges(student, slots, bridge_rank)
    else:
        student.bridges = nn.ModuleDict()
    student.kept = list(keep)
    student.teacher_layers = n_teacher
    return student


def save_compact(model: SequentialRecommender, out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Save a compact model (safetensors + JSON) with its kept teacher indices in the manifest."""
    return save_recommender(model, out_dir, {
        "kind": "compact", "kept": model.kept, "teacher_layers": model.teacher_layers, **manifest,
    })


def load_compact(model_dir: str | Path, architecture_only: bool = False, data=None) -> SequentialRecommender:
    """Load any saved model, bridges included; a compact one gets `kept` and `teacher_layers` back from its
    manifest (a teacher: all its layers). architecture_only: see `load_recommender` (a stripped copy).
    data: the SequenceData it will be used on, checked first to be the one it was trained on (`check_data`)."""
    manifest = read_manifest(model_dir)
    if data is not None:
        check_data(manifest, data, model_dir)
    model = load_recommender(model_dir, adapters=restore_bridges, architecture_only=architecture_only)
    model.kept = manifest.get("kept", list(range(model.n_layers)))
    model.teacher_layers = manifest.get("teacher_layers", model.n_layers)
    return model


def removed_parameters(teacher: SequentialRecommender, keep: list[int]) -> int:
    """Analytic parameter reduction: the parameters of the removed layers.

    T5's relative position bias table is not removed with block 0: it moves to the new first block.
    """
    kept = set(keep)
    removed = 0
    for index, layer in enumerate(teacher.layers):
        if index not in kept:
            removed += sum(p.numel() for p in layer.parameters())
    if teacher.family.name == "t5" and 0 not in kept:
        bias = teacher.layers[0].layer[0].SelfAttention.relative_attention_bias
        removed -= bias.weight.numel()
    return removed
