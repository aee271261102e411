"""Models named on a command line, checked against the data set they are used on: a saved model
directory (loaded with its bridges) or a named baseline such as mostpop."""

from __future__ import annotations

from pathlib import Path


def scorer_for(spec: str, data, device: str | None = "cpu"):
    """'mostpop' or a model directory -> Callable[[LongTensor (B, T)], FloatTensor (B, n_items + 1)]; a
    model runs on `device` (a `layerwise.device` setting; a baseline stays on the CPU)."""
    from layerwise.baselines import BASELINES
    from layerwise.device import device_scorer

    if spec in BASELINES:
        return BASELINES[spec](data)
    if not Path(spec).is_dir():
        raise FileNotFoundError(f"--model {spec!r} is neither a model directory nor a baseline "
                                f"({', '.join(sorted(BASELINES))})")
    return device_scorer(load_model_for(spec, data, device))


def load_model_for(model_dir: str, data, device: str | None = "cpu"):
    """Load a saved model after checking that it was trained on `data` (same catalogue and split), and
    place it on `device` (a `layerwise.device` setting: auto, cpu, cuda or cuda:N)."""
    from layerwise.compact import load_compact
    from layerwise.device import resolve_device
    from layerwise.models.checkpoint import read_manifest

    manifest = read_manifest(model_dir)
    if manifest["n_items"] != data.n_items:
        raise ValueError(f"model {model_dir} was trained on {manifest['n_items']} items but the data set "
                         f"has {data.n_items}; use the data set it was trained on")
    expected = manifest.get("data_fingerprint")
    if expected and expected != data.fingerprint:
        raise ValueError(f"model {model_dir} was trained on data with fingerprint {expected[:12]}, "
                         f"this data set has {data.fingerprint[:12]}")
    return load_compact(model_dir).to(resolve_device(device))
