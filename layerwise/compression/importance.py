"""Layer importance: one registry, `IMPORTANCE[name](model, batches, **context) -> Tensor (n_layers,)`.

Higher = more important. Every estimator is a real computation on the model over calibration batches
(`(inputs, targets)` pairs from `layerwise.training.train.training_windows` / `cloze_mask`):

    scores = IMPORTANCE["fisher"](model, batches)
    scores = IMPORTANCE["ablation"](model, batches, data=data, max_users=500)

The local estimators (fisher, taylor, param_fisher, block_influence, angular, activation) are computed
per contiguous run of layers by `local_scores`, from a `tracing.trace_layers` record: the state entering
the run, each layer's call, the gradient leaving it. `compute_importance` is the single-process case (one
run over all layers); a sharded computation runs `local_scores` once per shard with `shard_inputs` and
concatenates, with the same result. Ablation and `combined` evaluate the whole (gated) model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import rankdata
from torch import Tensor

from layerwise.compression.select import topk
from layerwise.compression.tracing import (
    BatchTrace, LayerCall, eval_mode, metric_with_removed, requires_grad, sample_users, trace_layers,
)

LOCAL_METHODS = ("fisher", "taylor", "param_fisher", "block_influence", "angular", "activation")
_GRADIENT_METHODS = {"fisher", "taylor", "param_fisher"}


def local_scores(layers: Sequence[nn.Module], start: int, h_in: Sequence[Tensor],
                 grad_out: Sequence[Tensor | None], extras: Sequence[Sequence[LayerCall]],
                 token_mask: Sequence[Tensor], methods: Sequence[str] = LOCAL_METHODS) -> dict[str, Tensor]:
    """Local estimators for the run of layers `layers[start:start + n]`, n = len(extras[0]).

    The run is replayed from its input state with the recorded calls, each layer's residual update gated
    by a per-sample scalar g = 1 (out = s + (g - 1)(s - h), exactly s at g = 1), and the boundary
    gradient is back-propagated through it. A shard worker can pass just its own modules with start=0.
    Each argument after `start` holds one entry per calibration batch b (shapes for that batch):

    Args:
        layers: the layer modules (indexable); only `layers[start:start + n]` is used.
        start: index in `layers` of the run's first layer.
        h_in: (B, T, H) state entering the run.
        grad_out: (B, T, H) dL/d(state leaving the run); None when no gradient method is asked for.
        extras: n `LayerCall`s, the run's layers' calls (the last one's `carried_grad` is boundary data).
        token_mask: (B, T) bool, non-padding positions.
        methods: a subset of `LOCAL_METHODS`.

    Returns:
        method -> (n,) float64:
        fisher = mean_b (dL_b/dg_b)^2 over all samples of all batches;
        taylor = |mean_b -dL_b/dg_b|, the magnitude of the first-order loss change when g goes 1 -> 0
            (absolute value of the mean: a layer whose removal would change the loss either way matters);
        param_fisher = sum over batches and the layer's parameters of (dL/dtheta)^2;
        block_influence = 1 - cos(h_in, h_out), angular = arccos(cos)/pi and
            activation = ||h_out - h_in|| / ||h_in||, each averaged over all non-padding tokens.
    """
    unknown = set(methods) - set(LOCAL_METHODS)
    if unknown:
        raise ValueError(f"unknown local methods {sorted(unknown)}; choose from {LOCAL_METHODS}")
    n = len(extras[0])
    run = [layers[start + j] for j in range(n)]
    gradient = bool(_GRADIENT_METHODS & set(methods))
    sums = {m: torch.zeros(n, dtype=torch.float64) for m in methods}
    n_samples, n_tokens = 0, 0
    with eval_mode(*run), requires_grad(run, "param_fisher" in methods):
        for h, g, calls, mask in zip(h_in, grad_out, extras, token_mask):
            if gradient and g is None:
                raise ValueError(f"methods {sorted(_GRADIENT_METHODS & set(methods))} need grad_out")
            part = _replay(run, h, g if gradient else None, calls, mask, "param_fisher" in methods)
            for m in methods:
                sums[m] += part[m]
            n_samples, n_tokens = n_samples + len(h), n_tokens + int(mask.sum())
    scale = {"fisher": n_samples, "taylor": n_samples, "param_fisher": 1}
    out = {m: sums[m] / scale.get(m, max(n_tokens, 1)) for m in methods}
    if "taylor" in out:
        out["taylor"] = out["taylor"].abs()
    return out


def _replay(run: list[nn.Module], h: Tensor, grad_out: Tensor | None, calls: Sequence[LayerCall],
            mask: Tensor, want_params: bool) -> dict[str, Tensor]:
    """One batch through the run: per-layer sums (float64) of every local estimator."""
    gates = [h.new_ones(len(h), 1, 1, requires_grad=grad_out is not None) for _ in run]
    stats = {m: torch.zeros(len(run), dtype=torch.float64) for m in ("block_influence", "angular", "activation")}
    previous = None
    with torch.set_grad_enabled(grad_out is not None):
        for j, (layer, call, gate) in enumerate(zip(run, calls, gates)):
            args, kwargs = _rethread(call, previous if j else None)
            output = layer(h, *args, **kwargs)
            state = output[0] if isinstance(output, tuple) else output
            gated = state + (gate - 1) * (state - h)
            for m, v in _token_stats(h.detach(), gated.detach(), mask).items():
                stats[m][j] = v
            previous = (gated, *output[1:]) if isinstance(output, tuple) else gated
            h = gated
    if grad_out is None:
        return stats
    roots, seeds = [h], [grad_out]
    for i, g in calls[-1].carried_grad.items():
        if previous[i].requires_grad:  # a carried tensor that was only passed through has no graph here
            roots.append(previous[i])
            seeds.append(g)
    params = [[p for p in layer.parameters() if p.requires_grad] if want_params else [] for layer in run]
    flat = [p for group in params for p in group]
    grads = torch.autograd.grad(roots, gates + flat, seeds, allow_unused=True)
    gate_grads = torch.stack([g.reshape(-1) for g in grads[:len(gates)]]).double()  # (n, B)
    stats["fisher"] = (gate_grads ** 2).sum(dim=1).cpu()  # per-layer sums live on the host
    stats["taylor"] = (-gate_grads).sum(dim=1).cpu()
    sq = [0.0 if g is None else g.double().pow(2).sum().item() for g in grads[len(gates):]]
    bounds = np.cumsum([0] + [len(group) for group in params])
    stats["param_fisher"] = torch.tensor([sum(sq[a:b]) for a, b in zip(bounds[:-1], bounds[1:])],
                                         dtype=torch.float64)
    return stats


def _rethread(call: LayerCall, previous) -> tuple[list, dict]:
    """The recorded call, with carried tensors taken from the previous replayed layer's output."""
    args, kwargs = list(call.args), dict(call.kwargs)
    if previous is not None:
        for loc, i in call.carried.items():
            if isinstance(loc, int):
                args[loc - 1] = previous[i]  # recorded args exclude the hidden state
            else:
                kwargs[loc] = previous[i]
    return args, kwargs


def _token_stats(h_in: Tensor, h_out: Tensor, mask: Tensor) -> dict[str, float]:
    """Sums over non-padding tokens. h_in, h_out: (B, T, H); mask: (B, T)."""
    a, b = h_in[mask].double(), h_out[mask].double()
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    # 1 - cos = |ua - ub|^2 / 2 and the angle = 2 atan2(|ua - ub|, |ua + ub|) are exactly 0 for an
    # unchanged state; arccos(cos) is not (arccos(1 - 1e-7) is already 4e-4).
    diff, total = (ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1)
    return {
        "block_influence": (diff.pow(2) / 2).sum().item(),
        "angular": (2 * torch.atan2(diff, total) / torch.pi).sum().item(),
        "activation": ((b - a).norm(dim=-1) / a.norm(dim=-1).clamp(min=1e-12)).sum().item(),
    }


def shard_inputs(traces: Sequence[BatchTrace], start: int, end: int) -> dict[str, list]:
    """The boundary data that `local_scores` needs for layers [start, end), one entry per batch."""
    return {
        "h_in": [t.states[start] for t in traces],
        "grad_out": [t.grad_out[end - 1] if t.grad_out else None for t in traces],
        "extras": [t.calls[start:end] for t in traces],
        "token_mask": [t.token_mask for t in traces],
    }


def compute_importance(model, batches: Iterable, methods: Sequence[str] = LOCAL_METHODS,
                       removed: Iterable[int] = ()) -> dict[str, Tensor]:
    """Local estimators in one process: trace, then one run per contiguous block of kept layers.

    With `removed` (layers gated off, see `tracing.remove_layers`) the kept layers are scored in the
    model without them and the removed ones get 0. Returns method -> (n_layers,) float64.
    """
    removed = set(removed)
    gradient = bool(_GRADIENT_METHODS & set(methods))
    traces = trace_layers(model, batches, removed=removed, backward=gradient)
    out = {m: torch.zeros(model.n_layers, dtype=torch.float64) for m in methods}
    for start, end in _runs([l for l in range(model.n_layers) if l not in removed]):
        part = local_scores(model.layers, start, methods=methods, **shard_inputs(traces, start, end))
        for m in methods:
            out[m][start:end] = part[m]
    return out


def _runs(kept: list[int]) -> list[tuple[int, int]]:
    """Maximal contiguous [start, end) runs of the sorted indices `kept`."""
    runs = []
    for l in kept:
        if runs and runs[-1][1] == l:
            runs[-1] = (runs[-1][0], l + 1)
        else:
            runs.append((l, l + 1))
    return runs


def angular_blocks(model, batches: Iterable, n: int) -> Tensor:
    """Gromov et al.: arccos(cos(input of layer l, output of layer l + n - 1)) / pi, mean over tokens.

    Returns (n_layers - n + 1,) float64; entry l is the block of layers l..l+n-1 (small = removable).
    """
    if not 1 <= n <= model.n_layers:
        raise ValueError(f"block size n must be between 1 and {model.n_layers}, got {n}")
    traces = trace_layers(model, batches, backward=False)
    sums = torch.zeros(model.n_layers - n + 1, dtype=torch.float64)
    for t in traces:
        for l in range(len(sums)):
            sums[l] += _token_stats(t.states[l], t.states[l + n], t.token_mask)["angular"]
    return sums / sum(int(t.token_mask.sum()) for t in traces)


def ablation(model, batches: Iterable | None, data=None, metric: str = "ndcg@10", max_users: int | None = None,
             removed: Iterable[int] = (), max_len: int = 50, seed: int = 0) -> Tensor:
    """The real effect of removing each layer alone (gated off, exactly physical removal).

    Args:
        metric: "ndcg@10" (drop in validation NDCG@10) or "loss" (increase in the validation loss, or
            in the calibration loss over `batches` when `data` is None); see `metric_with_removed`.
        max_users: evaluate a seeded subsample of this many validation users (None: all).
        removed: layers already gone; they score 0 and the others are measured without them.

    Returns:
        (n_layers,) float64, higher = removing the layer hurts more.
    """
    from layerwise.compression.dependency import prefix_reusable, removal_losses, removal_ndcg

    removed = set(removed)
    batches = None if batches is None else list(batches)  # evaluated once per layer: must be re-iterable
    users = sample_users(data, max_users, seed) if data is not None else None
    if metric in ("loss", "ndcg@10") and data is not None and not removed and prefix_reusable(model):
        # The same values at about half the layer forwards: each unchanged prefix is computed once.
        values = (removal_losses(model, data, users, max_len, pairs=False) if metric == "loss"
                  else removal_ndcg(model, data, users, max_len))

        def value(gone: set[int]) -> float:
            return values[frozenset(gone)]
    else:
        def value(gone: set[int]) -> float:
            return metric_with_removed(model, gone, metric, batches, data, users, max_len)

    base = value(removed)
    sign = -1.0 if metric == "ndcg@10" else 1.0
    return torch.tensor([0.0 if l in removed else sign * (value(removed | {l}) - base)
                         for l in range(model.n_layers)], dtype=torch.float64)


def make_rescorer(model, batches: Iterable, method: str, **context) -> Callable[[list[int]], Tensor]:
    """For the greedy selector: kept layers -> their scores (len(kept),) with the other layers gated off.

    `method` is a local method or "ablation" / "ablation_loss" (which take `data`, `max_users`,
    `max_len`, `seed` from `context`).
    """
    if method not in LOCAL_METHODS + ("ablation", "ablation_loss"):
        raise ValueError(f"no rescorer for {method!r}; choose one of {LOCAL_METHODS + ('ablation', 'ablation_loss')}")
    batches = list(batches)  # scored again after every removal

    def rescore(kept: list[int]) -> Tensor:
        removed = set(range(model.n_layers)) - set(kept)
        if method in LOCAL_METHODS:
            scores = compute_importance(model, batches, (method,), removed=removed)[method]
        else:
            metric = "ndcg@10" if method == "ablation" else "loss"
            scores = ablation(model, batches, metric=metric, removed=removed, **_pick(context, _ABLATION_KEYS))
        return scores[sorted(kept)]
    return rescore


@dataclass
class Combination:
    """What `combined` chose. weights: method -> weight (sum 1); kept: the top-k layers it implies;
    valid_ndcg: their unhealed validation NDCG@10; tried: every candidate weighting and its NDCG@10."""

    weights: dict[str, float]
    kept: list[int]
    valid_ndcg: float
    tried: list[tuple[dict[str, float], float]]


def combined(model, batches: Iterable, data, k: int, scores: dict[str, Tensor] | None = None,
             grid: int = 2, max_users: int | None = 512, max_len: int = 50, seed: int = 0) -> Tensor:
    """Weighted Borda count over estimators' ranks, with the weights chosen on validation data.

    Candidates: uniform weights, each estimator alone, and the simplex grid with step 1/`grid`. Each
    picks its top-k layers; the k-layer model (the others gated off, no healing) is evaluated on
    validation NDCG@10 (a seeded subsample of `max_users` users); the best weighting wins, ties to the
    earlier candidate. Identical kept sets are evaluated once.

    Args:
        scores: method -> (n_layers,) scores to combine (default: every local estimator).

    Returns:
        (n_layers,) float64, the weighted mean of normalised ranks (0 = least, 1 = most important).
        The choice is attached as `result.combination` (a `Combination`) for logging.
    """
    if data is None:
        raise ValueError("combined chooses its weights on validation data: pass data=...")
    scores = scores if scores is not None else compute_importance(model, batches)
    bad = [m for m, v in scores.items() if tuple(v.shape) != (model.n_layers,)]
    if bad or not scores:
        raise ValueError(f"scores must map estimator names to ({model.n_layers},) tensors; bad: {bad}")
    names = sorted(scores)
    ranks = torch.stack([_normalised_ranks(scores[m]) for m in names])
    users = sample_users(data, max_users, seed)
    measured: dict[tuple[int, ...], float] = {}
    tried = []
    for weights in _candidate_weights(len(names), grid):
        kept = tuple(topk(torch.as_tensor(weights, dtype=torch.float64) @ ranks, k))
        if kept not in measured:
            gone = set(range(model.n_layers)) - set(kept)
            measured[kept] = metric_with_removed(model, gone, "ndcg@10", data=data, users=users, max_len=max_len)
        tried.append((dict(zip(names, weights)), measured[kept]))
    best = max(range(len(tried)), key=lambda i: (tried[i][1], -i))
    weights = tried[best][0]
    result = torch.as_tensor([weights[m] for m in names], dtype=torch.float64) @ ranks
    result.combination = Combination(weights, topk(result, k), tried[best][1], tried)
    return result


def _normalised_ranks(scores: Tensor) -> Tensor:
    """(n,) scores -> (n,) ranks in [0, 1], ties averaged; 1 = most important."""
    r = rankdata(scores.detach().double().cpu().numpy(), method="average") - 1
    return torch.as_tensor(r / max(len(r) - 1, 1), dtype=torch.float64)


def _candidate_weights(m: int, grid: int) -> list[tuple[float, ...]]:
    """Uniform first, then each single estimator, then the rest of the simplex grid of step 1/grid."""
    out = [tuple([1.0 / m] * m)] + [tuple(float(i == j) for i in range(m)) for j in range(m)]
    for cut in itertools.combinations(range(grid + m - 1), m - 1):  # stars and bars
        parts = np.diff([-1, *cut, grid + m - 1]) - 1
        w = tuple(float(p) / grid for p in parts)
        if w not in out:
            out.append(w)
    return out


_ABLATION_KEYS = ("data", "max_users", "max_len", "seed")
_COMBINED_KEYS = ("scores", "grid", "max_users", "max_len", "seed")


def _pick(context: dict, keys: tuple[str, ...]) -> dict:
    return {k: context[k] for k in keys if k in context}


def _local(method: str) -> Callable[..., Tensor]:
    def estimator(model, batches, **context) -> Tensor:
        return compute_importance(model, batches, (method,))[method]
    estimator.__name__ = method
    estimator.__doc__ = f"`{method}` importance (see `local_scores`); context is ignored."
    return estimator


def ablation_ndcg(model, batches, **context) -> Tensor:
    """Registry `ablation`: drop in validation NDCG@10 when each layer goes (needs `data`)."""
    return ablation(model, batches, metric="ndcg@10", **_pick(context, _ABLATION_KEYS))


def ablation_loss(model, batches, **context) -> Tensor:
    """Registry `ablation_loss`: increase in the validation loss (the calibration loss without `data`)."""
    return ablation(model, batches, metric="loss", **_pick(context, _ABLATION_KEYS))


def combined_entry(model, batches, data=None, k: int | None = None, **context) -> Tensor:
    """Registry `combined`: needs `data` and `k` in the context (see `combined`)."""
    if k is None:
        raise ValueError("combined chooses weights for a budget of k kept layers: pass k=...")
    return combined(model, batches, data, k, **_pick(context, _COMBINED_KEYS))


IMPORTANCE: dict[str, Callable[..., Tensor]] = {
    **{m: _local(m) for m in LOCAL_METHODS},
    "ablation": ablation_ndcg,
    "ablation_loss": ablation_loss,
    "combined": combined_entry,
}
