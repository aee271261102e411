"""Per-family knowledge: where a backbone keeps its layer list and what must change when layers go.

Every family is a real `transformers` class. Removing layers from one of them is not just slicing a
`ModuleList`: the config counts the layers, decoder attention modules index the KV cache by
`layer_idx`, Qwen and Gemma 3 configs carry one entry per layer in `layer_types` (Gemma 3 alternates
sliding-window and full attention, and picks each layer's mask and RoPE by it), and T5 computes its relative
position bias only in block 0. A `Family` knows these facts for one architecture, so the rest of the
code can say "keep layers [1, 4, 6]" and get a backbone that stock `AutoModel.from_pretrained` loads
back with exactly three layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Family:
    """How one architecture stores and counts its layers.

    Attributes:
        name: registry key ("llama", "qwen2", "qwen3", "gemma3", "gpt2", "bert", "t5").
        causal: True for decoder families (predict the next item at every position).
        layer_path: dotted attribute path from the backbone to its `nn.ModuleList` of layers.
        count_key: config attribute that holds the number of layers.
        model_types: `config.model_type` values that belong to this family.
    """

    name: str
    causal: bool
    layer_path: str
    count_key: str
    model_types: tuple[str, ...]

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        """The backbone's layer list (the modules themselves, not a copy)."""
        module = backbone
        for attr in self.layer_path.split("."):
            module = getattr(module, attr)
        return module

    def n_layers(self, backbone: nn.Module) -> int:
        return len(self.layers(backbone))

    def keep_layers(self, backbone: PreTrainedModel, keep: list[int]) -> PreTrainedModel:
        """Physically shorten `backbone` in place to the layers `keep` (sorted, unique teacher indices).

        The removed layers are gone from the module tree and the state dict; the config's layer count
        and every per-layer field follow, so `save_pretrained` writes a genuinely smaller model.
        """
        old = self.layers(backbone)
        _check_keep(keep, len(old))
        kept = [old[i] for i in keep]
        _FIXUPS.get(self.name, _no_fixup)(backbone, kept, keep)
        parent_path, _, attr = self.layer_path.rpartition(".")
        parent = backbone
        for name in filter(None, parent_path.split(".")):
            parent = getattr(parent, name)
        setattr(parent, attr, nn.ModuleList(kept))
        _slice_config(backbone.config, self.count_key, keep)
        return backbone


def _check_keep(keep: list[int], n_layers: int) -> None:
    if list(keep) != sorted(set(keep)):
        raise ValueError(f"kept layer indices must be sorted and unique, got {keep}")
    if not keep:
        raise ValueError("at least one layer must be kept")
    if keep[0] < 0 or keep[-1] >= n_layers:
        raise ValueError(f"kept layer indices {keep} out of range for a {n_layers}-layer model")


def _slice_config(config: PretrainedConfig, count_key: str, keep: list[int]) -> None:
    setattr(config, count_key, len(keep))
    # Qwen2/3, Gemma 3 (and newer LLaMA-style configs) list one attention type per layer; the model
    # indexes it by the renumbered layer (mask, and Gemma 3's RoPE base), so it shrinks with the layers.
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
    if getattr(config, "max_window_layers", None) is not None:
        # Layers below max_window_layers use full attention; keep that property for the kept ones.
        config.max_window_layers = sum(1 for i in keep if i < config.max_window_layers)


def _renumber_decoder(backbone: nn.Module, kept: list[nn.Module], keep: list[int]) -> None:
    # The KV cache is a list indexed by `layer_idx`: a kept layer that still says 7 in a 2-layer
    # model fails with "Cache only has 2 layers" at generation time.
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx


def _fix_t5(backbone: nn.Module, kept: list[nn.Module], keep: list[int]) -> None:
    # T5 computes the relative position bias in block 0 only and passes it on. If block 0 goes, its
    # bias table moves to the new first block (same parameters, so the kept blocks see the same bias).
    old_first = backbone.encoder.block[0].layer[0].SelfAttention
    new_first = kept[0].layer[0].SelfAttention
    if new_first is not old_first:
        new_first.relative_attention_bias = old_first.relative_attention_bias
        new_first.has_relative_attention_bias = True
    for later in kept[1:]:
        attention = later.layer[0].SelfAttention
        if attention.has_relative_attention_bias and attention is not new_first:
            del attention.relative_attention_bias
            attention.has_relative_attention_bias = False
    _renumber_decoder(backbone, kept, keep)


def _no_fixup(backbone: nn.Module, kept: list[nn.Module], keep: list[int]) -> None:
    _renumber_decoder(backbone, kept, keep)


_FIXUPS: dict[str, Callable[[nn.Module, list[nn.Module], list[int]], None]] = {
    "t5": _fix_t5,
}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", True, "layers", "num_hidden_layers", ("llama",)),
    "qwen2": Family("qwen2", True, "layers", "num_hidden_layers", ("qwen2",)),
    "qwen3": Family("qwen3", True, "layers", "num_hidden_layers", ("qwen3",)),
    # Gemma 3's text model (Gemma3TextModel, model_type gemma3_text), as in the released 270M/1B.
    "gemma3": Family("gemma3", True, "layers", "num_hidden_layers", ("gemma3_text",)),
    "gpt2": Family("gpt2", True, "h", "n_layer", ("gpt2",)),
    "bert": Family("bert", False, "encoder.layer", "num_hidden_layers", ("bert",)),
    "t5": Family("t5", False, "encoder.block", "num_layers", ("t5",)),
}


def family_of(config: PretrainedConfig) -> Family:
    """The family of a transformers config, by its `model_type`."""
    for family in FAMILIES.values():
        if config.model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported model_type {config.model_type!r}; supported: {known}")
