"""k-layer students: DistilBERT-style (initialised from every (L/k)-th teacher layer, then distilled),
the same k-layer architecture trained from scratch without a teacher, and (for a teacher built on a
pretrained LLM) that LLM cut to its first k layers and fine-tuned without a teacher.

DistilBERT (Sanh et al., 2019) initialises the student from one teacher layer in two and distils with a
soft-target KL plus the supervised loss. Here: layers 0, L/k, 2L/k, ... of the teacher, no bridges, and
our healing loop with the hidden-state term switched off (KD and cross-entropy on), for our epochs.
The scratch model has the teacher's config with k layers, fresh weights, and the teacher's training
recipe (`budget.train`): what depth costs when nothing is transferred. A model built afresh here (scratch,
truncated) is built on the CPU and trained on the teacher's device. On an LLM teacher it is rebuilt
from the teacher's own build (`budget.build`): the same item-vector start (from the titles, by the
pretrained LLM), head and dropout, with k freshly initialised layers trained fully. `truncated` keeps
the first k pretrained layers instead and fine-tunes them exactly as the teacher was (LoRA or full, its
learning rate and epochs): SLMRec's question of whether a shallower LLM, fine-tuned directly, does as well.
Inside a study stage both keep their state after every epoch (layerwise.training.resume.stage_checkpoints),
so a stage stopped midway resumes from its last epoch.

    variants = BASELINES["distilbert"](data, teacher=teacher, budget=Budget(k=2))
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from layerwise.baselines.budget import Budget, Variant, heal_config_for, require, training_record
from layerwise.compression.compact import build_compact
from layerwise.compression.distill import HealConfig, heal
from layerwise.device import model_device
from layerwise.models.presets import build_backbone
from layerwise.models.recommender import SequentialRecommender
from layerwise.training.resume import next_stage_checkpoint
from layerwise.training.train import TrainConfig, train_recommender

# Whole fresh LLM layers train at the learning rate of the 30-layer random-init control
# (benchmarks/llm_teachers.py, variant random_layers): the teacher's 1e-3 is a rate for LoRA adapters.
LLM_FULL_LR = 3e-4


def every_nth(n_layers: int, k: int) -> list[int]:
    """Teacher layers 0, L/k, 2L/k, ... (floored): DistilBERT's "one layer in L/k"."""
    if not 1 <= k <= n_layers:
        raise ValueError(f"k must be between 1 and {n_layers}, got {k}")
    return [j * n_layers // k for j in range(k)]


def student_config(config: HealConfig, hidden: bool) -> HealConfig:
    """Our healing recipe as a student's distillation: KD and CE always on, the hidden term as asked."""
    return replace(config, kd_weight=config.kd_weight or 1.0, ce_weight=config.ce_weight or 1.0,
                   hidden_weight=(config.hidden_weight or 1.0) if hidden else 0.0)


def distilbert(data, teacher=None, budget: Budget | None = None, progress: bool = False,
               **context) -> list[Variant]:
    """Registry `distilbert`: every (L/k)-th layer, no bridges, distilled with KD + CE (no hidden term)."""
    budget = require("distilbert", teacher, budget)
    keep = every_nth(teacher.n_layers, budget.k)
    student = build_compact(teacher, keep, bridge_rank=0)
    config, note = heal_config_for(student, student_config(replace(budget.heal, seed=budget.seeds[0]), False))
    result = heal(student, teacher, data, config, progress=progress)
    info = {"kept": keep, "loss": "KD + CE", **({"heal_note": note} if note else {})}
    return [Variant("distilbert", student.eval(), "distilbert", training_record(result), info)]


def fresh_student(teacher: SequentialRecommender, k: int, seed: int = 0) -> SequentialRecommender:
    """The teacher's architecture (config, text features, dropout) with k layers and fresh weights."""
    torch.manual_seed(seed)
    backbone = build_backbone(copy.deepcopy(teacher.backbone.config))
    # keep_layers shortens the config's per-layer fields too (layer count, Qwen's layer_types).
    teacher.family.keep_layers(backbone, list(range(k)))
    text = teacher.text_embeddings if teacher.text_projection is not None else None
    return SequentialRecommender(backbone, teacher.n_items, text_embeddings=text, dropout=teacher.dropout.p,
                                 input_norm=teacher.input_norm, head=teacher.head_kind)


def is_llm_build(build: dict | None) -> bool:
    """Whether a teacher's build (`Budget.build`) names the pretrained LLM and the setup it was built with."""
    return bool(build and build.get("pretrained") and build.get("llm"))


def llm_student(data, build: dict, k: int, seed: int = 0, max_len: int = 50, **changes) -> SequentialRecommender:
    """The teacher's LLM recommender built again from its pretrained weights with the first k layers, its
    item-vector start, head and dropout; `changes` replace fields of its LLMSetup (layer_init, finetune)."""
    from layerwise.models.factory import build_recommender
    from layerwise.models.llm import LLMSetup

    setup = {**build["llm"]["setup"], "n_layers": k, **changes}
    return build_recommender(data, "llama", pretrained=build["pretrained"], llm=LLMSetup(**setup),
                             head=build.get("head") or "dot", dropout=build.get("dropout"), seed=seed,
                             max_len=max_len)


def scratch(data, teacher=None, budget: Budget | None = None, progress: bool = False,
            **context) -> list[Variant]:
    """Registry `scratch`: k layers, fresh init, trained on the data alone with the teacher's recipe (an LLM
    teacher's: its item-vector start, the layers trained fully at LLM_FULL_LR)."""
    budget = require("scratch", teacher, budget)
    config = replace(budget.train or TrainConfig(), seed=budget.seeds[0])
    info = {"train_recipe": "teacher's" if budget.train else "TrainConfig() defaults (teacher's unknown)"}
    if is_llm_build(budget.build):
        model = llm_student(data, budget.build, budget.k, budget.seeds[0], budget.heal.max_len,
                            layer_init="random", finetune="full")
        config = replace(config, lr=LLM_FULL_LR)
        info.update(train_recipe=f"teacher's, layers trained fully at lr {LLM_FULL_LR}",
                    item_init=budget.build["llm"]["setup"].get("item_init"))
    else:
        model = fresh_student(teacher, budget.k, budget.seeds[0])
    model.to(model_device(teacher))  # built on the CPU (the same weights everywhere), trained where the teacher is
    result = train_recommender(model, data, config, progress=progress, checkpoint=next_stage_checkpoint())
    return [Variant("scratch", model.eval(), "scratch", training_record(result, "train"), info)]


def truncated(data, teacher=None, budget: Budget | None = None, progress: bool = False,
              **context) -> list[Variant]:
    """Registry `truncated`: the teacher's pretrained LLM cut to its first k layers and fine-tuned on the data
    alone, with the teacher's recipe (no distillation)."""
    budget = require("truncated", teacher, budget)
    if not is_llm_build(budget.build):
        raise ValueError("baseline 'truncated' starts again from the pretrained LLM the teacher was built on, "
                         "and this teacher's manifest names none (a teacher with teacher.pretrained and "
                         "teacher.llm records both)")
    config = replace(budget.train or TrainConfig(), seed=budget.seeds[0])
    model = llm_student(data, budget.build, budget.k, budget.seeds[0], budget.heal.max_len)
    model.to(model_device(teacher))
    result = train_recommender(model, data, config, progress=progress, checkpoint=next_stage_checkpoint())
    info = {"kept": list(range(budget.k)), "train_recipe": "teacher's" if budget.train else "TrainConfig() defaults",
            "pretrained": budget.build["pretrained"]}
    return [Variant("truncated", model.eval(), "truncated", training_record(result, "train"), info)]
