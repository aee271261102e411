"""LoRA (peft) on a recommender's transformer layers, and merging it back into plain weights.

One implementation for the two places that adapt pretrained layers with low-rank updates: training an
LLM recommender (layerwise.models.llm) and healing a compact model (layerwise.compression.distill). After
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
def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """weight + scaling * (b @ a), with the same bits on every CPU.

    A matrix product's rounding depends on the BLAS kernel (its blocking, FMA, the CPU's vector width), so
    peft's merge gives different bits on different machines. Here each of the r rank-one terms is an
    elementwise float64 product of float32 values, which is exact; the terms are summed in rank order,
    scaled and added to the weight in float64, one IEEE operation at a time, and rounded to the weight's
    dtype once. Every step is correctly rounded, so the result is fixed by the inputs alone: a LoRA teacher
    rebuilt from its base model and adapter matrices on another machine has the saved teacher's digests.
    """
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    delta = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
    for r in range(a.shape[0]):
        delta += b64[:, r:r + 1] * a64[r:r + 1, :]
    return (weight.to(torch.float64) + delta * float(scaling)).to(weight.dtype)


def lora_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The backbone's unmerged adapters: ({"<module>.lora_A": A, "<module>.lora_B": B}, {"rank", "alpha",
    "targets", "scaling"}), module names relative to the backbone; ({}, {}) without LoRA."""
    from peft.tuners.lora import LoraLayer

    tensors, record = {}, {}
    for name, module in model.backbone.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        (adapter,) = module.lora_A.keys()  # add_lora injects one adapter ("default")
        tensors[f"{name}.lora_A"] = module.lora_A[adapter].weight.detach().contiguous().cpu()
        tensors[f"{name}.lora_B"] = module.lora_B[adapter].weight.detach().contiguous().cpu()
        record = {"rank": module.r[adapter], "alpha": module.lora_alpha[adapter],
                  "scaling": module.scaling[adapter]}
    if tensors:
        record["targets"] = sorted({key.rsplit(".", 2)[-2] for key in tensors})
    return tensors, record


def base_digest(backbone: nn.Module) -> str:
    """SHA-256 of the backbone's weights without its adapters (names, dtypes, shapes and bytes in name
    order; peft's `.base_layer` dropped from names): what a saved LoRA model's adapters were trained on, so
    that a rebuild from the pretrained model can tell that it starts from the same base."""
    import hashlib

    digest = hashlib.sha256()
    state = {name.replace(".base_layer", ""): tensor for name, tensor in backbone.state_dict().items()
             if "lora_" not in name}
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def apply_lora_state(backbone: nn.Module, tensors: dict[str, torch.Tensor], scaling: float) -> None:
    """Merge saved adapters (`lora_state`'s tensors) into a plain backbone's linear layers (merged_weight)."""
    modules = sorted({key.rsplit(".", 1)[0] for key in tensors})
    for name in modules:
        linear = backbone.get_submodule(name)
        a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise ValueError(f"LoRA matrices for {name} ({list(b.shape)} x {list(a.shape)}) do not fit its "
                             f"{linear.out_features} x {linear.in_features} weight")
        linear.weight.copy_(merged_weight(linear.weight, a, b, scaling))


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold LoRA deltas into the base weights (merged_weight: the same bits on any CPU) and put plain
    nn.Linear modules back (no-op without)."""
    if not has_lora(model):
        model._has_lora = False
        return
    from peft.tuners.lora import LoraLayer

    tensors, record = lora_state(model)  # what saving keeps: the same merge as a rebuild from these
    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, attr, module.get_base_layer())
    apply_lora_state(model.backbone, tensors, record["scaling"])
    if hasattr(model.backbone, "peft_config"):  # no adapters left: a later add_lora starts afresh
        del model.backbone.peft_config
    model._has_lora = False
