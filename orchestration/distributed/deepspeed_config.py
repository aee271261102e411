"""The one place a DeepSpeed config is built, for CPU (tests, small runs) and GPU (ZeRO-3 at 1B-13B).

    from orchestration.distributed.deepspeed_config import deepspeed_config
    config = deepspeed_config(stage=2, lr=1e-3, batch_size=32)             # CPU: fp32, torch AdamW, gloo
    config = deepspeed_config(stage=3, lr=1e-4, batch_size=8, device="cuda")  # GPU: bf16 if supported

On CPU the optimizer is DeepSpeed's AdamW with `torch_adam: true`, so no compiled optimizer op is needed,
and the numbers are fp32. DeepSpeed picks its CPU accelerator and falls back from oneCCL to gloo by
itself; the caller sets `DS_ACCELERATOR=cpu` before importing deepspeed to be sure (see
orchestration.distributed.training). The GPU branch is only taken when asked for and a GPU is really there.
"""

from __future__ import annotations

from typing import Any

import torch

DEVICES = ("cpu", "cuda")
# DeepSpeed's own defaults, written out so the ZeRO-3 behaviour is visible and tunable in one place.
_STAGE3 = {
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    # One full 16-bit state dict on rank 0 at save time, so a saved model needs no ZeRO tooling to load.
    "stage3_gather_16bit_weights_on_model_save": True,
}


def deepspeed_config(stage: int, lr: float, batch_size: int, grad_clip: float = 1.0,
                     device: str = "cpu", bf16: bool | None = None, weight_decay: float = 0.01,
                     offload: bool = False) -> dict[str, Any]:
    """A DeepSpeed config dict for `deepspeed.initialize(config=...)`.

    Args:
        stage: ZeRO stage 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients) or 3 (+ weights).
        lr: AdamW learning rate.
        batch_size: micro batch per worker; DeepSpeed derives the global batch from the world size.
        grad_clip: gradient-norm clipping (0 disables it).
        device: "cpu" or "cuda". "cuda" needs a visible GPU; CPU runs never take the GPU branch.
        bf16: bfloat16 training on GPU; None = whenever the GPU supports it. Must not be True on CPU.
        weight_decay: AdamW decoupled weight decay.
        offload: ZeRO-Offload of optimizer states (and weights at stage 3) to CPU memory; GPU only.

    Returns:
        A JSON-able dict.
    """
    _check(stage, lr, batch_size, device)
    if device == "cpu" and (bf16 or offload):
        raise ValueError("bf16 and offload are GPU options; on CPU DeepSpeed trains in fp32 without offload")
    zero: dict[str, Any] = {"stage": stage}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay,
            # DeepSpeedCPUAdam (a compiled op) is what ZeRO-Offload needs; torch's AdamW otherwise.
            "torch_adam": not offload,
        }},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,  # progress goes through ray.train.report, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }
    if device == "cuda":
        config["bf16"] = {"enabled": bool(torch.cuda.is_bf16_supported() if bf16 is None else bf16)}
        zero.update(_gpu_zero(stage, offload))
    return config


def _gpu_zero(stage: int, offload: bool) -> dict[str, Any]:
    """ZeRO options that only pay off with GPUs: overlapped communication, ZeRO-3 buckets, offload."""
    zero: dict[str, Any] = {"overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 500_000_000}
    if stage == 3:
        zero.update(_STAGE3)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return zero


def _check(stage: int, lr: float, batch_size: int, device: str) -> None:
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size (micro batch per worker) must be a positive int, got {batch_size!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for but no GPU is visible; use device='cpu'")
