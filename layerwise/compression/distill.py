"""Healing a compact model by knowledge distillation from the full teacher (plain torch).

Smallest run (tiny synthetic data, CPU, seconds):
    layerwise compress --teacher /tmp/teacher --dataset synthetic:300:60:6000:0 --keep 0.5 --out /tmp/c

Three steps, each switchable so that the ablation study can remove it:
1. Bridge pre-fitting: each bridge learns, by regression on the teacher's own hidden states, to map the
   state before its gap to the state after it (LLM-Streamline does this for a replaced block).
2. Distillation: KL between student and teacher score distributions at temperature T, cross-entropy on
   the true next items, and MSE between the student's and the teacher's hidden states at the kept layers.
3. Early stopping on validation NDCG@10; the best epoch's weights are kept.

What trains is a switch: "bridges" only, "lora" (bridges + LoRA on the kept layers, merged back into
plain weights at the end so the saved backbone stays stock), or "all".
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerwise.data.batching import length_groups, trim_left
from layerwise.device import autocast_for, model_device
from layerwise.compression.hidden import capture_layer_inputs
from layerwise.models.lora import add_lora, merge_lora
from layerwise.models.recommender import SequentialRecommender
from layerwise.training.train import ADDED, _validate, autocast_context, cloze_mask, training_windows

TRAINABLE = ("bridges", "lora", "all")


@dataclass(frozen=True)
class HealConfig:
    """Healing settings. Weights of 0 switch a loss term off (the ablation study uses that)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 1.0
    hidden_weight: float = 1.0
    trainable: str = "all"
    lora_rank: int = 8
    prefit_steps: int = 200
    patience: int = 3
    eval_every: int = 1
    max_len: int = 50
    seed: int = 0
    max_minutes: float | None = None
    # Added later: at their defaults they are left out of a run's stage hashes.
    autocast: str | None = field(default=None, metadata=ADDED)  # "bf16": layers in bf16, scores in fp32
    # Run the frozen teacher once over the training windows and keep what the losses read, instead of
    # once per batch and epoch (decoders only: an encoder's cloze masks change every epoch).
    cache_teacher: bool = field(default=False, metadata=ADDED)


@dataclass
class HealResult:
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    prefit_mse: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    cache_seconds: float | None = None  # building the teacher cache (None: no cache)
    cache_cpu_seconds: float | None = None  # the same in CPU seconds (every thread of the process)


def teacher_targets(teacher: SequentialRecommender, student: SequentialRecommender
                    ) -> list[int]:
    """Teacher layer whose *input* each student slot should reproduce: slot j -> keep[j], slot k -> L."""
    return list(student.kept) + [teacher.n_layers]


def prefit_bridges(student: SequentialRecommender, teacher: SequentialRecommender,
                   inputs: torch.Tensor, steps: int, lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Fit every bridge on teacher states: source = state after the last kept layer before the gap,
    target = state the next kept layer saw in the teacher. inputs: (N, T) model inputs.

    Returns the final relative MSE per slot (MSE / variance of the target).
    """
    if not len(student.bridges) or steps <= 0:
        return {}
    generator = torch.Generator().manual_seed(seed)
    sample = inputs[torch.randperm(len(inputs), generator=generator)[:512]]
    with torch.no_grad():
        states, mask = capture_layer_inputs(teacher.eval(), sample)
    keep, out = list(student.kept), {}
    for key, bridge in student.bridges.items():
        slot = int(key)
        source_layer = keep[slot - 1] + 1 if slot > 0 else 0
        target_layer = keep[slot] if slot < len(keep) else teacher.n_layers
        source, target = states[source_layer][mask], states[target_layer][mask]
        optimizer = torch.optim.Adam(bridge.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.mse_loss(bridge(source), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            out[key] = (F.mse_loss(bridge(source), target) / target.var().clamp(min=1e-12)).item()
    return out


def heal(student: SequentialRecommender, teacher: SequentialRecommender, data,
         config: HealConfig = HealConfig(), progress: bool = True, epoch_fn: Callable[..., dict] | None = None,
         checkpoint: str | Path | None = None) -> HealResult:
    """Distil `teacher` into `student` (built by layerwise.compression.compact.build_compact) on `data`'s training
    histories; returns the validation history and keeps the student's best-epoch weights.

    epoch_fn: one training pass, `(student, teacher, inputs, targets, optimizer, params, config, generator)
    -> {"loss": ..., ...}`; default: our distillation loss. A baseline with another loss (TinyBERT's
    attention maps) passes its own and keeps the rest: early stopping, best weights, LoRA merge.
    checkpoint: a directory for the healing's state after every epoch (layerwise.training.resume, as a
        teacher's training keeps it). A call with the same directory, config and identically built student
        and teacher resumes after the last saved epoch and ends exactly as an uninterrupted one; the
        directory is removed when healing ends. An LLM's healing takes tens of minutes an epoch on a CPU.
        None: the next one of the enclosing `stage_checkpoints` block (layerwise.training.resume), which keeps
        the finished result too.
    """
    from layerwise.training.resume import (TrainingState, in_stage_checkpoints, next_stage_checkpoint, remove,
                                           saved_names)

    keep_finished = checkpoint is None and in_stage_checkpoints()
    checkpoint = checkpoint if checkpoint is not None else next_stage_checkpoint()

    if config.trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {config.trainable!r}")
    device = model_device(student)
    if model_device(teacher) != device:
        raise ValueError(f"the student is on {device} and the teacher on {model_device(teacher)}: "
                         "place both on one device")
    saved_config = asdict(config)  # what a checkpoint must match (the autocast as asked, not as resolved)
    config = replace(config, autocast=autocast_for(config.autocast, device))  # CPU: as configured
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    teacher.eval().requires_grad_(False)
    inputs, targets = training_windows(data, config.max_len, student.causal)
    result = HealResult(best_epoch=0, best_valid=_validate(student, data, config.max_len, config.autocast),
                        config=asdict(config))
    result.prefit_mse = prefit_bridges(student, teacher, inputs, config.prefit_steps, seed=config.seed)
    if config.prefit_steps and len(student.bridges):
        result.best_valid = _validate(student, data, config.max_len, config.autocast)
    cache = None
    if config.cache_teacher and epoch_fn is None:
        started, cpu = time.monotonic(), time.process_time()
        cache = TeacherCache.build(teacher, inputs, targets, teacher_targets(teacher, student),
                                   config.batch_size, config.autocast)
        result.cache_seconds, result.cache_cpu_seconds = time.monotonic() - started, time.process_time() - cpu
    params = _trainable_parameters(student, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    best_state, stale, first, elapsed = copy.deepcopy(student.state_dict()), 0, 1, 0.0
    state = TrainingState.load(checkpoint, student, optimizer, generator, saved_config) if checkpoint else None
    if state is not None:  # resume after the saved epoch: its weights, optimizer, RNGs, best and history
        first, stale, elapsed = state.epoch + 1, state.stale, state.elapsed
        result.best_epoch, result.best_valid = state.result["best_epoch"], state.result["best_valid"]
        result.history = state.result["history"]
        if state.best is not None:
            best_state = {**best_state, **state.best}
        if state.extra.get("finished"):  # done before the stop: its best weights are loaded, nothing to train
            first, best_state = config.epochs + 1, copy.deepcopy(student.state_dict())
    started = time.monotonic() - elapsed
    for epoch in tqdm(range(first, config.epochs + 1), desc="heal", disable=not progress, unit="epoch",
                      initial=first - 1, total=config.epochs):
        run_epoch = epoch_fn or functools.partial(_heal_epoch, cache=cache)
        tick, cpu = time.monotonic(), time.process_time()
        record = {"epoch": epoch, **run_epoch(student, teacher, inputs, targets, optimizer, params, config, generator)}
        # CPU seconds too, as a teacher's training records them (layerwise.training.train)
        record.update(train_seconds=time.monotonic() - tick, train_cpu_seconds=time.process_time() - cpu)
        if epoch % config.eval_every == 0:
            tick, cpu = time.monotonic(), time.process_time()
            valid = _validate(student, data, config.max_len, config.autocast)
            record.update({f"valid_{k}": v for k, v in valid.items()}, valid_seconds=time.monotonic() - tick,
                          valid_cpu_seconds=time.process_time() - cpu)
            if valid["ndcg@10"] > result.best_valid["ndcg@10"]:
                result.best_epoch, result.best_valid = epoch, valid
                best_state, stale = copy.deepcopy(student.state_dict()), 0
            else:
                stale += 1
        result.history.append(record)
        out_of_time = config.max_minutes and (time.monotonic() - started) / 60 > config.max_minutes
        if stale >= config.patience or out_of_time:
            break
        if checkpoint and epoch < config.epochs:
            TrainingState(epoch, 0, stale, time.monotonic() - started,
                          {"best_epoch": result.best_epoch, "best_valid": result.best_valid,
                           "history": result.history},
                          {n: best_state[n] for n in saved_names(student)}).save(checkpoint, student, optimizer,
                                                                                 generator, saved_config)
    student.load_state_dict(best_state)
    if keep_finished and not (state is not None and state.extra.get("finished")):
        # The stage may stop before its end: keep this result so that running the stage again skips it.
        TrainingState(len(result.history), 0, stale, time.monotonic() - started,
                      {"best_epoch": result.best_epoch, "best_valid": result.best_valid, "history": result.history},
                      None, {"finished": True}).save(checkpoint, student, optimizer, generator, saved_config)
    merge_lora(student)
    student.requires_grad_(True)
    if checkpoint and not keep_finished:
        remove(checkpoint)
    return result


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, temperature: float, kd_weight: float,
                      ce_weight: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T (scaled by T^2) plus cross-entropy on the labels.

    student_logits, teacher_logits: (N, n_items + 1) with column 0 = -inf; labels: (N,).
    """
    loss = student_logits.new_zeros(())
    if kd_weight:
        s = F.log_softmax(student_logits[:, 1:] / temperature, dim=-1)
        t = F.log_softmax(teacher_logits[:, 1:] / temperature, dim=-1)
        loss = loss + kd_weight * temperature ** 2 * F.kl_div(s, t, log_target=True, reduction="batchmean")
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(student_logits, labels)
    return loss


def _heal_epoch(student, teacher, inputs, targets, optimizer, params, config, generator, cache=None) -> dict:
    student.train()
    device = model_device(student)
    order = torch.randperm(len(inputs), generator=generator)
    total, batches = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        x, y = inputs[idx], targets[idx]
        if not student.causal:
            x, y = cloze_mask(x, student.mask_index, 0.2, generator)
        x, y = x.to(device), y.to(device)  # masked on the CPU: the same draws on every device
        with autocast_context(config.autocast, x.device):
            loss = _batch_loss(student, teacher, x, y, config, cache.rows(idx) if cache else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
    return {"loss": total / max(batches, 1)}


def _batch_loss(student, teacher, x, y, config, cached: dict | None = None, groups=None) -> torch.Tensor:
    """KD + CE + hidden-state MSE of a batch, run group by group (`split_by_length`, or `groups`) and
    weighted by each group's share of the targets: the loss of the whole padded batch, to float rounding.
    The hidden term divides each layer pair's MSE by the teacher's variance over the whole batch's targets
    (scale-free: hidden norms differ by orders of magnitude across layers and families).

    cached: the teacher's states at this batch's target positions, in `y != 0` order (TeacherCache.rows);
    None runs the teacher on each group. groups: `split_by_length`'s form, for a caller that groups the
    batch itself (not with `cached`).
    """
    if groups is None:
        rows = length_groups(x)
        groups = [trim_left(x[r], y[r]) for r in rows]
    elif cached is not None:
        raise ValueError("cached teacher states are matched to the batch's own length groups: pass no groups")
    pairs = list(enumerate(teacher_targets(teacher, student)))
    total = sum(int((gy != 0).sum()) for _, _, gy in groups)
    if total == 0:
        raise ValueError("the batch has no targets")
    offsets = torch.cumsum((y != 0).sum(1), 0) - (y != 0).sum(1) if cached is not None else None
    loss, mse = 0.0, [0.0] * len(pairs)
    moments = torch.zeros(len(pairs), 3, dtype=torch.float64, device=x.device)
    for g, (start, gx, gy) in enumerate(groups):
        where = gy != 0
        if not where.any():  # nothing to predict (rows of padding only); its empty means would be NaN
            continue
        share = int(where.sum()) / total
        if cached is None:
            with torch.no_grad():
                states, _ = capture_layer_inputs(teacher, gx, start)
            t_states = {key: states[key][where] for key in [*dict.fromkeys(t for _, t in pairs), "final"]}
        else:  # the group's rows' targets, in the order `where` selects them (trimming kept each row's order)
            counts = where.sum(1)
            index = torch.repeat_interleave(offsets[rows[g]], counts) + _ranges(counts)
            t_states = {key: state[index] for key, state in cached.items()}
        with torch.no_grad():
            t_logits = teacher.head(t_states["final"])
        s_states, _ = capture_layer_inputs(student, gx, start)
        s_logits = student.head(s_states["final"][where])
        loss = loss + share * distillation_loss(s_logits, t_logits, gy[where], config.temperature,
                                                config.kd_weight, config.ce_weight)
        for p, (j, t) in enumerate(pairs if config.hidden_weight else []):
            target = t_states[t]
            mse[p] = mse[p] + share * F.mse_loss(s_states[j][where], target)
            moments[p] += torch.stack([target.double().sum(), target.double().square().sum(),
                                       torch.tensor(target.numel(), dtype=torch.float64, device=x.device)])
    if config.hidden_weight:
        count = moments[:, 2]
        variance = (moments[:, 1] - moments[:, 0] ** 2 / count) / (count - 1)  # as Tensor.var() over all
        loss = loss + config.hidden_weight * sum(m / float(v.clamp(min=1e-6)) for m, v in zip(mse, variance)) \
            / len(pairs)
    return loss


def _ranges(counts: torch.Tensor) -> torch.Tensor:
    """[0..c0-1, 0..c1-1, ...] for counts [c0, c1, ...]."""
    return (torch.arange(int(counts.sum()), device=counts.device)
            - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts))


class TeacherCache:
    """The frozen teacher's states on every training window, computed once, at target positions only.

    Healing reads the teacher's final hidden state (for its scores) and its states at the kept layers'
    inputs (for the hidden-state term) at every position that has a target. The teacher is frozen and
    in eval mode, so these are the same every epoch; keeping them turns E teacher passes into one.
    Memory: (kept layers + 2) x targets x H float32 (ml-100k, 8 of SmolLM2's 30 layers: about 2.2 GB).
    """

    def __init__(self, states: dict, counts: torch.Tensor):
        self.states = states  # key -> (n_targets, H); keys: teacher layer indices and "final"
        self.counts = counts  # (N,) targets per window
        self.starts = torch.cumsum(counts, 0) - counts

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: SequentialRecommender, inputs: torch.Tensor, targets: torch.Tensor,
              layers: list[int], batch_size: int, autocast: str | None = None) -> "TeacherCache":
        """inputs, targets: (N, T) training windows; layers: the teacher state indices to keep."""
        if not teacher.causal:
            raise ValueError("the teacher cache needs a decoder: an encoder's cloze masks change every epoch")
        teacher.eval()
        keys = [*dict.fromkeys(layers), "final"]
        chunks: dict = {key: [] for key in keys}
        device = model_device(teacher)
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size].to(device)
            where = (targets[start:start + batch_size] != 0).to(device)
            with autocast_context(autocast, x.device):
                states, _ = capture_layer_inputs(teacher, x)
            for key in keys:
                chunks[key].append(states[key][where].float())
        counts = (targets != 0).sum(1)
        return cls({key: torch.cat(parts) for key, parts in chunks.items()}, counts)

    def rows(self, windows: torch.Tensor) -> dict:
        """The states of these windows' targets, in the order `targets[windows] != 0` selects them."""
        windows = windows.to(self.counts.device)
        lengths = self.counts[windows]
        index = torch.repeat_interleave(self.starts[windows], lengths) + _ranges(lengths)
        return {key: state[index.to(state.device)] for key, state in self.states.items()}


def _trainable_parameters(student: SequentialRecommender, config: HealConfig) -> list:
    student.requires_grad_(config.trainable == "all")
    if config.trainable == "lora":
        add_lora(student, config.lora_rank)
    for bridge in student.bridges.values():
        bridge.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: trainable='bridges' needs bridges (bridge rank > 0)")
    return params


# --- public wrappers for training loops outside `heal` (orchestration.distributed.train_loops runs them
# under DeepSpeed on Ray Train); they add no behaviour of their own.
def heal_loss(student: SequentialRecommender, teacher: SequentialRecommender, x: torch.Tensor,
              y: torch.Tensor, config: HealConfig, groups: list | None = None) -> torch.Tensor:
    """One batch's healing loss: KD + cross-entropy + hidden-state MSE, weighted as in `config`.

    x: (B, T) model inputs (cloze-masked for encoders); y: (B, T) target items, 0 = no target. groups:
    how to run it (`layerwise.data.batching.split_by_length`'s form; default: split by length).
    """
    return _batch_loss(student, teacher, x, y, config, groups=groups)


def trainable_parameters(student: SequentialRecommender, config: HealConfig) -> list:
    """Set requires_grad per `config.trainable` (injecting LoRA for "lora"); returns what trains."""
    return _trainable_parameters(student, config)


