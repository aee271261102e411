"""What a distributed job is told to load, instead of being handed objects: a data set spec and a model
spec. Every Ray worker rebuilds the same data and the same initial weights from them.

    data = DataSpec("synthetic:300:120:6000:0", cache_dir="/tmp/cache").load()
    model = build_model(ModelSpec("llama", "tiny", n_layers=4, seed=0), data)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from layerwise.data import load_dataset
from layerwise.models import SequentialRecommender, build_backbone, preset_config


@dataclass(frozen=True)
class DataSpec:
    """What every worker loads: `layerwise.data.load_dataset(name, data_dir, cache_dir, min_core)`."""

    name: str
    cache_dir: str | None = None
    data_dir: str | None = None
    min_core: int = 0

    def load(self):
        return load_dataset(self.name, data_dir=self.data_dir, cache_dir=self.cache_dir,
                            min_core=self.min_core, progress=False)


@dataclass(frozen=True)
class ModelSpec:
    """A preset backbone (optionally re-sized) or a pretrained one, the head, and the init seed.

    pretrained: a known LLM name, a GGUF file or a local Hugging Face directory (every worker resolves
    it; a known name converts once into the worker's cache). llm: the LLMSetup fields for a pretrained
    decoder (None: LLMSetup's defaults). The same spec gives the same weights in every process.
    """

    family: str = "llama"
    preset: str = "small"
    n_layers: int | None = None
    hidden: int | None = None
    max_len: int = 50
    dropout: float = 0.1
    pretrained: str | None = None
    seed: int = 0
    head: str = "dot"
    llm: dict[str, Any] | None = field(default=None)


def build_model(spec: ModelSpec, data) -> SequentialRecommender:
    """A fresh recommender for `data`'s catalogue (its titles initialise an LLM's item vectors)."""
    if spec.pretrained:
        from layerwise.models.factory import build_recommender
        from layerwise.models.llm import LLMSetup

        return build_recommender(data, spec.family, pretrained=spec.pretrained, max_len=spec.max_len,
                                 dropout=spec.dropout, seed=spec.seed, head=spec.head,
                                 llm=LLMSetup(**spec.llm) if spec.llm is not None else None)
    torch.manual_seed(spec.seed)
    backbone = build_backbone(preset_config(spec.family, spec.preset, max_len=spec.max_len,
                                            dropout=spec.dropout, n_layers=spec.n_layers, hidden=spec.hidden))
    return SequentialRecommender(backbone, data.n_items, dropout=spec.dropout, head=spec.head)
