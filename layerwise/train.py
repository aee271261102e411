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

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from layerwise.data.batching import mean_over_groups, split_by_length
from layerwise.evaluate import evaluate
from layerwise.models.recommender import SequentialRecommender


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
    max_minutes: float | None = None  # wall-clock safety cap; stops after the current epoch (load-dependent)


STOP_REASONS = ("epochs", "early_stopping", "time_cap")


@dataclass
class TrainResult:
    """best_epoch/best_valid: the kept weights' epoch and validation metrics; stop_reason: one of
    STOP_REASONS (the epoch budget ran out, no validation gain for `patience` evaluations, or the
    wall-clock cap was reached, which makes the result depend on the machine's load)."""

    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    stop_reason: str = "epochs"
    epochs_run: int = 0


def stop_reason(stale: int, patience: int, out_of_time: bool) -> str | None:
    """Why training stops after this epoch, or None to go on. Early stopping wins a tie with the time cap:
    it would have stopped there on any machine."""
    if stale >= patience:
        return "early_stopping"
    return "time_cap" if out_of_time else None


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
    pos = (h * items[t]).sum(-1) + model.item_bias[t]
    neg = h @ items[negatives].T + model.item_bias[negatives]
    neg = neg.masked_fill(negatives.unsqueeze(0) == t.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long))


def train_recommender(model: SequentialRecommender, data, config: TrainConfig = TrainConfig(),
                      progress: bool = True) -> TrainResult:
    """Train `model` on `data`'s training histories; keeps the weights of the best validation epoch."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    inputs, targets = training_windows(data, config.max_len, model.causal)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(best_epoch=-1, best_valid={"ndcg@10": -1.0}, config=asdict(config))
    best_state, stale = None, 0
    bar = tqdm(range(1, config.epochs + 1), desc="train", disable=not progress, unit="epoch")
    import time
    started = time.monotonic()
    for epoch in bar:
        loss = _train_epoch(model, inputs, targets, optimizer, config, generator)
        record = {"epoch": epoch, "loss": loss}
        if epoch % config.eval_every == 0 or epoch == config.epochs:
            valid = _validate(model, data, config.max_len)
            record.update({f"valid_{k}": v for k, v in valid.items()})
            if valid["ndcg@10"] > result.best_valid["ndcg@10"]:
                result.best_epoch, result.best_valid = epoch, valid
                best_state, stale = copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
        result.history.append(record)
        bar.set_postfix(loss=f"{loss:.3f}", best_ndcg10=f"{result.best_valid['ndcg@10']:.4f}")
        out_of_time = bool(config.max_minutes and (time.monotonic() - started) / 60 > config.max_minutes)
        reason = stop_reason(stale, config.patience, out_of_time)
        if reason:
            result.stop_reason = reason
            break
    result.epochs_run = len(result.history)
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def batch_loss(model: SequentialRecommender, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
               generator: torch.Generator) -> torch.Tensor:
    """The mean next-item loss over a batch's targets, computed over groups of similar length with their
    shared padding cut (layerwise.data.batching): the loss of the whole padded batch, with less work on
    padding. x, y: (B, T) model inputs (cloze-masked for encoders) and targets, 0 = none."""
    # One draw of sampled negatives for the whole batch, as one padded call would make: every group's
    # targets compete with the same candidates (and the generator advances as it did).
    negatives = _draw_negatives(model, config, generator) if config.loss == "sampled" else None
    return mean_over_groups(split_by_length(x, y), lambda start, gx, gy: next_item_loss(
        model, model.encode(gx, start=start), gy, config, generator, negatives))


def _draw_negatives(model: SequentialRecommender, config: TrainConfig,
                    generator: torch.Generator) -> torch.Tensor:
    return torch.randint(1, model.n_items + 1, (config.n_negatives,), generator=generator)


def _train_epoch(model, inputs, targets, optimizer, config, generator) -> float:
    model.train()
    order = torch.randperm(len(inputs), generator=generator)
    total, batches = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        x, y = inputs[idx], targets[idx]
        if not model.causal:
            x, y = cloze_mask(x, model.mask_index, config.mask_prob, generator)
        loss = batch_loss(model, x, y, config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
    if not math.isfinite(total):
        raise FloatingPointError("training loss is not finite; lower the learning rate")
    return total / max(batches, 1)


def _validate(model: SequentialRecommender, data, max_len: int) -> dict[str, float]:
    model.eval()
    result = evaluate(model.score, data, stage="valid", exclude_seen=True, max_len=max_len)
    return {k: result.means[k] for k in ("ndcg@10", "hr@10", "mrr")}
