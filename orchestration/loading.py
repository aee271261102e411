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
    from layerwise.compression.compact import load_compact
    from layerwise.device import resolve_device

    return load_compact(model_dir, data=data).to(resolve_device(device))
