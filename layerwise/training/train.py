"""Teacher training in plain torch: next-item cross-entropy, AdamW, early stopping on validation NDCG@10.

Smallest run (tiny synthetic data, tiny model, CPU, a few seconds):
    layerwise train --dataset synthetic:300:60:6000:0 --family llama --preset tiny --out /tmp/teacher

Every transition of every user's training history is used: long histories are cut into windows of
`max_len` rather than truncated to the last `max_len` items (on ml-100k that would throw away about half
of the training signal). Each batch runs as groups of similar length with their shared left padding cut
(layerwise.data.batching), which leaves its loss unchanged. Decoder families learn to predict the next
item at every position; encoder families learn cloze prediction (BERT4Rec): random positions and always
the last one are masked.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerwise.data.batching import mean_over_groups, split_by_length
from layerwise.device import autocast_for, model_device
from layerwise.evaluation.evaluate import evaluate
from layerwise.models.recommender import SequentialRecommender


ADDED = {"hash_if_set": True}  # see orchestration.pipeline.config.added_option


@dataclass(frozen=True)
class TrainConfig:
    """Teacher training settings (defaults are the ones measured best for the small preset on ml-100k)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_len: int = 50
    patience: int = 5
    eval_every: int = 2
    seed: int = 0
    loss: str = "full"  # "full" softmax or "sampled" softmax for large catalogues
    n_negatives: int = 1024
    mask_prob: float = 0.2  # cloze masking rate for encoder families
    grad_clip: float = 1.0
    max_minutes: float | None = None  # wall-clock safety cap; stops after the current epoch, validated
    # Added later: at their defaults they are left out of a run's stage hashes, so earlier stages resume.
    schedule: str = field(default="constant", metadata=ADDED)  # "cosine": decays to 0 over `epochs`
    warmup: float = field(default=0.0, metadata=ADDED)  # fraction of the run, linear rise
    # The schedule also ends when this many minutes have passed (see LRSchedule), and training with it. The
    # result then depends on the machine's load (fewer steps when busy): budget default teachers by epochs.
    schedule_minutes: float | None = field(default=None, metadata=ADDED)
    autocast: str | None = field(default=None, metadata=ADDED)  # "bf16": layers in bf16, scores in fp32


# Why training stopped. The last two depend on the machine's load: the wall-clock cap (max_minutes) and
# the schedule's clock (schedule_minutes) both end a run sooner on a busy machine.
STOP_REASONS = ("epochs", "early_stopping", "time_cap", "schedule_clock")


@dataclass
class TrainResult:
    """best_epoch/best_valid: the kept weights' epoch and validation metrics; stop_reason: one of
    STOP_REASONS (the epoch budget ran out, no validation gain for `patience` evaluations, the wall-clock
    cap was reached, or the LR schedule's clock ended; the last two make the result depend on the load)."""

    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    stop_reason: str = "epochs"
    epochs_run: int = 0
    resumed_after: int | None = None  # the checkpointed epoch this call went on from (None: from the start)

    @property
    def seconds(self) -> float:
        """Training and validation time of every epoch, resumed ones included (a call's own wall time is not)."""
        return sum(r["train_seconds"] + r.get("valid_seconds", 0.0) for r in self.history)


def stop_reason(stale: int, patience: int, out_of_time: bool, clock_ended: bool = False) -> str | None:
    """Why training stops after this epoch, or None to go on. Early stopping wins a tie with the clocks: it
    would have stopped there on any machine."""
    if stale >= patience:
        return "early_stopping"
    if out_of_time:
        return "time_cap"
    return "schedule_clock" if clock_ended else None


def training_windows(data, max_len: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every user's training sequence into left-padded windows.

    Returns (inputs (N, max_len), targets (N, max_len)). Causal: targets are the inputs shifted by one
    (predict the next item). Encoders: targets equal inputs (masking happens per batch).
    """
    inputs, targets = [], []
    for u in range(data.n_users):
        seq = np.asarray(data.train_sequence(u), dtype=np.int64)
        src, dst = (seq[:-1], seq[1:]) if causal else (seq, seq)
        for end in range(len(src), 0, -max_len):
            start = max(0, end - max_len)
            row_in = np.zeros(max_len, dtype=np.int64)
            row_out = np.zeros(max_len, dtype=np.int64)
            row_in[max_len - (end - start):] = src[start:end]
            row_out[max_len - (end - start):] = dst[start:end]
            inputs.append(row_in)
            targets.append(row_out)
    if not inputs:
        raise ValueError("no training windows: every user's training history is too short")
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))


def cloze_mask(inputs: torch.Tensor, mask_index: int, prob: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask random non-padding positions and always the last one (the inference position).

    inputs: (B, T) -> (masked inputs (B, T), targets (B, T) with 0 where nothing is predicted).
    """
    real = inputs != 0
    chosen = (torch.rand(inputs.shape, generator=generator) < prob) & real
    chosen[:, -1] = real[:, -1]
    masked = inputs.masked_fill(chosen, mask_index)
    return masked, inputs * chosen


def next_item_loss(model: SequentialRecommender, hidden: torch.Tensor, targets: torch.Tensor,
                   config: TrainConfig, generator: torch.Generator,
                   negatives: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the target items. hidden: (B, T, H), targets: (B, T) with 0 = no target.

    negatives: (n_negatives,) item ids for the sampled loss, shared by every target; drawn from `generator`
    when not given (a batch run in groups passes one draw to all of them, see `batch_loss`).
    """
    where = targets != 0
    h, t = hidden[where], targets[where]
    if config.loss == "full":
        return F.cross_entropy(model.head(h), t)
    if config.loss != "sampled":
        raise ValueError(f"unknown loss {config.loss!r}; choose 'full' or 'sampled'")
    # Shared uniform negatives: one (N, 1 + n_neg) logit matrix instead of (N, n_items).
    if negatives is None:
        negatives = _draw_negatives(model, config, generator)
    negatives = negatives.to(h.device)
    items = model.item_vectors()
    pos = model.item_scores(h, items[t], model.item_bias[t], paired=True)
    neg = model.item_scores(h, items[negatives], model.item_bias[negatives])
    neg = neg.masked_fill(negatives.unsqueeze(0) == t.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long, device=logits.device))


SCHEDULES = ("constant", "cosine")


class LRSchedule:
    """Linear warm-up, then a constant or cosine learning rate, over the run's progress.

    Progress is steps done / `total_steps`, or, with `minutes`, the larger of that and the minutes spent
    / `minutes`: the schedule then ends on whichever clock runs out first, so a run on a busy machine
    still warms up and decays fully inside its time budget instead of being cut mid-schedule. That makes
    the number of steps, and so the model, depend on the machine's load; without `minutes` the schedule is
    the same on any machine (what default teachers use, with a wall-clock cap only for safety). `done`
    says when progress reached 1 (training should stop there). Call `step()` after every optimizer step.

    Pretrained layers are fragile in the first steps, while the new item vectors and head are still
    random (hence the warm-up); a cosine decay fitted to the budget converges in few epochs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: str = "constant", warmup: float = 0.0,
                 total_steps: int = 1, minutes: float | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the run in [0, 1), got {warmup}")
        if minutes is not None and minutes <= 0:
            raise ValueError(f"schedule minutes must be positive, got {minutes}")
        self.optimizer, self.schedule, self.warmup = optimizer, schedule, warmup
        self.total_steps, self.minutes = max(1, total_steps), minutes
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.steps, self.started = 0, time.monotonic()
        self._apply()

    @property
    def progress(self) -> float:
        done = self.steps / self.total_steps
        if self.minutes is not None:
            done = max(done, (time.monotonic() - self.started) / 60 / self.minutes)
        return done

    @property
    def done(self) -> bool:
        return self.progress >= 1.0

    def factor(self) -> float:
        """The learning rate now, as a fraction of the base rate."""
        progress = self.progress
        rise = min(1.0, (progress + 1 / self.total_steps) / self.warmup) if self.warmup else 1.0
        if self.schedule == "constant":
            return rise
        return rise * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def _apply(self) -> None:
        factor = self.factor()
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor


def autocast_context(autocast: str | None, device: torch.device | str = "cpu"):
    """bf16 autocast on `device` for autocast="bf16", else nothing ("fp32" or None; the training loops
    pick the device's choice first, `layerwise.device.autocast_for`). (The AMX units of recent x86 CPUs
    run bf16 matrix products faster: 5.7 s instead of 6.9 s per step of the 30-layer SmolLM2 with LoRA.)"""
    if autocast in (None, "fp32"):
        return contextlib.nullcontext()
    if autocast != "bf16":
        raise ValueError(f"unknown autocast {autocast!r}; choose bf16, fp32 or leave it unset")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def train_recommender(model: SequentialRecommender, data, config: TrainConfig = TrainConfig(),
                      progress: bool = True, checkpoint: str | Path | None = None,
                      stop: Callable[[int], bool] | None = None,
                      on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `model` on `data`'s training histories; keeps the weights of the best validation epoch.

    checkpoint: a directory for the run's state after every epoch (layerwise.training.resume). A call with the same
        directory, config and identically built model resumes after the last saved epoch and ends exactly
        as an uninterrupted run; the directory is removed when training ends.
    stop: called with the epoch after its checkpoint is written; True stops the run there with
        KeyboardInterrupt (a requested Ctrl-C, for example), to be resumed later.
    on_epoch: called with each epoch's record (its mean loss and any validation figures) as soon as the
        epoch ends; an exception it raises ends the run there, before that epoch's checkpoint.
    """
    from layerwise.training.resume import TrainingState, remove, saved_names

    # The model's device is where training runs; on CUDA the layers take bf16 autocast unless told fp32.
    run_config = replace(config, autocast=autocast_for(config.autocast, model_device(model)))
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    inputs, targets = training_windows(data, config.max_len, model.causal)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(len(inputs) / config.batch_size) * config.epochs
    schedule = LRSchedule(optimizer, config.schedule, config.warmup, steps, config.schedule_minutes)
    result = TrainResult(best_epoch=-1, best_valid={"ndcg@10": -1.0}, config=asdict(config))
    best_state, stale, first, elapsed = None, 0, 1, 0.0
    state = TrainingState.load(checkpoint, model, optimizer, generator, asdict(config)) if checkpoint else None
    if state is not None:  # resume after the saved epoch
        first, stale, elapsed = state.epoch + 1, state.stale, state.elapsed
        result.best_epoch, result.best_valid = state.result["best_epoch"], state.result["best_valid"]
        result.history, result.resumed_after = state.result["history"], state.epoch
        schedule.steps, schedule.started = state.steps, time.monotonic() - elapsed
        schedule._apply()
        if state.best is not None:
            best_state = {**copy.deepcopy(model.state_dict()), **state.best}
    # The bar moves per optimizer step, with the epoch's running loss: an LLM's epoch takes minutes.
    per_epoch = steps // config.epochs if config.epochs else 0
    bar = tqdm(desc="train", disable=not progress, unit="step", initial=(first - 1) * per_epoch, total=steps)

    def postfix(epoch: int, loss: float) -> dict:
        """The bar's figures; the best validation NDCG@10 once a validation has run ("-" before)."""
        best = result.best_valid["ndcg@10"]
        return {"epoch": epoch, "loss": f"{loss:.3f}", "best_ndcg10": f"{best:.4f}" if result.best_epoch > 0 else "-"}

    def on_step(epoch: int, loss: float) -> None:
        bar.set_postfix(postfix(epoch, loss), refresh=False)
        bar.update(1)

    started, reason = time.monotonic() - elapsed, None
    for epoch in range(first, config.epochs + 1):
        tick, cpu = time.monotonic(), time.process_time()
        loss = _train_epoch(model, inputs, targets, optimizer, run_config, generator, schedule,
                            on_step=lambda mean, epoch=epoch: on_step(epoch, mean))
        # CPU seconds too (every thread of the process): unlike wall time, they do not grow when other jobs
        # take the cores, nor halve with a second thread, so runs made at other thread counts compare.
        record = {"epoch": epoch, "loss": loss, "steps": schedule.steps, "train_seconds": time.monotonic() - tick,
                  "train_cpu_seconds": time.process_time() - cpu}
        # The safety cap stops after this epoch: validate it, or a run that reached it has no best model.
        out_of_time = bool(config.max_minutes) and (time.monotonic() - started) / 60 > config.max_minutes
        if epoch % config.eval_every == 0 or epoch == config.epochs or schedule.done or out_of_time:
            tick, cpu = time.monotonic(), time.process_time()
            valid = _validate(model, data, config.max_len, run_config.autocast)
            record.update({f"valid_{k}": v for k, v in valid.items()}, valid_seconds=time.monotonic() - tick,
                          valid_cpu_seconds=time.process_time() - cpu)
            if valid["ndcg@10"] > result.best_valid["ndcg@10"]:
                result.best_epoch, result.best_valid = epoch, valid
                best_state, stale = copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        clock_ended = schedule.done and epoch < config.epochs  # only the schedule's clock ends it early
        reason = stop_reason(stale, config.patience, out_of_time, clock_ended)
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        bar.set_postfix(postfix(epoch, loss))
        if checkpoint and not reason and epoch < config.epochs:
            best = {n: best_state[n] for n in saved_names(model)} if best_state is not None else None
            TrainingState(epoch, schedule.steps, stale, time.monotonic() - started,
                          {"best_epoch": result.best_epoch, "best_valid": result.best_valid,
                           "history": result.history}, best).save(checkpoint, model, optimizer, generator,
                                                                  asdict(config))
        if reason:
            break
        if stop is not None and stop(epoch):
            raise KeyboardInterrupt(f"training stopped after epoch {epoch}; its checkpoint resumes it")
    bar.close()
    result.stop_reason = reason or "epochs"
    result.epochs_run = len(result.history)
    if best_state is not None:
        model.load_state_dict(best_state)
    if checkpoint:
        remove(checkpoint)
    return result


def batch_loss(model: SequentialRecommender, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
               generator: torch.Generator) -> torch.Tensor:
    """The mean next-item loss over a batch's targets, computed over groups of similar length with their
    shared padding cut (layerwise.data.batching): the loss of the whole padded batch, with less work on
    padding. x, y: (B, T) model inputs (cloze-masked for encoders) and targets, 0 = none."""
    # One draw of sampled negatives for the whole batch, as one padded call would make: every group's
    # targets compete with the same candidates (and the generator advances as it did).
    negatives = _draw_negatives(model, config, generator) if config.loss == "sampled" else None

    def group_loss(start: int, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        with autocast_context(config.autocast, gx.device):  # the layers; the scores stay in float32
            hidden = model.encode(gx, start=start)
        return next_item_loss(model, hidden, gy, config, generator, negatives)

    return mean_over_groups(split_by_length(x, y), group_loss)


def _draw_negatives(model: SequentialRecommender, config: TrainConfig,
                    generator: torch.Generator) -> torch.Tensor:
    return torch.randint(1, model.n_items + 1, (config.n_negatives,), generator=generator)


def _train_epoch(model, inputs, targets, optimizer, config, generator, schedule=None, on_step=None) -> float:
    """One pass over the windows in a random order; the mean batch loss. on_step(running mean) after each step."""
    model.train()
    device = model_device(model)
    order = torch.randperm(len(inputs), generator=generator)
    total, batches = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        x, y = inputs[idx], targets[idx]
        if not model.causal:
            x, y = cloze_mask(x, model.mask_index, config.mask_prob, generator)
        x, y = x.to(device), y.to(device)  # masked on the CPU: the same draws on every device
        loss = batch_loss(model, x, y, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
        if on_step is not None:
            on_step(total / batches)
        if schedule is not None:
            schedule.step()
            if schedule.done:  # the learning rate reached 0: further steps change nothing
                break
    if not math.isfinite(total):
        raise FloatingPointError("training loss is not finite; lower the learning rate")
    return total / max(batches, 1)


def _validate(model: SequentialRecommender, data, max_len: int, autocast: str | None = None) -> dict[str, float]:
    model.eval()
    with autocast_context(autocast, model.item_embedding.weight.device):
        result = evaluate(model.score, data, stage="valid", exclude_seen=True, max_len=max_len)
    return {k: result.means[k] for k in ("ndcg@10", "hr@10", "mrr")}
