"""Post-training weight quantization of the layers' Linear modules: INT8 dynamic, INT4 weight-only, and
our compact model followed by INT8.

INT8: `torch.ao.quantization.quantize_dynamic` with per-channel weight scales (int8 weights, activations
quantized per call; fbgemm/x86 kernels on CPU). torch 2.13 marks `torch.ao.quantization` deprecated in
favour of torchao, but it still runs; its DeprecationWarnings are silenced here and nothing else is.
INT4: HQQ (`hqq` package, half-quadratic quantization, no calibration data) with 4-bit weights packed two
per byte, one fp32 scale and zero per group of 64 input weights; on CPU its PyTorch backend dequantizes the
weight in every forward, so it saves memory, not time.

Only the backbone layers (and bridges) are quantized: the item table and head are a matmul with the
embedding, not an nn.Linear, and stay fp32 in every variant. GPT-2's Conv1D layers are first rewritten as
the equivalent nn.Linear so that both schemes reach them. No variant here is trained (post-training).

    int8 = quantize_int8(teacher); int4 = quantize_int4(teacher)
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from layerwise.baselines.budget import Budget, Variant, require
from layerwise.perf.cost import parameter_bytes
from layerwise.models.recommender import SequentialRecommender

INT8_SCHEME = ("torch.ao.quantization.quantize_dynamic, qint8 per-channel weights, dynamic per-tensor "
               "activations (deprecated in torch 2.13, still working)")
INT4_SCHEME = ("hqq 4-bit weight-only, group size 64 (the largest power of two <= 64 dividing the input width), "
               "fp32 scale and zero per group, dequantized in every forward")


def _conv1d_as_linear(root: nn.Module) -> None:
    """Replace GPT-2 Conv1D modules (y = x W + b, W (in, out)) by the identical nn.Linear (W transposed)."""
    for name, module in list(root.named_modules()):
        if type(module).__name__ != "Conv1D":
            continue
        weight = module.weight.detach()
        linear = nn.Linear(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
            linear.bias.copy_(module.bias)
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, linear)


def _quantizable(model: SequentialRecommender) -> list[nn.Module]:
    """The parts whose Linear modules are quantized: the backbone layers and the bridges."""
    return [model.layers, *getattr(model, "bridges", {}).values()]


def quantize_int8(model: SequentialRecommender) -> SequentialRecommender:
    """A copy of `model` with int8 dynamic-quantized Linear modules in its layers and bridges (CPU)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    quantized = copy.deepcopy(model).cpu().eval()
    for part in _quantizable(quantized):
        _conv1d_as_linear(part)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated")
            quantize_dynamic(part, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return quantized


def int4_group_size(in_features: int, preferred: int = 64) -> int:
    """The largest group size <= preferred (a power of two, at least 8) that divides `in_features`."""
    group = preferred
    while group >= 8:
        if in_features % group == 0:
            return group
        group //= 2
    raise ValueError(f"no INT4 group size from {preferred} down to 8 divides {in_features} input features")


def quantize_int4(model: SequentialRecommender, group_size: int = 64) -> SequentialRecommender:
    """A copy of `model` whose layers' and bridges' Linear modules are HQQ 4-bit weight-only (CPU)."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as err:
        raise ImportError("INT4 weight-only quantization uses the `hqq` package: pip install hqq") from err
    quantized = copy.deepcopy(model).cpu().eval()
    for part in _quantizable(quantized):
        _conv1d_as_linear(part)
        for name, module in list(part.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            config = BaseQuantizeConfig(nbits=4, group_size=int4_group_size(module.in_features, group_size))
            with torch.no_grad():  # HQQ's tensors must be graph leaves, or the model cannot be deep-copied
                layer = HQQLinear(module, config, compute_dtype=torch.float32, device="cpu")
            parent, _, attr = name.rpartition(".")
            setattr(part.get_submodule(parent) if parent else part, attr, layer)
    return quantized


def _is_int8_linear(module: nn.Module) -> bool:
    # Its `_packed_params` child has `_weight_bias` too: match the Linear alone, or bytes count twice.
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def _packed_extra_bytes(module: nn.Module) -> int:
    """Bytes a quantized module holds outside its parameters and buffers (so `parameter_bytes` misses)."""
    if _is_int8_linear(module):  # torch.ao dynamic Linear: packed int8 weight, scales, zeros, bias
        weight, bias = module._weight_bias()
        total = weight.numel() * weight.element_size()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            total += sum(t.numel() * t.element_size()
                         for t in (weight.q_per_channel_scales(), weight.q_per_channel_zero_points()))
        return total + (bias.numel() * bias.element_size() if bias is not None else 0)
    if type(module).__name__ == "HQQLinear":  # packed W_q is a parameter; scales, zeros and bias are not
        tensors = [t for t in module.meta.values() if isinstance(t, torch.Tensor)]
        if isinstance(module.bias, torch.Tensor) and not isinstance(module.bias, nn.Parameter):
            tensors.append(module.bias)
        return sum(t.numel() * t.element_size() for t in tensors)
    return 0


def is_quantized(model: nn.Module) -> bool:
    """True when `model` holds int8 or HQQ modules (they have no stock `save_pretrained` format)."""
    return any(_is_int8_linear(m) or type(m).__name__ == "HQQLinear" for m in model.modules())


def storage_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer plus the packed weights, scales and zeros of quantized modules.

    `layerwise.perf.cost.parameter_bytes` alone would miss the int8 weights (they live in packed params).
    """
    return parameter_bytes(model) + sum(_packed_extra_bytes(m) for m in model.modules())


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weight matrices alone (no scales, no biases) of the Linear-like modules in `module`."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            total += m.weight.numel() * m.weight.element_size()
        elif _is_int8_linear(m):
            weight = m._weight_bias()[0]
            total += weight.numel() * weight.element_size()
        elif type(m).__name__ == "HQQLinear":
            total += m.W_q.numel() * m.W_q.element_size()
    return total


def _quantized_variant(row: str, model: SequentialRecommender, reference: nn.Module, scheme: str) -> Variant:
    info = {"scheme": scheme, "layer_weight_bytes_before": linear_weight_bytes(reference.layers),
            "layer_weight_bytes_after": linear_weight_bytes(model.layers)}
    return Variant(row, model, row, None, info)


def int8(data, teacher=None, budget: Budget | None = None, **context) -> list[Variant]:
    """Registry `int8`: the teacher with int8 dynamic-quantized layers (no training)."""
    require("int8", teacher, budget)
    return [_quantized_variant("int8", quantize_int8(teacher), teacher, INT8_SCHEME)]


def int4(data, teacher=None, budget: Budget | None = None, **context) -> list[Variant]:
    """Registry `int4`: the teacher with HQQ 4-bit weight-only layers (no training)."""
    require("int4", teacher, budget)
    return [_quantized_variant("int4", quantize_int4(teacher), teacher, INT4_SCHEME)]


def depth_int8(data, teacher=None, budget: Budget | None = None, compact: SequentialRecommender | None = None,
               progress: bool = False, **context) -> list[Variant]:
    """Registry `ours+int8`: our healed compact model (context `compact`, or compressed here), then INT8."""
    budget = require("ours+int8", teacher, budget)
    if compact is None:
        from layerwise.baselines.depth import ours

        compact = ours(data, teacher=teacher, budget=budget, progress=progress)[-1].model
    variant = _quantized_variant("ours+int8", quantize_int8(compact), compact, INT8_SCHEME)
    variant.info["kept"] = list(compact.kept)
    return [variant]
