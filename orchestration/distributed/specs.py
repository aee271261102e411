"""What a distributed job is told to load, instead of being handed objects: a data set spec and a model
spec. Every Ray worker rebuilds the same data and the same initial weights from them.

    data = DataSpec("synthetic:300:120:6000:0", cache_dir="/tmp/cache").load()
    model = build_model(ModelSpec("llama", "tiny", n_layers=4, seed=0), data.n_items)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerwise.data import load_dataset
from layerwise.models import SequentialRecommender, build_backbone, load_backbone, preset_config


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
    """A preset backbone (optionally re-sized) or a local pretrained directory, and the init seed."""

    family: str = "llama"
    preset: str = "small"
    n_layers: int | None = None
    hidden: int | None = None
    max_len: int = 50
    dropout: float = 0.1
    pretrained: str | None = None
    seed: int = 0


def build_model(spec: ModelSpec, n_items: int) -> SequentialRecommender:
    """A fresh recommender for `n_items` items; the same spec gives the same weights in every process."""
    torch.manual_seed(spec.seed)
    if spec.pretrained:
        backbone = load_backbone(spec.pretrained)
    else:
        backbone = build_backbone(preset_config(spec.family, spec.preset, max_len=spec.max_len,
                                                dropout=spec.dropout, n_layers=spec.n_layers,
                                                hidden=spec.hidden))
    return SequentialRecommender(backbone, n_items, dropout=spec.dropout)
