"""Real, controlled timings for the bench guard's tests: layers that sleep, and a disturbance on one model.

A sleeping layer's cost dominates its CPU work, so a model that keeps k of L such layers runs at its Amdahl
bound even on a busy machine (a sleep is not slowed by load the way arithmetic is). An extra sleep in one
model's first layer is what a burst of load on that model's rounds looks like to the timer.
"""

from __future__ import annotations

import time

from layerwise.models import SequentialRecommender

LAYER_SECONDS = 0.010
DISTURBANCE_SECONDS = 0.060


def sleep_in_layers(model: SequentialRecommender, seconds: float = LAYER_SECONDS) -> None:
    """Every layer of `model` sleeps `seconds` per call (a deep copy of the model keeps the hooks)."""
    for layer in model.layers:
        layer.register_forward_hook(lambda *_: time.sleep(seconds))


def disturb(model: SequentialRecommender, calls: int | None, seconds: float = DISTURBANCE_SECONDS) -> list[int]:
    """Slow the first `calls` calls of `model` (all of them for None) by `seconds`; returns a one-item
    counter of the calls seen. Put on the teacher after its compact copy is made, so only it is slowed."""
    seen = [0]

    def hook(*_):
        seen[0] += 1
        if calls is None or seen[0] <= calls:
            time.sleep(seconds)

    model.layers[0].register_forward_hook(hook)
    return seen
