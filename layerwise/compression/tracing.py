"""Record and gate a recommender's layer stack: the calibration trace that sharded importance replays.

One forward pass per calibration batch records, at every layer, the hidden state that enters it and the
rest of the call the backbone made (the attention mask in the family's own format, LLaMA's rotary
embeddings, T5's position bias, ...). One backward pass records the gradient of the loss at every
layer's output. With these, any contiguous run of layers can be replayed on its own
(`layerwise.compression.importance.local_scores`): a shard worker needs only its layers, the state entering the run,
the calls, and the gradient leaving the run.

The loss of a batch is L = sum_b L_b, L_b the mean cross-entropy over sample b's target positions, so
the gradient w.r.t. anything that touches only sample b (a per-sample gate) is the gradient of L_b.

Removing layer l is gating its residual update to zero, out = in (`remove_layers`). This is exactly
physical removal without a bridge (tests check it against `Family.keep_layers`), and it needs no copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from layerwise.device import model_device
from layerwise.evaluation.evaluate import evaluate

Batch = tuple[Tensor, Tensor]
METRICS = ("loss", "ndcg@10")


@dataclass
class LayerCall:
    """How the backbone called one layer, minus the hidden state.

    Attributes:
        args: positional arguments after the hidden state, detached.
        kwargs: keyword arguments, detached.
        carried: where this layer received a tensor that the previous layer returned (T5's position
            bias, computed in block 0 and passed on): argument position (int) or keyword (str) -> index
            in the previous layer's output tuple. A replay re-threads these so gradients reach block 0.
        carried_grad: index in this layer's output tuple -> gradient of the loss w.r.t. that output as
            the later layers used it. Only the last layer of a run needs it; empty for most families.
    """

    args: tuple
    kwargs: dict
    carried: dict[int | str, int] = field(default_factory=dict)
    carried_grad: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class BatchTrace:
    """What one calibration batch leaves behind (L = number of layers).

    Attributes:
        states: L + 1 tensors (B, T, H): the input of each layer, then the last layer's output.
        grad_out: L tensors (B, T, H): dL/d(output of layer l); empty when traced without backward.
        calls: L `LayerCall`s.
        token_mask: (B, T) bool, True at non-padding positions.
    """

    states: list[Tensor]
    grad_out: list[Tensor]
    calls: list[LayerCall]
    token_mask: Tensor


def trace_layers(model, batches: Iterable[Batch], removed: Iterable[int] = (),
                 backward: bool = True) -> list[BatchTrace]:
    """Record every layer's input, call and output gradient, one forward (+ backward) pass per batch.

    Runs in eval mode (no dropout); rows without any target are dropped (they add nothing to the loss).
    Train flags, `requires_grad` flags and hooks are restored afterwards, also on error.

    Args:
        model: a `SequentialRecommender` without bridges.
        batches: `(inputs (B, T), targets (B, T))` pairs, 0 = padding / no target (docs/CONTRACTS.md).
        removed: layers gated off (out = in) while tracing.
        backward: also record gradients (needed by fisher, taylor, param_fisher).
    """
    _check_plain(model)
    layers = list(model.layers)
    traces, device = [], model_device(model)  # batches go where the model is
    # Layer parameters must require grad so that tensors made from them inside the stack (T5's
    # position bias) carry a gradient back to their owner; autograd.grad never touches `.grad`.
    with eval_mode(model), requires_grad(layers, backward), remove_layers(model, removed):
        for inputs, targets in batches:
            inputs, targets = inputs.to(device), targets.to(device)
            keep = (targets != 0).any(dim=1)
            if keep.any():
                traces.append(_trace_batch(model, layers, inputs[keep], targets[keep], backward))
    if not traces:
        raise ValueError("no calibration batch has a target: nothing to measure importance on")
    return traces


def _trace_batch(model, layers: list[nn.Module], inputs: Tensor, targets: Tensor, backward: bool) -> BatchTrace:
    states, outputs, calls, aliases = [], [], [], []

    def pre_hook(module, args, kwargs):
        if not args:
            raise ValueError(f"{type(module).__name__} got its hidden state as a keyword; expected positional")
        previous = outputs[-1] if outputs else None
        args, kwargs, carried, alias = _thread_carried(list(args), dict(kwargs), previous, backward)
        states.append(args[0].detach())
        calls.append(LayerCall(_detach(tuple(args[1:])), _detach(kwargs), carried))
        aliases.append(alias)
        return tuple(args), kwargs

    def post_hook(module, args, output):
        outputs.append(output)

    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(pre_hook, with_kwargs=True),
                                                layer.register_forward_hook(post_hook))]
    try:
        with torch.set_grad_enabled(backward):
            hidden = model.encode(inputs)
            outs = [_state(o) for o in outputs]
            states.append(outs[-1].detach())
            grads = _output_grads(model, hidden, targets, outs, aliases) if backward else []
    finally:
        for handle in handles:
            handle.remove()
    if backward:
        for l, call in enumerate(calls[:-1]):
            call.carried_grad = {i: grads[1][l + 1][i] for i in aliases[l + 1]}
    return BatchTrace(states, grads[0] if backward else [], calls, inputs != 0)


def _output_grads(model, hidden, targets, outs, aliases) -> tuple[list[Tensor], list[dict[int, Tensor]]]:
    """dL/d(each layer's output state) and dL/d(each carried tensor as the receiving layer got it)."""
    loss = sample_losses(model, hidden, targets).sum()
    flat = [(l, i) for l, alias in enumerate(aliases) for i in alias]
    wrt = outs + [aliases[l][i] for l, i in flat]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]
    carried: list[dict[int, Tensor]] = [{} for _ in aliases]
    for (l, i), g in zip(flat, grads[len(outs):]):
        carried[l][i] = g
    return grads[:len(outs)], carried


def _thread_carried(args: list, kwargs: dict, previous, alias_them: bool):
    """Find the tensors this layer received from the previous layer's output tuple (T5's position bias).

    Each gets a fresh alias (a view) so that the backward pass can ask for the gradient this layer and
    the later ones sent into it, separately from the earlier layers' use of the same tensor.
    """
    carried, alias = {}, {}
    if not isinstance(previous, tuple):
        return args, kwargs, carried, alias
    sources = {id(v): i for i, v in enumerate(previous) if i > 0 and isinstance(v, Tensor)}
    slots = [(pos, args[pos]) for pos in range(1, len(args))] + list(kwargs.items())
    for loc, value in slots:
        if isinstance(value, Tensor) and id(value) in sources:
            i = sources[id(value)]
            carried[loc] = i
            if alias_them and value.requires_grad:
                value = alias.setdefault(i, value.view_as(value))
                if isinstance(loc, int):
                    args[loc] = value
                else:
                    kwargs[loc] = value
    return args, kwargs, carried, alias


def sample_losses(model, hidden: Tensor, targets: Tensor) -> Tensor:
    """Per-sample loss L_b: mean full-softmax cross-entropy over sample b's targets.

    Args:
        hidden: (B, T, H) final hidden states; targets: (B, T) item indices, 0 = no target.

    Returns:
        (B,) float; 0 for a sample without targets.
    """
    where = targets != 0
    ce = F.cross_entropy(model.head(hidden[where]), targets[where], reduction="none")
    rows = where.nonzero()[:, 0]
    total = torch.zeros(len(targets), dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    return total / where.sum(dim=1).clamp(min=1)


@contextlib.contextmanager
def remove_layers(model, removed: Iterable[int]) -> Iterator[None]:
    """Within the block, each layer in `removed` passes its input through unchanged (out = in).

    The layer still runs (T5's block 0 still hands its position bias on, as physical removal moves the
    bias table to the new first block), but its state update is discarded exactly. Removing every layer
    is allowed here (embeddings straight to the head): a measurement, not a model anyone would keep.
    """
    removed = sorted(set(int(i) for i in removed))
    n = model.n_layers
    if removed and (removed[0] < 0 or removed[-1] >= n):
        raise ValueError(f"removed layers {removed} out of range for a {n}-layer model")

    def skip(module, args, output):
        return (args[0], *output[1:]) if isinstance(output, tuple) else args[0]

    handles = [model.layers[i].register_forward_hook(skip) for i in removed]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def metric_with_removed(model, removed: Iterable[int], metric: str, batches: Sequence[Batch] | None = None,
                        data=None, users: np.ndarray | None = None, max_len: int = 50) -> float:
    """The model's `metric` with `removed` gated off.

    Metrics: "ndcg@10" is validation NDCG@10 (`layerwise.evaluation.evaluate.evaluate`, stage "valid", seen items
    excluded); "loss" is the validation loss (cross-entropy of each user's validation item) when `data`
    is given, else the mean per-sample loss over `batches`.

    Args:
        users: user indices to evaluate on `data` (None: all).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
    if data is None and (metric != "loss" or batches is None):
        raise ValueError(f"metric {metric!r} needs validation data (data=...)" if metric != "loss"
                         else "metric 'loss' needs calibration batches or validation data")
    with eval_mode(model), remove_layers(model, removed), torch.inference_mode():
        if metric == "ndcg@10":
            return evaluate(model.score, data, stage="valid", users=users, max_len=max_len).means["ndcg@10"]
        if data is not None:
            return _validation_loss(model, data, users, max_len)
        return _batch_loss(model, batches)


VALID_LOSS_CHUNK = 256  # users per forward of the validation loss (layerwise.compression.dependency sums chunks alike)


def _validation_loss(model, data, users: np.ndarray | None, max_len: int, chunk: int = VALID_LOSS_CHUNK) -> float:
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    targets = torch.as_tensor(np.asarray(data.targets("valid"))[users], dtype=torch.long)
    total = 0.0
    for start in range(0, len(users), chunk):
        scores = model.score(data.padded_histories(users[start:start + chunk], "valid", max_len))
        y = targets[start:start + chunk].to(scores.device)
        total += F.cross_entropy(scores.double(), y, reduction="sum").item()
    return total / len(users)


def _batch_loss(model, batches: Sequence[Batch]) -> float:
    total, count = 0.0, 0
    for inputs, targets in batches:
        device = model_device(model)
        inputs, targets = inputs.to(device), targets.to(device)
        keep = (targets != 0).any(dim=1)
        losses = sample_losses(model, model.encode(inputs[keep]), targets[keep])
        total, count = total + losses.double().sum().item(), count + int(keep.sum())
    if count == 0:
        raise ValueError("no calibration batch has a target")
    return total / count


def sample_users(data, max_users: int | None, seed: int = 0) -> np.ndarray | None:
    """A sorted, seeded subsample of `max_users` user indices, or None (all users)."""
    if max_users is None or max_users >= data.n_users:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(data.n_users, size=max_users, replace=False))


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | Sequence[nn.Module]) -> Iterator[None]:
    """Put modules in eval mode (no dropout: deterministic scores) and restore every train flag."""
    flat = [m for x in modules for m in (x if isinstance(x, (list, tuple)) else [x])]
    flags = [(sub, sub.training) for m in flat for sub in m.modules()]
    try:
        for m in flat:
            m.eval()
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


@contextlib.contextmanager
def requires_grad(modules: Sequence[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Make the parameters of `modules` require grad (when `enabled`), then restore the flags."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        if enabled:
            for p in params:
                p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _state(output) -> Tensor:
    # Layers return a tensor (llama, qwen3, gpt2, bert) or a tuple led by the state (t5).
    return output[0] if isinstance(output, tuple) else output


def _detach(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _check_plain(model) -> None:
    if getattr(model, "bridges", None):
        raise ValueError("importance is measured on a model without bridges (a teacher); this one has bridges")
