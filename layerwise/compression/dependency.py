"""The inter-layer dependency matrix: how much two layers' removals interact.

D[i, j] = Δ(remove i and j) − Δ(remove i) − Δ(remove j), where Δ is the damage a removal does (increase
in loss, or drop in validation NDCG@10). D = 0: the two removals add up. D > 0: they hurt more together
than apart (redundant layers that stand in for each other). D < 0: together they hurt less (layers whose
updates cancel). `layerwise.compression.select.beam` uses D to search for the cheapest set to remove.

    D = dependency_matrix(model, batches)                          # calibration loss
    D = dependency_matrix(model, batches, data, metric="ndcg@10")  # validation NDCG@10
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from layerwise.data.atomic import atomic_path
from layerwise.data.batching import trim_left
from layerwise.compression.tracing import VALID_LOSS_CHUNK, eval_mode, metric_with_removed, sample_users


def dependency_matrix(model, batches: Iterable | None, data=None, metric: str = "loss",
                      max_users: int | None = None, max_len: int = 50, seed: int = 0,
                      reuse_prefix: bool = True, state: str | Path | None = None) -> Tensor:
    """Pairwise interaction of layer removals (layers gated off, exactly physical removal).

    Costs 1 + L + L(L-1)/2 evaluations of the model (for a decoder LLM's validation loss, about a third of
    their layer forwards: see `removal_losses`).

    Args:
        batches: calibration `(inputs, targets)` pairs; used by metric "loss" without data.
        data: validation data; with it, "loss" is the validation loss (see `metric_with_removed`).
        metric: "loss" (Δ = increase) or "ndcg@10" (Δ = drop; needs data).
        max_users: evaluate a seeded subsample of this many validation users (None: all).
        reuse_prefix: for the validation loss of a decoder LLM, compute the states a removal leaves
            unchanged once (`removal_losses`: the same values, about 3x fewer layer forwards); False gates
            layers off for every removal set.
        state: on that path, a JSON file the sums so far are kept in after each chunk of users, so that
            an interrupted computation goes on from there (`removal_losses`).

    Returns:
        (n_layers, n_layers) float64, symmetric, zero diagonal.
    """
    batches = None if batches is None else list(batches)  # evaluated 1 + L + L(L-1)/2 times
    users = sample_users(data, max_users, seed) if data is not None else None
    sign = -1.0 if metric == "ndcg@10" else 1.0
    if reuse_prefix and metric == "loss" and data is not None and prefix_reusable(model):
        cached = removal_losses(model, data, users, max_len, state=state)

        def value(removed: set[int]) -> float:
            return cached[frozenset(removed)]
    else:
        def value(removed: set[int]) -> float:
            return metric_with_removed(model, removed, metric, batches, data, users, max_len)

    base = value(set())

    def damage(removed: set[int]) -> float:
        return sign * (value(removed) - base)

    n = model.n_layers
    single = [damage({i}) for i in range(n)]
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = damage({i, j}) - single[i] - single[j]
    return matrix


def prefix_reusable(model) -> bool:
    """Whether `removal_losses` may run this model's layers one by one: a decoder LLM backbone (LLaMA,
    Qwen, Gemma 3) whose final norm is `backbone.norm`, and no bridges. Others take the gated path."""
    return (model.family.causal and not len(model.bridges)
            and isinstance(getattr(model.backbone, "norm", None), torch.nn.Module))


def removal_losses(model, data, users: np.ndarray | None, max_len: int = 50,
                   chunk: int = VALID_LOSS_CHUNK, pairs: bool = True,
                   state: str | Path | None = None) -> dict[frozenset, float]:
    """The validation loss with no layer, each layer and (with `pairs`) each pair of layers removed, as
    `metric_with_removed(model, removed, "loss", data=data, users=users)` gives it, at a third of its cost.

    Gating a layer off still runs it. Here every state that a removal leaves unchanged is computed once:
    per chunk of users, the layers' inputs on the full model; from the input of layer i, the run without
    i; and from that run's input of layer j, the run without i and j. Each layer is called with the
    arguments the backbone gave it (masks, rotary embeddings), then the backbone's final norm and the
    head, so the chunks' losses are those of the gated model, summed in the same order. Layer forwards:
    about L^3/6 against L^3/2 gated; without pairs about L^2/2 against L^2.

    With `state`, the sums are written to that JSON file after each chunk (with the users, chunk size and
    depth they belong to), and a call that finds the file goes on after its last chunk: the same sums in
    the same order, so the same values as one uninterrupted call. (Two hours for SmolLM2's 30 layers on 512
    users and 2 cores, longer than some working sessions.) A file written for other users is refused.
    """
    users = np.arange(data.n_users) if users is None else np.asarray(users)
    targets = torch.as_tensor(np.asarray(data.targets("valid"))[users], dtype=torch.long)
    n = model.n_layers
    totals: dict[frozenset, float] = {}
    identity = {"users": [int(u) for u in users], "chunk": chunk, "n_layers": n, "pairs": pairs}
    first_row = 0
    if state is not None and Path(state).exists():
        saved = json.loads(Path(state).read_text())
        differ = sorted(key for key in identity if saved.get(key) != identity[key])
        if differ:
            raise ValueError(f"{state} holds the sums of another computation (differs in {differ}); remove it "
                             f"to start again")
        first_row = saved["rows_done"]
        totals = {frozenset(removed): total for removed, total in saved["totals"]}

    def add(removed: tuple[int, ...], final: Tensor, y: Tensor) -> None:
        scores = model.head(final[:, -1])
        key = frozenset(removed)
        totals[key] = totals.get(key, 0.0) + F.cross_entropy(scores.double(), y, reduction="sum").item()

    with eval_mode(model), torch.inference_mode():
        for row in range(first_row, len(users), chunk):
            y = targets[row:row + chunk].to(model.item_embedding.weight.device)
            histories = data.padded_histories(users[row:row + chunk], "valid", max_len)
            start, inputs = trim_left(model.prepare(histories))
            final, inputs_of, calls = _layer_calls(model, inputs, start)
            add((), final, y)
            for i in range(n):
                without_i: dict[int, Tensor] = {}  # the input of layer l > i once layer i is gone
                add((i,), _run_from(model, inputs_of[i], i + 1, calls, without_i if pairs else None), y)
                for j in range(i + 1, n) if pairs else ():
                    add((i, j), _run_from(model, without_i[j], j + 1, calls), y)
            if state is not None:
                with atomic_path(state) as tmp:
                    tmp.write_text(json.dumps({**identity, "rows_done": min(row + chunk, len(users)),
                                               "totals": [[sorted(k), t] for k, t in totals.items()]}))
    return {key: total / len(users) for key, total in totals.items()}


def removal_ndcg(model, data, users: np.ndarray | None, max_len: int = 50) -> dict[frozenset, float]:
    """Validation NDCG@10 with no layer and with each single layer removed, as
    `metric_with_removed(model, {i}, "ndcg@10", data=data, users=users)` gives it (the same ranks, so the
    same values), at about half its layer forwards: the `ablation` estimator of a decoder LLM.

    `evaluate`'s ranking (`rank_targets`) scores each of its batches every way at once: one full forward
    keeps each layer's input, and the run without layer i starts from layer i's input. Layer forwards:
    about L^2/2 against L^2 gated. On SmolLM2's 30 layers and 512 users that is the larger half of the
    importance stage.
    """
    from layerwise.evaluation.evaluate import rank_targets
    from layerwise.evaluation.metrics import metrics_from_ranks

    def every_removal(histories: Tensor) -> dict[tuple, Tensor]:
        start, inputs = trim_left(model.prepare(histories))
        final, inputs_of, calls = _layer_calls(model, inputs, start)
        scores = {(): model.head(final[:, -1])}
        for i in range(model.n_layers):
            scores[(i,)] = model.head(_run_from(model, inputs_of[i], i + 1, calls)[:, -1])
        return scores

    with eval_mode(model), torch.inference_mode():
        ranks = rank_targets(every_removal, data, stage="valid", max_len=max_len, users=users)
    # As evaluate's means: each user's NDCG@10 from its rank, then numpy's mean.
    return {frozenset(key): float(metrics_from_ranks(r, (10,))["ndcg@10"].numpy().mean())
            for key, r in ranks.items()}


def _run_from(model, hidden: Tensor, first: int, calls: list, inputs_of: dict | None = None) -> Tensor:
    """Layers first..n-1 from `hidden` (the input of layer `first`), each called with the arguments the
    backbone gave it, then the final norm; `inputs_of` collects each layer's input on the way."""
    layers = model.layers
    for layer in range(first, model.n_layers):
        if inputs_of is not None:
            inputs_of[layer] = hidden
        args, kwargs = calls[layer]
        out = layers[layer](hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return model.backbone.norm(hidden)


def _layer_calls(model, inputs: Tensor, start: int) -> tuple[Tensor, list[Tensor], list[tuple]]:
    """One full forward: its final hidden states, each layer's input state, and the other arguments the
    backbone called each layer with (args, kwargs)."""
    states: list = [None] * model.n_layers
    calls: list = [None] * model.n_layers
    handles = []
    for index, layer in enumerate(model.layers):
        def pre(module, args, kwargs, index=index):
            states[index], calls[index] = args[0], (args[1:], kwargs)
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        final = model.encode(inputs, start=start)
    finally:
        for handle in handles:
            handle.remove()
    return final, states, calls
