"""layerwise: layer-wise depth compression of transformer recommenders, measured honestly.

    import layerwise as lw

    data = lw.load_dataset("synthetic:300:60:6000:0")
    teacher = lw.build_recommender(data, "llama", preset="tiny")
    lw.train(teacher, data, lw.TrainConfig(epochs=4))
    result = lw.compress(teacher, data, lw.CompressConfig(keep=0.5))

The names below load on first use (PEP 562), so `import layerwise` imports neither torch nor transformers.
The functions live in layerwise.api, the config dataclasses in the modules that use them. The library's
stages are subpackages: compression, evaluation, training, perf (and data, models, baselines, report).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_dataset": "layerwise.api",
    "build_recommender": "layerwise.api",
    "train": "layerwise.api",
    "compress": "layerwise.api",
    "evaluate": "layerwise.api",
    "benchmark": "layerwise.api",
    "save": "layerwise.api",
    "load": "layerwise.api",
    "TrainConfig": "layerwise.training.train",
    "CompressConfig": "layerwise.compression.compress",
    "HealConfig": "layerwise.compression.distill",
    "LLMSetup": "layerwise.models.llm",
    "SampledRanking": "layerwise.evaluation.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
