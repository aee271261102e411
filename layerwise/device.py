"""Where a model runs: one device setting (`auto`, `cpu`, `cuda`, `cuda:N`) for every command and config.

    device = resolve_device("auto")          # cuda when a GPU is visible, else cpu
    model.to(device)                         # the library then follows the model: batches go where it is

The library's loops (training, healing, evaluation, importance, benchmarks) take no device argument: they
read the model's (`model_device`) and move each batch there, so a caller places the model once. Nothing
changes on a CPU: moving a CPU tensor to the CPU is the tensor itself, and CPU autocast stays as configured.

On CUDA the layers run under bf16 autocast where the card supports it (`autocast_for`); scores stay float32
(`SequentialRecommender.item_scores`), so ties are not invented by rounding.
"""

from __future__ import annotations

import contextlib
import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DEVICE_HELP = ("where models run: auto (CUDA when a GPU is visible, else CPU), cpu, cuda or cuda:N "
               "(default: %(default)s)")
AUTOCASTS = ("bf16", "fp32")  # fp32: never autocast, even on a GPU

# Published dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of the cards we know, matched on the name
# torch reports. Longest match first: "H100 NVL" before "H100".
PEAK_BF16_TFLOPS = (
    ("GH200", 989.4),
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),      # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): cuda when a GPU is visible, else cpu. `cuda`/`cuda:N` must be visible; a
    ValueError names what is wrong."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None else str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not match:
        raise ValueError(f"unknown device {spec!r}; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device {spec!r} asked for but no CUDA GPU is visible (torch {torch.__version__}, "
                         f"{build}); use --device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} asked for but only {torch.cuda.device_count()} GPU(s) are visible")
    return torch.device("cuda", index)


def check_device(spec: str | None) -> str:
    """A config's `device:` value checked for spelling only (a GPU need not be visible where it is read)."""
    value = "auto" if spec is None else str(spec).strip().lower()
    if value not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", value):
        raise ValueError(f"unknown device {spec!r}; choose {DEVICE_CHOICES}")
    return value


def wants_gpu(spec: str | None) -> bool:
    """Whether a device setting asks for a GPU where it runs: cuda[:N], or auto where one is visible."""
    value = check_device(spec)
    return value.startswith("cuda") or (value == "auto" and torch.cuda.is_available())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (cpu for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 matrix products run natively there: a CUDA card of compute capability 8.0 or newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_for(autocast: str | None, device: torch.device | str) -> str | None:
    """The autocast a loop uses on `device`. On a CPU: as configured (None stays None). On CUDA: None
    becomes bf16 where the card supports it; bf16 asked on a card without it runs in float32; fp32 is off."""
    if autocast not in (None, *AUTOCASTS):
        raise ValueError(f"unknown autocast {autocast!r}; choose {', '.join(AUTOCASTS)} or leave it unset")
    if torch.device(device).type != "cuda":
        return autocast
    if autocast == "fp32" or not bf16_supported(device):
        return None
    return "bf16"


def inference_autocast(device: torch.device | str):
    """The context an evaluation or benchmark runs its layers in: bf16 autocast on a CUDA card that
    supports it, nothing elsewhere (a CPU evaluation keeps its bits)."""
    device = torch.device(device)
    if autocast_for(None, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_scorer(model: torch.nn.Module):
    """`model.score` where the model is, under `inference_autocast`: histories (B, T) on any device ->
    scores (B, n_items + 1) on the model's device. On a CPU it is `model.score` itself, bit for bit."""
    device = model_device(model)

    def score(histories: torch.Tensor) -> torch.Tensor:
        with inference_autocast(device):
            return model.score(histories)

    return score


def peak_bf16_flops(name: str) -> float | None:
    """The card's published dense bf16 peak in FLOP/s, or None for a card not in PEAK_BF16_TFLOPS."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def describe(device: torch.device | str) -> dict:
    """What a result records about where it ran: the device, and on CUDA the card, its memory, bf16
    support and published bf16 peak."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": str(device)}
    props = torch.cuda.get_device_properties(device)
    return {"device": str(device), "gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}", "bf16": bf16_supported(device),
            "peak_bf16_tflops": (peak_bf16_flops(props.name) or 0) / 1e12 or None, "cuda": torch.version.cuda}
