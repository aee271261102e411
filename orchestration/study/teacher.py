"""A study seed's teacher: trained with the seed, saved, and loaded again (not retrained) when a run that
stopped after saving it but before its stage ended is resumed.

A teacher trained with LoRA on a pretrained LLM is saved with its adapters and own weights (items, head) in
float16 (LORA_STORAGE): 12 MB a seed for SmolLM2 on ml-100k, small enough for a study archive in the
repository. Every stage, the teacher's own test row included, reads the teacher loaded back from those files
(its backbone merged from the stored adapters), which another machine rebuilds to the same bits
(layerwise.models.rebuild): so no stage ever sees another teacher than the archived one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from orchestration.pipeline import interrupts

LORA_STORAGE = torch.float16  # a LoRA teacher's stored adapters and own weights (the module's docstring)


def train_teacher(t, data, dataset: str, seed: int, max_len: int, path: Path, progress: bool = False,
                  reproduce: Path | None = None, device: torch.device | str = "cpu"):
    """Train a teacher from TeacherConfig `t` with `seed` on `data`, save it at `path`; (model in eval, result).
    `dataset` is the name the manifest records. The model is built on the CPU (the same initial weights on
    every device), then trained and returned on `device`.

    reproduce: an archived teacher (weights stripped) that this training makes again. Its manifest holds its
    training's loss after every epoch, and an epoch that ends at another loss stops the run there
    (ArchiveMismatch): weights that differ after epoch 1 will differ at the end, and the digest check
    (Stages.run) would say so only after the whole training."""
    from layerwise.models.checkpoint import save_recommender
    from layerwise.models.factory import build_recommender
    from layerwise.models.lora import has_lora
    from layerwise.training.train import train_recommender

    if (path / "manifest.json").exists():  # saved by a run that stopped before its stage ended
        return saved_teacher(path, device)  # (training removed its epoch checkpoint when it saved)
    recipe = replace(t.train, seed=seed, max_len=max_len)
    model = build_recommender(data, t.family, t.preset, pretrained=t.pretrained, text_features=t.text_features,
                              max_len=max_len, dropout=t.dropout, seed=seed, causal=t.causal, head=t.head, llm=t.llm)
    model.to(device)
    # Resumes mid-training after an interruption (an LLM teacher takes an hour or more on 2 cores).
    result = train_recommender(model, data, recipe, progress=progress,
                               checkpoint=path.parent / f"{path.name}-checkpoint",
                               stop=lambda _: interrupts.requested(),
                               on_epoch=_same_losses_as(reproduce) if reproduce is not None else None)
    save_recommender(model, path, {
        "kind": "teacher", "preset": t.preset, "pretrained": t.pretrained, "dataset": dataset,
        "llm": getattr(model, "llm_info", None), "data_fingerprint": data.fingerprint, "max_len": max_len,
        "train": result.config, "best_epoch": result.best_epoch, "valid": result.best_valid, "seed": seed,
        "history": result.history, "stop_reason": result.stop_reason},
        weights_dtype=LORA_STORAGE if has_lora(model) else None)
    if has_lora(model):
        return saved_teacher(path, device)  # the stored teacher, not the unrounded one in memory
    return model.eval(), result


def saved_teacher(path: Path, device: torch.device | str = "cpu"):
    """The teacher an earlier run trained and saved at `path` (saves are atomic), with its training record
    from the manifest: (model in eval on `device`, TrainResult)."""
    from layerwise.compression.compact import load_compact
    from layerwise.models.checkpoint import read_manifest
    from layerwise.training.train import TrainResult

    saved = read_manifest(path)
    history = saved.get("history") or []
    result = TrainResult(best_epoch=saved["best_epoch"], best_valid=saved["valid"], history=history,
                         config=saved["train"], stop_reason=saved.get("stop_reason", "epochs"),
                         epochs_run=len(history))
    return load_compact(path).eval().to(device), result


def _same_losses_as(archived: Path):
    """An on_epoch check that each epoch's loss is the one the archived teacher's training recorded."""
    from layerwise.models.checkpoint import read_manifest
    from orchestration.pipeline.stages import ArchiveMismatch

    losses = {row["epoch"]: row["loss"] for row in read_manifest(archived).get("history", [])}

    def check(record: dict) -> None:
        expected = losses.get(record["epoch"])
        if expected is not None and record["loss"] != expected:
            raise ArchiveMismatch(
                f"the teacher trained again differs from the archived one in {archived}: epoch "
                f"{record['epoch']} ended at loss {record['loss']!r} here, {expected!r} there. The archive's "
                f"later stages were computed from the archived weights, so this machine (its CPU, packages "
                f"or thread count) cannot continue them; resume where the archive was made, or archive the "
                f"teacher with its weights (layerwise study archive --max-weight-mb)")
    return check
