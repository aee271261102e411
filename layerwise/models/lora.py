"""LoRA (peft) on a recommender's transformer layers, and merging it back into plain weights.

One implementation for the two places that adapt pretrained layers with low-rank updates: training an
LLM recommender (layerwise.models.llm) and healing a compact model (layerwise.distill). After
`merge_lora` the backbone holds plain `nn.Linear` modules again, so `save_pretrained` writes a
directory that stock `AutoModel.from_pretrained` loads, with no peft and no adapter keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the model's transformer layers (LLaMA, Qwen, Gemma 3:
    q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.layers.named_modules()
             if isinstance(module, nn.Linear)}
    return sorted(names)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: list[str] | None = None) -> list[nn.Parameter]:
    """Inject LoRA adapters of `rank` (alpha defaults to 2 * rank) into the backbone's layers.

    Only the backbone's transformer layers get adapters (the targets are looked up there); the new
    A and B matrices train, B starts at zero so the model's output is unchanged. Returns them.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        target_modules=targets or lora_targets(model), lora_dropout=0.0)
    inject_adapter_in_model(config, model.backbone)
    model._has_lora = True
    params = [p for name, p in model.backbone.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def has_lora(model: nn.Module) -> bool:
    """True while the backbone holds unmerged LoRA adapters."""
    return any("lora_" in name for name, _ in model.backbone.named_parameters())


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold LoRA deltas into the base weights and put plain nn.Linear modules back (no-op without)."""
    if not has_lora(model):
        model._has_lora = False
        return
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, attr, module.get_base_layer())
    if hasattr(model.backbone, "peft_config"):  # no adapters left: a later add_lora starts afresh
        del model.backbone.peft_config
    model._has_lora = False
