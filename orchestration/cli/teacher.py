"""How `layerwise train`'s flags and a recipe become the teacher's settings.

    layerwise train --pretrained smollm2-135m --dataset ml-100k --out /tmp/smollm2     # recipe smollm2
    layerwise train --dataset synthetic:300:60:6000:0 --family llama --preset tiny --out /tmp/teacher

A pretrained decoder LLM takes a recipe (orchestration.recipes) unless `--recipe none`; a flag given on the
command line always wins over the recipe, and the recipe over the library's defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Any

TRAIN_FIELDS = ("epochs", "lr", "batch_size", "loss", "max_minutes", "schedule", "warmup", "autocast")
LLM_FIELDS = ("finetune", "lora_rank", "n_layers", "item_init", "item_std", "item_scale", "input_norm",
              "layer_init", "gradient_checkpointing")


class Registry:
    """argparse choices read from a library registry when first needed, so that building the parser (every
    `layerwise` command, --help included) does not import torch and transformers."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def _names(self) -> list[str]:
        import importlib

        return sorted(getattr(importlib.import_module(self.module), self.name))

    def __iter__(self):
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()


@dataclass
class TeacherSetup:
    """What build_recommender and train_recommender get, and the recipe line the run prints."""

    build: dict[str, Any]
    train: Any  # layerwise.training.train.TrainConfig
    recipe: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.recipe is None:
            return "recipe: none (the library's defaults and the flags given)"
        llm, t = self.build.get("llm"), self.train
        parts = [f"head {self.build['head']}"]
        if llm is not None:
            parts += [f"items {llm.item_init}" + (f" at the {llm.item_scale}" if llm.item_init != "random" else ""),
                      f"{llm.finetune}" + (f" r{llm.lora_rank}" if llm.finetune == "lora" else "")]
        parts += [f"lr {t.lr:g} {t.schedule}" + (f" with {t.warmup:.0%} warm-up" if t.warmup else ""),
                  f"{t.epochs} epoch" + ("" if t.epochs == 1 else "s"), f"batch {t.batch_size}", f"autocast {t.autocast or 'none'}"]
        text = f"recipe {self.recipe['name']} ({self.recipe['path']}): " + ", ".join(parts)
        return text + "".join(f"; {note}" for note in self.notes)


def teacher_setup(args: argparse.Namespace, data) -> TeacherSetup:
    """The recipe (named by --recipe, or the pretrained decoder LLM's own) under the flags given."""
    from layerwise.models.llm import LLMSetup
    from layerwise.training.train import TrainConfig

    recipe = _choose_recipe(args)
    base = recipe.teacher if recipe else None
    pretrained = args.pretrained or (base.pretrained if base else None)
    llm_flags = {k: getattr(args, k) for k in LLM_FIELDS if getattr(args, k) is not None}
    train = replace(base.train if base else TrainConfig(), seed=args.seed, max_len=args.max_len,
                    **{k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None})
    llm = base.llm if base else None
    if llm_flags or (llm is not None):
        llm = replace(llm or LLMSetup(), **llm_flags)
    notes = []
    titles = getattr(data, "item_text", None)
    if llm is not None and llm.item_init != "random" and "item_init" not in llm_flags and not any(titles or ()):
        llm = replace(llm, item_init="random", item_scale="std")
        notes.append(f"items random: data set {data.name!r} has no titles")
    if recipe and train.autocast == "bf16" and args.autocast is None and not _native_bf16(args):
        train = replace(train, autocast=None)
        notes.append("no bf16 autocast: this CPU has no native bf16 (emulated, a SmolLM2 step took 190 s "
                     "against 6.9 s in float32)")
    family = args.family or (base.family if base and not pretrained else "llama")
    build = {"family": family, "preset": args.preset or (base.preset if base else "small"),
             "pretrained": pretrained, "text_features": args.text_features or bool(base and base.text_features),
             "max_len": args.max_len, "dropout": args.dropout if args.dropout is not None else
             (base.dropout if base else None), "seed": args.seed, "causal": args.causal or bool(base and base.causal),
             "head": args.head or (base.head if base else "dot"), "llm": llm}
    if llm_flags and not pretrained:
        raise ValueError(f"--{next(iter(llm_flags)).replace('_', '-')} needs --pretrained (a decoder LLM)")
    described = {"name": recipe.name, "path": _shown(recipe.path)} if recipe else None
    return TeacherSetup(build, train, described, notes)


def check_family(args: argparse.Namespace, model) -> None:
    """--family given with --pretrained must name the checkpoint's own architecture (it cannot change it)."""
    if args.pretrained and args.family and args.family != model.family.name:
        raise ValueError(f"--family {args.family} does not match {args.pretrained}, a {model.family.name} "
                         f"model ({type(model.backbone).__name__}); leave --family out with --pretrained")


def model_name(model, setup: TeacherSetup) -> str:
    """"smollm2-135m (llama: LlamaModel, 30 layers)" or "llama/small (8 layers)", for the run's last line."""
    if setup.build["pretrained"]:
        return (f"{setup.build['pretrained']} ({model.family.name}: {type(model.backbone).__name__}, "
                f"{model.n_layers} layers)")
    return f"{model.family.name}/{setup.build['preset']} ({model.n_layers} layers)"


def _choose_recipe(args: argparse.Namespace):
    from orchestration.recipes import load_recipe, recipe_for

    if args.recipe == "none":
        return None
    if args.recipe:
        return load_recipe(args.recipe)
    if args.pretrained and _decoder_llm(args.pretrained):
        return recipe_for(args.pretrained)
    return None


def _decoder_llm(pretrained: str) -> bool:
    """Whether a --pretrained spec is a decoder LLM (MiniLM and other encoders take no LLM recipe)."""
    if pretrained == "minilm":
        return False
    from transformers import AutoConfig

    from layerwise.models.families import family_of
    from layerwise.models.pretrained import resolve_pretrained

    return family_of(AutoConfig.from_pretrained(str(resolve_pretrained(pretrained)))).causal


def _native_bf16(args: argparse.Namespace) -> bool:
    """bf16 autocast is kept on a GPU (the device's own rule applies there) and on a CPU with bf16 units."""
    from orchestration.recipes import native_cpu_bf16

    if getattr(args, "device", None) not in (None, "cpu"):
        from layerwise.device import resolve_device

        if resolve_device(args.device).type == "cuda":
            return True
    return native_cpu_bf16()


def _shown(path) -> str:
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
