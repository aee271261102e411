"""Plan a run past one machine: parameters, memory per GPU under ZeRO 0-3, importance shards, DeepSpeed.

    layerwise plan --family bert --size base --gpus 1
    layerwise plan --family llama --size 13b --keep 0.25 --gpus 8 --json runs/plan.json
    layerwise plan --config ~/models/Qwen3-14B --gpus 4      # any local shape, from its config.json alone

Models are the published shapes of `layerwise.models.scale`, or any local model's config.json (`--config`),
built on the meta device (no memory). The
compact model keeps k = round(keep * L) layers chosen by the `uniform` selector (a representative
selection; a real run selects by importance, with the same count) plus bridges of rank r at the gaps.
All memory is in GiB per GPU; a configuration "fits" when it needs at most USABLE of the GPU's memory
(the rest goes to the CUDA context, NCCL buffers and fragmentation).

Formulas (P parameters, N GPUs, B micro batch, T sequence length, bf16 = 2 bytes, fp32 = 4 bytes):
- Model states, mixed precision with AdamW: ZeRO stages 2 and 3 use DeepSpeed's own estimators
  (`estimate_zero2_model_states_mem_needs`: 2P + 18P/N; `estimate_zero3_model_states_mem_needs`:
  4 x largest module + 18P/N; the functions that the printing `*_all_cold` helpers call), stages 0 and 1
  the ZeRO paper's 16 bytes per parameter (2 weights + 2 grads + 12 Adam: fp32 master, m, v) split as
  stage 1: 4P + 12P/N, stage 0: 16P. Each row names its source; `analytic_gib` is the paper's formula.
- Training activations (no recomputation, fused SDPA attention, so no T x T score matrix is stored):
  per layer and token, bf16 values kept for backward = 4h + 2q + 2kv + 4f (gated SwiGLU MLP: LLaMA, Qwen3)
  or 4h + 2q + 2kv + 2f (BERT, T5 v1.0), with h hidden, q = heads x head_dim, kv = KV heads x head_dim,
  f intermediate: two norm inputs and outputs, Q, K, V, the attention output, the MLP's inner tensors.
  Plus 3h per token around the stack and fp32 logits with their gradient: 2 x 4 x B x T x (n_items + 1).
  With activation checkpointing only each layer's input (h per token) and one layer's full set remain.
  Dropout masks (1 byte, BERT/T5 only) are not counted.
- Healing: a frozen bf16 teacher (2P, replicated, inference: one layer's transients, the hidden states at
  the kept layers for the MSE term, fp32 logits) plus the compact student trained as above (all of it
  trainable, the `--trainable all` default; the bridges' own activations are small and not counted).
- Inference (bf16, `score` at batch B): 2P weights + the residual stream + one layer's transients
  (bounded by the training count per layer) + fp32 scores B x (n_items + 1).
- Sharded importance (fp32, as the exactness test runs it, calibration 8 batches x 64, `layerwise score`
  defaults): each shard holds its layers' weights and gradients (8 bytes per parameter), one batch's
  activations through its layers, and, for every calibration batch, its input states and output
  gradients (2 x 4 x batches x 64 x T x h). The fewest contiguous shards
  (`orchestration.distributed.shards.split_shards`) whose largest one fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from layerwise.compression.compact import build_compact
from layerwise.compression.compress import n_kept
from layerwise.models.scale import (
    count_parameters,
    count_shape,
    load_shape,
    meta_recommender,
    meta_recommender_from,
    numel,
)
from layerwise.compression.select import SELECTORS
from orchestration.distributed.deepspeed_config import deepspeed_config
from orchestration.outputs import write_json
from orchestration.distributed.shards import split_shards

GIB = 2**30
USABLE = 0.9
BF16, FP32 = 2, 4
CALIB_BATCHES, CALIB_BATCH_SIZE = 8, 64
LR = 1e-4
STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class LayerDims:
    """The widths that set a layer's activation memory (see the module docstring)."""

    hidden: int
    q: int
    kv: int
    ffn: int
    gated: bool

    def values_per_token(self) -> int:
        """bf16 values one layer keeps per token for its backward pass."""
        return 4 * self.hidden + 2 * self.q + 2 * self.kv + (4 if self.gated else 2) * self.ffn


def layer_dims(config) -> LayerDims:
    """LayerDims of a LLaMA, Qwen3, BERT or T5 config."""
    if config.model_type == "t5":
        inner = config.num_heads * config.d_kv
        return LayerDims(config.d_model, inner, inner, config.d_ff, config.is_gated_act)
    if config.model_type == "bert":
        h = config.hidden_size
        return LayerDims(h, h, h, config.intermediate_size, False)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LayerDims(config.hidden_size, config.num_attention_heads * head_dim,
                     config.num_key_value_heads * head_dim, config.intermediate_size, True)


# --- memory pieces -------------------------------------------------------------------------------
def analytic_model_states(params: int, stage: int, gpus: int) -> int:
    """ZeRO paper bytes per GPU: 2 B bf16 weights + 2 B bf16 grads + 12 B Adam, partitioned by stage."""
    weights, grads, optimizer = 2 * params, 2 * params, 12 * params
    optimizer = optimizer / gpus if stage >= 1 else optimizer
    grads = grads / gpus if stage >= 2 else grads
    weights = weights / gpus if stage >= 3 else weights
    return int(weights + grads + optimizer)


def _deepspeed_estimate(params: int, stage: int, gpus: int, largest: int) -> tuple[int, str] | None:
    """DeepSpeed's estimator for stages 2 and 3 (no offload); None where DeepSpeed has none."""
    if stage not in (2, 3):
        return None
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported, as the workers do
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

        _, gpu = zero2(params, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False)
        return int(gpu), "deepspeed estimate_zero2_model_states_mem_needs"
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3

    _, gpu, _ = zero3(params, largest, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False,
                      cpu_offload_params=False)
    return int(gpu), "deepspeed estimate_zero3_model_states_mem_needs"


def model_states(params: int, stage: int, gpus: int, largest: int) -> dict[str, Any]:
    """Weights, gradients and optimizer states per GPU: {"bytes", "source", "analytic_bytes"}."""
    analytic = analytic_model_states(params, stage, gpus)
    estimate = _deepspeed_estimate(params, stage, gpus, largest)
    if estimate is None:
        return {"bytes": analytic, "source": "analytic (ZeRO paper)", "analytic_bytes": analytic}
    return {"bytes": estimate[0], "source": estimate[1], "analytic_bytes": analytic}


def largest_module(model: nn.Module) -> int:
    """Parameters held directly by the biggest single module, as DeepSpeed's `model_to_params` counts.
    (DeepSpeed's own helper dedupes by data_ptr, which is 0 for every meta tensor.)"""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _logits_bytes(rows: int, n_items: int) -> int:
    return 2 * FP32 * rows * (n_items + 1)  # fp32 logits and their gradient (or the softmax)


def training_activations(dims: LayerDims, n_layers: int, tokens: int, n_items: int,
                         checkpointed: bool = False) -> int:
    """Activation bytes of one training micro batch of `tokens` = B x T positions."""
    layer = BF16 * tokens * dims.values_per_token()
    stack = BF16 * tokens * dims.hidden * n_layers + layer if checkpointed else layer * n_layers
    return stack + BF16 * tokens * 3 * dims.hidden + _logits_bytes(tokens, n_items)


def inference_memory(params: int, dims: LayerDims, batch: int, seq: int, n_items: int,
                     value_bytes: int = BF16, mapped_table_rows: int = 0) -> dict[str, int]:
    """Inference of `score` on (batch, seq) histories: weights and peak activations, bytes.

    value_bytes: bytes per weight and activation value (bf16 by default; 4 for an fp32 CPU run).
    mapped_table_rows: rows of an input token table (hidden wide, part of `params`) that stays memory-mapped
        from its safetensors file, as `from_pretrained` leaves it on CPU: a lookup pages in only the rows it
        reads, at most batch x seq of them. 0 (the default) counts every weight as resident, as on a GPU.
        A recommender has no such table: its item table is also its output head, so every row is read.
    The scores are fp32, one row of n_items + 1 per history (an LM scoring its last position alike).
    """
    activations = value_bytes * batch * seq * (dims.hidden + dims.values_per_token()) + FP32 * batch * (n_items + 1)
    unread = max(mapped_table_rows - batch * seq, 0) * dims.hidden
    weights = value_bytes * (params - unread)
    return {"weights": weights, "activations": activations, "total": weights + activations,
            "mapped_unread": value_bytes * unread}


def _teacher_for_healing(params: int, dims: LayerDims, k: int, tokens: int, n_items: int) -> int:
    transient = BF16 * tokens * dims.values_per_token()
    kept_states = BF16 * tokens * dims.hidden * (k + 1)
    return BF16 * params + transient + kept_states + FP32 * tokens * (n_items + 1)


def shard_memory(layer_params: int, n_layers: int, dims: LayerDims, tokens: int, batches: int,
                 gradients: bool = True) -> int:
    """Bytes one sharded-importance task of `n_layers` layers holds (fp32; see the module docstring).

    tokens: positions in one calibration batch (B x T); batches: calibration batches. With gradients
    (fisher, taylor, param_fisher): weights and their gradients, one batch's activations through every
    layer, and the input states and output gradients of every batch. Forward only (block influence,
    angular, activation): weights, one layer's transients, and the input states.
    """
    per_value = 2 if gradients else 1
    boundary = per_value * FP32 * batches * tokens * dims.hidden
    activations = FP32 * tokens * dims.values_per_token() * (n_layers if gradients else min(n_layers, 1))
    return boundary + per_value * FP32 * layer_params * n_layers + activations


def shard_split(layer_params: int, n_layers: int, dims: LayerDims, seq: int, gpu_bytes: float) -> dict:
    """The fewest contiguous shards whose largest one fits a GPU for sharded importance (fp32).

    Returns {"n_shards", "ranges" ([start, end) per shard), "per_shard_gib" (largest shard),
    "boundary_gib" (its input states + output gradients), "fits"}.
    """
    tokens = CALIB_BATCH_SIZE * seq
    boundary = shard_memory(layer_params, 0, dims, tokens, CALIB_BATCHES)
    for n_shards in range(1, n_layers + 1):
        ranges = split_shards(n_layers, n_shards)
        need = shard_memory(layer_params, max(end - start for start, end in ranges), dims, tokens, CALIB_BATCHES)
        if need <= USABLE * gpu_bytes or n_shards == n_layers:
            return {"n_shards": n_shards, "ranges": [list(r) for r in ranges], "per_shard_gib": need / GIB,
                    "boundary_gib": boundary / GIB, "fits": need <= USABLE * gpu_bytes}
    raise AssertionError("unreachable: the loop returns at n_shards == n_layers")


def deepspeed_section(stage: int, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed config a run here would use. bf16 and the ZeRO-3 GPU settings only appear when
    `torch.cuda.is_available()`: on a CPU machine the config is the fp32 CPU one (gloo, torch AdamW)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = deepspeed_config(stage=stage, lr=LR, batch_size=micro_batch, device=device)
    note = ("built on this GPU machine" if device == "cuda" else
            "no GPU visible: fp32 CPU config; on a GPU node the same call with device='cuda' adds bf16 "
            "(when supported), overlap_comm, contiguous_gradients and the stage3_* prefetch settings")
    return {"device": device, "stage": stage, "config": config, "note": note}


def _rows(params: int, largest: int, activations: int, gpus: int, gpu_bytes: float,
          extra: int = 0) -> list[dict[str, Any]]:
    """One row per ZeRO stage: model states + activations (+ a frozen teacher), in GiB."""
    rows = []
    for stage in STAGES:
        states = model_states(params, stage, gpus, largest)
        total = states["bytes"] + activations + extra
        rows.append({"stage": stage, "source": states["source"], "model_states_gib": states["bytes"] / GIB,
                     "analytic_gib": states["analytic_bytes"] / GIB, "activations_gib": activations / GIB,
                     "teacher_gib": extra / GIB, "total_gib": total / GIB,
                     "fits": total <= USABLE * gpu_bytes})
    return rows


def _check(gpus: int, n_items: int, seq_len: int, micro_batch: int, gpu_gb: float, bridge_rank: int) -> None:
    for name, value in (("gpus", gpus), ("n_items", n_items), ("seq_len", seq_len),
                        ("micro_batch", micro_batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if gpu_gb <= 0 or bridge_rank < 0:
        raise ValueError(f"gpu_gb must be > 0 and bridge_rank >= 0, got {gpu_gb} and {bridge_rank}")


def _compact(teacher, keep: float, bridge_rank: int):
    """(student, kept) of a meta-device teacher; kept = the uniform selection of k layers."""
    k = n_kept(keep, teacher.n_layers)
    kept = SELECTORS["uniform"](torch.zeros(teacher.n_layers), k)
    return build_compact(teacher, kept, bridge_rank), kept


def _teacher(family: str | None, size: str | None, shape: str | None, n_items: int):
    """(meta-device recommender, `count_parameters`-style counts) of a published or a local shape."""
    if (shape is None) == (family is None or size is None):
        raise ValueError("give either a family and a size (--family and --size: a published shape) or a model "
                         "config (--config: a local shape), not both and not neither")
    if shape is None:
        return meta_recommender(family, size, n_items), count_parameters(family, size, n_items)
    config = load_shape(shape)
    return meta_recommender_from(config, n_items), count_shape(config, n_items, name=str(shape))


def plan(family: str | None = None, size: str | None = None, keep: float = 0.25, gpus: int = 8,
         n_items: int = 10_000, seq_len: int = 50, micro_batch: int = 8, *, gpu_gb: float = 80.0,
         bridge_rank: int = 16, stage: int = 3, shape: str | None = None) -> dict[str, Any]:
    """Parameters, memory per GPU and the shard split of a full and a compact recommender.

    Args:
        family, size: a published shape of `layerwise.models.scale.SCALES` (e.g. "llama", "13b"), or
        shape: instead, a local Hugging Face model directory or config.json (e.g. the directory that
            `layerwise models get` prints, or a user's own Llama or Qwen), read without its weights.
        keep: fraction of layers kept (<= 1) or a layer count; gpus: data-parallel GPUs (ZeRO's N).
        n_items, seq_len, micro_batch: catalogue, history length and micro batch per GPU.
        gpu_gb: memory of one GPU in GiB; bridge_rank: rank of the gap bridges (0 = none);
        stage: the ZeRO stage of the emitted DeepSpeed config.

    Returns:
        A JSON-able dict: "model", "settings", "parameters", "training", "healing", "inference",
        "importance_shards", "deepspeed", "lowest_fitting_stage" (see the module docstring for formulas).
    """
    _check(gpus, n_items, seq_len, micro_batch, gpu_gb, bridge_rank)
    teacher, counts = _teacher(family, size, shape, n_items)
    student, kept = _compact(teacher, keep, bridge_rank)
    dims = layer_dims(teacher.backbone.config)
    full, compact = numel(teacher), numel(student)
    big_l, k, tokens, gpu_bytes = teacher.n_layers, len(kept), micro_batch * seq_len, gpu_gb * GIB
    train_act = training_activations(dims, big_l, tokens, n_items)
    heal_act = training_activations(dims, k, tokens, n_items)
    teacher_bytes = _teacher_for_healing(full, dims, k, tokens, n_items)
    training = _rows(full, largest_module(teacher), train_act, gpus, gpu_bytes)
    healing = _rows(compact, largest_module(student), heal_act, gpus, gpu_bytes, extra=teacher_bytes)
    return {
        "model": {"family": counts["family"], "size": counts["size"], "name": counts["name"], "layers": big_l,
                  "hidden": dims.hidden, "kept": kept, "k": k, "bridge_rank": bridge_rank,
                  "bridge_slots": sorted(int(s) for s in student.bridges)},
        "settings": {"gpus": gpus, "gpu_gib": gpu_gb, "usable_fraction": USABLE, "n_items": n_items,
                     "seq_len": seq_len, "micro_batch": micro_batch, "keep": keep,
                     "precision": "bf16 weights and grads, fp32 AdamW states"},
        "parameters": {"released": counts["released"], "backbone_as_published": counts["total"],
                       "full": full, "compact": compact, "bridges": numel(student.bridges),
                       "compact_fraction": compact / full},
        "training": training, "healing": healing,
        "activations_checkpointed_gib": {
            "training": training_activations(dims, big_l, tokens, n_items, True) / GIB,
            "healing": training_activations(dims, k, tokens, n_items, True) / GIB},
        "inference": {name: {key: v / GIB for key, v in inference_memory(p, dims, micro_batch, seq_len,
                                                                         n_items).items()}
                      for name, p in (("full", full), ("compact", compact))},
        "importance_shards": shard_split(numel(teacher.layers[-1]), big_l, dims, seq_len, gpu_bytes),
        "deepspeed": deepspeed_section(stage, micro_batch),
        "lowest_fitting_stage": {"training": _lowest(training), "healing": _lowest(healing)},
    }


def _lowest(rows: list[dict[str, Any]]) -> int | None:
    return next((row["stage"] for row in rows if row["fits"]), None)


def _b(n: float) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _stage_lines(rows: list[dict[str, Any]], teacher: bool) -> list[str]:
    head = "  stage  model states  (analytic)  activations" + ("  teacher" if teacher else "")
    lines = [head + "     total  fits  source"]
    for r in rows:
        extra = f"  {r['teacher_gib']:7.1f}" if teacher else ""
        lines.append(f"  {r['stage']:>5}  {r['model_states_gib']:12.1f}  {r['analytic_gib']:10.1f}  "
                     f"{r['activations_gib']:11.2f}{extra}  {r['total_gib']:8.1f}  {'yes' if r['fits'] else 'no':>4}"
                     f"  {r['source']}")
    return lines


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a plain-text table (GiB per GPU)."""
    m, s, p = result["model"], result["settings"], result["parameters"]
    rel, inf, sh = p["released"], result["inference"], result["importance_shards"]
    refs = ", ".join(f"{k} {_b(v)}" for k, v in rel["references"].items()) or "no published figure: a local shape"
    lines = [
        f"{m['name']} ({m['family']} {m['size']}): {m['layers']} layers, hidden {m['hidden']}; keep {s['keep']} "
        f"-> {m['k']} layers {m['kept']}, bridges of rank {m['bridge_rank']} at slots {m['bridge_slots']}",
        f"Parameters: released {rel['class']} {_b(rel['total'])} (non-embedding {_b(rel['non_embedding'])}; "
        f"published {refs})",
        f"  recommender ({s['n_items']:,} items, vocabulary dropped): full {_b(p['full'])}, compact "
        f"{_b(p['compact'])} ({100 * p['compact_fraction']:.1f}%, bridges {_b(p['bridges'])})",
        f"Memory per GPU in GiB: {s['gpus']} GPUs of {s['gpu_gib']:g} GiB (fits = at most {s['usable_fraction']:.0%}),"
        f" micro batch {s['micro_batch']} x {s['seq_len']}, {s['precision']}",
        "Training the full model:", *_stage_lines(result["training"], False),
        "Healing (frozen bf16 teacher + compact student):", *_stage_lines(result["healing"], True),
        f"Inference (bf16, batch {s['micro_batch']}): full {inf['full']['total']:.1f} GiB, compact "
        f"{inf['compact']['total']:.1f} GiB ({inf['compact']['total'] / inf['full']['total']:.2f}x)",
        f"Sharded importance (fp32, {CALIB_BATCHES} x {CALIB_BATCH_SIZE} calibration): {sh['n_shards']} shard(s) "
        f"{sh['ranges']}, largest {sh['per_shard_gib']:.1f} GiB incl. {sh['boundary_gib']:.2f} GiB boundary states"
        + ("" if sh["fits"] else " -- DOES NOT FIT even one layer per shard"),
        f"Lowest fitting ZeRO stage: training {result['lowest_fitting_stage']['training']}, healing "
        f"{result['lowest_fitting_stage']['healing']}",
        f"DeepSpeed config ({result['deepspeed']['device']}, ZeRO-{result['deepspeed']['stage']}): "
        f"{result['deepspeed']['note']}",
    ]
    return "\n".join(lines)


def plan_main(args) -> int:
    """`layerwise plan`: print the plan and write it as JSON with --json.

    Smallest CPU run (about 10 s, most of it importing DeepSpeed):
        layerwise plan --family bert --size base --gpus 1
    """
    result = plan(args.family, args.size, keep=args.keep, gpus=args.gpus, n_items=args.n_items,
                  seq_len=args.seq_len, micro_batch=args.micro_batch, gpu_gb=args.gpu_gb,
                  bridge_rank=args.bridge_rank, stage=args.stage, shape=getattr(args, "config", None))
    print(format_plan(result))
    if args.json:
        write_json(args.json, result)
    return 0
