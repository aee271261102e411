"""Bridge adapters: small trained residual MLPs that join kept layers which were not neighbours.

When layers i+1..j-1 are removed, layer j receives a state that looks like layer i's output instead of
layer j-1's. A bridge maps one to the other: h + up(act(down(norm(h)))), rank r, zero-initialised so a
fresh bridge is exactly the identity (the compact model starts as plain layer removal).

Bridges live in *slots* of the compact model: slot j (0 <= j < k) transforms the input of compact layer j,
slot k transforms the output of the last layer (when the teacher's final layers were removed). They are
attached with forward hooks, so the backbone itself stays a stock transformers model with k layers. The
model holds them in its `bridges` ModuleDict (so they train, save and load with it) but never builds them:
`set_bridges` does, from here, and `restore_bridges` rebuilds them from a saved manifest.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from layerwise.models.recommender import SequentialRecommender


class Bridge(nn.Module):
    """Residual low-rank MLP. hidden: (..., H) -> (..., H); identity at initialisation."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"bridge rank must be positive, got {rank}")
        self.rank = rank  # recorded in a saved model's manifest
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, rank)
        self.up = nn.Linear(rank, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(self.norm(hidden))))


def gap_slots(keep: list[int], n_teacher_layers: int) -> list[int]:
    """Slots that sit at a gap in the teacher's layer sequence.

    Slot j < k is a gap when compact layer j's teacher index is not one more than its predecessor's
    (the embedding counts as index -1); slot k is a gap when the teacher's last layer was removed.
    """
    slots = [j for j, idx in enumerate(keep) if idx != (keep[j - 1] if j else -1) + 1]
    if keep[-1] != n_teacher_layers - 1:
        slots.append(len(keep))
    return slots


class _BridgeHook:
    """A layer hook that applies one bridge. A callable object rather than a closure, so that
    `copy.deepcopy` of a model maps the hook onto the copy's own bridge (a closure would keep calling
    the original model's bridge)."""

    def __init__(self, bridge: Bridge, on_output: bool):
        self.bridge = bridge
        self.on_output = on_output

    def __call__(self, module, args, *rest):
        if not self.on_output:  # forward pre-hook with kwargs: (module, args, kwargs)
            return (self.bridge(args[0]), *args[1:]), rest[0]
        output = rest[0]  # forward hook: (module, args, output); T5 returns a tuple
        if isinstance(output, tuple):
            return (self.bridge(output[0]), *output[1:])
        return self.bridge(output)


def detach_bridges(layers: nn.ModuleList) -> None:
    """Remove every bridge hook from `layers` (found by type, so it also works on deep copies)."""
    for layer in layers:
        for hooks in (layer._forward_pre_hooks, layer._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, _BridgeHook)]:
                del hooks[key]
                layer._forward_pre_hooks_with_kwargs.pop(key, None)


def attach_bridges(layers: nn.ModuleList, bridges: nn.ModuleDict) -> None:
    """Hook `bridges` (keys are slot numbers as strings) onto `layers`, replacing any earlier ones."""
    detach_bridges(layers)
    k = len(layers)
    for key, bridge in bridges.items():
        slot = int(key)
        if not 0 <= slot <= k:
            raise ValueError(f"bridge slot {slot} out of range for {k} layers")
        if slot < k:
            layers[slot].register_forward_pre_hook(_BridgeHook(bridge, False), with_kwargs=True)
        else:
            layers[k - 1].register_forward_hook(_BridgeHook(bridge, True))


def set_bridges(model: SequentialRecommender, slots: list[int], rank: int) -> nn.ModuleDict:
    """Replace `model`'s bridges with fresh identity bridges of `rank` at `slots`, hooked onto its layers."""
    device = model.item_embedding.weight.device  # drawn on the CPU's RNG, then placed: the same on any device
    model.bridges = nn.ModuleDict({str(s): Bridge(model.hidden_size, rank).to(device) for s in slots})
    attach_bridges(model.layers, model.bridges)
    return model.bridges


def restore_bridges(model: SequentialRecommender, manifest: dict[str, Any]) -> None:
    """Rebuild the bridges a saved model's manifest lists ({"slots": [...], "rank": r}); their weights are
    loaded afterwards with the rest (see `layerwise.models.checkpoint.load_recommender(adapters=...)`)."""
    spec = manifest.get("bridges") or {}
    if spec.get("slots"):
        set_bridges(model, spec["slots"], spec["rank"])
