"""A study seed's teacher: trained with the seed, saved, and loaded again (not retrained) when a run that
stopped after saving it but before its stage ended is resumed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from orchestration.pipeline import interrupts


def train_teacher(t, data, dataset: str, seed: int, max_len: int, path: Path, progress: bool = False):
    """Train a teacher from TeacherConfig `t` with `seed` on `data`, save it at `path`; (model in eval, result).
    `dataset` is the name the manifest records."""
    from layerwise.models.checkpoint import save_recommender
    from layerwise.models.factory import build_recommender
    from layerwise.train import train_recommender

    if (path / "manifest.json").exists():  # saved by a run that stopped before its stage ended
        return saved_teacher(path)  # (training removed its epoch checkpoint when it saved)
    recipe = replace(t.train, seed=seed, max_len=max_len)
    model = build_recommender(data, t.family, t.preset, pretrained=t.pretrained, text_features=t.text_features,
                              max_len=max_len, dropout=t.dropout, seed=seed, causal=t.causal, head=t.head, llm=t.llm)
    # Resumes mid-training after an interruption (an LLM teacher takes an hour or more on 2 cores).
    result = train_recommender(model, data, recipe, progress=progress,
                               checkpoint=path.parent / f"{path.name}-checkpoint",
                               stop=lambda _: interrupts.requested())
    save_recommender(model, path, {
        "kind": "teacher", "preset": t.preset, "pretrained": t.pretrained, "dataset": dataset,
        "llm": getattr(model, "llm_info", None), "data_fingerprint": data.fingerprint, "max_len": max_len,
        "train": result.config, "best_epoch": result.best_epoch, "valid": result.best_valid, "seed": seed,
        "history": result.history, "stop_reason": result.stop_reason})
    return model.eval(), result


def saved_teacher(path: Path):
    """The teacher an earlier run trained and saved at `path` (saves are atomic), with its training record
    from the manifest: (model in eval, TrainResult)."""
    from layerwise.compact import load_compact
    from layerwise.models.checkpoint import read_manifest
    from layerwise.train import TrainResult

    saved = read_manifest(path)
    history = saved.get("history") or []
    result = TrainResult(best_epoch=saved["best_epoch"], best_valid=saved["valid"], history=history,
                         config=saved["train"], stop_reason=saved.get("stop_reason", "epochs"),
                         epochs_run=len(history))
    return load_compact(path).eval(), result
