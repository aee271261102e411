"""Baselines, one registry: name -> factory. `BASELINES["mostpop"](data)` returns a scorer for `evaluate`."""

from collections.abc import Callable

from layerwise.baselines.popularity import mostpop_scorer

BASELINES: dict[str, Callable] = {
    "mostpop": mostpop_scorer,
}

__all__ = ["BASELINES", "mostpop_scorer"]
