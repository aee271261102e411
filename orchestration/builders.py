"""Turn a command-line model spec into a scorer: a saved model directory or a named baseline."""

from __future__ import annotations

from pathlib import Path


def scorer_for(spec: str, data):
    """'mostpop' or a model directory -> Callable[[LongTensor (B, T)], FloatTensor (B, n_items + 1)]."""
    from layerwise.baselines import BASELINES

    if spec in BASELINES:
        return BASELINES[spec](data)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a model directory nor a baseline "
                                f"({', '.join(sorted(BASELINES))})")
    from layerwise.models.checkpoint import load_recommender, read_manifest

    manifest = read_manifest(spec)
    if manifest["n_items"] != data.n_items:
        raise ValueError(f"model {spec} was trained on {manifest['n_items']} items but the data set has "
                         f"{data.n_items}; evaluate it on the data set it was trained on")
    model = load_recommender(spec)
    return model.score
