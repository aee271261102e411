"""Recommenders on real transformer backbones, per-family layer accessors, presets and checkpoints."""

from layerwise.models.families import FAMILIES, Family, family_of
from layerwise.models.presets import build_backbone, load_backbone, preset_config
from layerwise.models.recommender import SequentialRecommender

__all__ = [
    "FAMILIES", "Family", "family_of", "build_backbone", "load_backbone", "preset_config",
    "SequentialRecommender",
]
