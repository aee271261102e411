"""Published model shapes (1B-14B) built on the meta device: exact parameter counts with no memory.

The configs carry the hyperparameters of the released checkpoints' `config.json` (hidden and
intermediate size, layers, heads, KV heads, head_dim, vocabulary, tied embeddings, RoPE), so the counts
are those of the real architectures, and `tests/models/test_scale.py` checks them against the
published figures. Nothing here allocates weights: every model is built under `torch.device("meta")`.

Three views of one model, because "how big is it" depends on what is counted:
- released: the whole published model (LlamaForCausalLM with its LM head, BertModel with its pooler,
  T5ForConditionalGeneration with its decoder). Tied tables count once. This is what model cards quote.
- backbone: the transformers class the recommender wraps (LlamaModel, Qwen3Model, BertModel without
  pooler, T5EncoderModel), at the published config, token vocabulary included.
- recommender: that backbone with the token vocabulary dropped (a recommender feeds `inputs_embeds`;
  a 2-row stub table remains, as in the small presets) plus the item table and bias for `n_items`.

    .venv/bin/python -c "from layerwise.models.scale import count_parameters as c; print(c('llama', '1b'))"
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3Config,
    T5Config,
    T5ForConditionalGeneration,
)

from layerwise.models.families import FAMILIES, family_of
from layerwise.models.presets import build_backbone
from layerwise.models.recommender import SequentialRecommender


@dataclass(frozen=True)
class Scale:
    """One published model.

    Attributes:
        name: the release's name.
        hparams: config attributes of the release (its config.json), for the family's config class.
        references: published parameter counts, keyed by what they count: "total" (the released model,
            tied tables once), "non_embedding" (total minus the input table and an untied LM head).
        source: where the reference figures come from.
    """

    name: str
    hparams: dict[str, Any]
    references: dict[str, float] = field(default_factory=dict)
    source: str = ""


_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3 = {"vocab_size": 128256, "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128001}
_QWEN3 = {"vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 40960, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
          "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645}
_BERT = {"vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
         "layer_norm_eps": 1e-12, "pad_token_id": 0}
# T5 v1.0 (the 3B and 11B releases): ReLU feed-forward, not the gated-GELU of T5 v1.1.
_T5 = {"vocab_size": 32128, "d_model": 1024, "d_kv": 128, "num_layers": 24, "num_decoder_layers": 24,
       "feed_forward_proj": "relu", "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-6,
       "tie_word_embeddings": True}


def _qwen3(hidden: int, ffn: int, layers: int, heads: int, tied: bool) -> dict[str, Any]:
    return {**_QWEN3, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_window_layers": layers, "tie_word_embeddings": tied}


_QWEN_CARD = "Qwen3 model cards: 'Number of Parameters' and '(Non-Embedding)'"
SCALES: dict[str, dict[str, Scale]] = {
    "llama": {
        "1b": Scale("Llama-3.2-1B", {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "head_dim": 64, "max_position_embeddings": 131072, "rope_parameters": _LLAMA3_ROPE,
                    "tie_word_embeddings": True}, {"total": 1.24e9}, "Llama 3.2 model card"),
        "3b": Scale("Llama-3.2-3B", {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192,
                    "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                    "head_dim": 128, "max_position_embeddings": 131072, "rope_parameters": _LLAMA3_ROPE,
                    "tie_word_embeddings": True}, {"total": 3.21e9}, "Llama 3.2 model card"),
        "8b": Scale("Meta-Llama-3-8B", {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "head_dim": 128, "max_position_embeddings": 8192, "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
                    {"total": 8.03e9}, "Meta-Llama-3-8B on the Hugging Face hub"),
        "13b": Scale("Llama-2-13b", {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
                     "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                     "head_dim": 128, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                     "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
                     {"total": 13.0e9}, "Llama 2 paper and model card (13B)"),
    },
    "qwen3": {
        "1.7b": Scale("Qwen3-1.7B", _qwen3(2048, 6144, 28, 16, True),
                      {"total": 1.7e9, "non_embedding": 1.4e9}, _QWEN_CARD),
        "4b": Scale("Qwen3-4B", _qwen3(2560, 9728, 36, 32, True),
                    {"total": 4.0e9, "non_embedding": 3.6e9}, _QWEN_CARD),
        "8b": Scale("Qwen3-8B", _qwen3(4096, 12288, 36, 32, False),
                    {"total": 8.2e9, "non_embedding": 6.95e9}, _QWEN_CARD),
        "14b": Scale("Qwen3-14B", _qwen3(5120, 17408, 40, 40, False),
                     {"total": 14.8e9, "non_embedding": 13.2e9}, _QWEN_CARD),
    },
    "bert": {
        "base": Scale("bert-base-uncased", {**_BERT, "hidden_size": 768, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "intermediate_size": 3072},
                      {"total": 110e6}, "Devlin et al. 2019 (BERT paper), BERT-BASE"),
        "large": Scale("bert-large-uncased", {**_BERT, "hidden_size": 1024, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "intermediate_size": 4096},
                       {"total": 340e6}, "Devlin et al. 2019 (BERT paper), BERT-LARGE"),
    },
    "t5": {
        "3b": Scale("t5-3b", {**_T5, "d_ff": 16384, "num_heads": 32},
                    {"total": 2.85e9}, "t5-3b release (encoder + decoder; Raffel et al. 2020: about 2.8B)"),
        "11b": Scale("t5-11b", {**_T5, "d_ff": 65536, "num_heads": 128},
                     {"total": 11.3e9}, "t5-11b release (encoder + decoder; Raffel et al. 2020: about 11B)"),
    },
}

_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen3": Qwen3Config, "bert": BertConfig, "t5": T5Config}


def scale_spec(family: str, size: str) -> Scale:
    """The `Scale` entry for `family` ("llama", "qwen3", "bert", "t5") at `size` (e.g. "13b")."""
    if family not in SCALES:
        raise ValueError(f"no published shapes for family {family!r}; choose from {sorted(SCALES)}")
    if size not in SCALES[family]:
        raise ValueError(f"unknown {family} size {size!r}; choose from {list(SCALES[family])}")
    return SCALES[family][size]


def scale_config(family: str, size: str, recommender: bool = False) -> PretrainedConfig:
    """The real transformers config of a published model.

    recommender: drop the token vocabulary (2 stub rows, as the small presets have) and the BOS/EOS
        ids, for a backbone fed with item embeddings through `inputs_embeds`.
    """
    hparams = scale_spec(family, size).hparams  # checks the names before the config class is looked up
    config = _CONFIG_CLASSES[family](**hparams)
    config._attn_implementation = "sdpa"  # as the presets: fused attention, no stored score matrix
    return _recommender_config(config) if recommender else config


def _recommender_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of `config` with the token vocabulary dropped: 2 stub rows, no BOS/EOS ids, a pad id only if
    it falls in the stub, T5 as an encoder; sdpa attention."""
    config = copy.deepcopy(config)
    config.vocab_size = 2
    config.bos_token_id = config.eos_token_id = None
    if (getattr(config, "pad_token_id", None) or 0) >= config.vocab_size:
        config.pad_token_id = None
    if config.model_type == "t5":
        config.is_encoder_decoder, config.use_cache = False, False
    config._attn_implementation = "sdpa"
    return config


def _on_meta(build):
    with torch.device("meta"):
        return build()


def meta_backbone(family: str, size: str, recommender: bool = False) -> PreTrainedModel:
    """The backbone class the recommender wraps, at the published shape, on the meta device."""
    config = scale_config(family, size, recommender)
    return _on_meta(lambda: build_backbone(config))


def meta_released(family: str, size: str) -> PreTrainedModel:
    """The whole released model (LM head, pooler or decoder included), on the meta device."""
    config = scale_config(family, size)
    return _on_meta(lambda: _released(config))


def meta_recommender(family: str, size: str, n_items: int) -> SequentialRecommender:
    """A `SequentialRecommender` on the published backbone (vocabulary dropped), on the meta device."""
    return meta_recommender_from(scale_config(family, size), n_items)


def meta_recommender_from(config: PretrainedConfig, n_items: int) -> SequentialRecommender:
    """`meta_recommender` of any config (published or `load_shape`)."""
    rec = _recommender_config(config)
    return _on_meta(lambda: SequentialRecommender(build_backbone(rec), n_items))


def _released(config: PretrainedConfig) -> PreTrainedModel:
    """The whole released model of a config: BertModel with its pooler, T5 with its decoder, a decoder LM
    with its head."""
    if config.model_type == "bert":
        return BertModel(config, add_pooling_layer=True)
    if config.model_type == "t5":
        return T5ForConditionalGeneration(config)
    return AutoModelForCausalLM.from_config(config)


# --- any local shape: a Hugging Face directory or its config.json ------------------------------------------
def load_shape(path: str | Path) -> PretrainedConfig:
    """The config of a local model, read from a Hugging Face directory or a config.json (no weights are
    read, no remote code runs). A multimodal config (Gemma 3's) gives its text model's config.

    Raises:
        FileNotFoundError: nothing at `path`, or a directory without config.json.
        ValueError: a config.json that is not JSON, or a model_type no family supports.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no model config at {path}: give a Hugging Face model directory or its config.json")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: give a Hugging Face model directory or its config.json")
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not a JSON config: {error}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{file} has no model_type: it is not a transformers config.json")
    config = AutoConfig.for_model(**raw).get_text_config()
    family_of(config)  # names the supported model types if this one is not
    return config


def meta_shape(config: PretrainedConfig, n_items: int) -> dict[str, nn.Module]:
    """{"backbone", "released", "recommender"} of a config (published or `load_shape`), on the meta device."""
    return {"backbone": _on_meta(lambda: build_backbone(config)), "released": _on_meta(lambda: _released(config)),
            "recommender": meta_recommender_from(config, n_items)}


def numel(module: nn.Module) -> int:
    """Parameters of a module; shared (tied) parameters count once."""
    return sum(p.numel() for p in module.parameters())


def _tables(model: nn.Module) -> int:
    """Token tables: the input embedding plus an output head that is not tied to it."""
    tables = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(),
                                                       model.get_output_embeddings()) if m is not None}
    return sum(tables.values())


def _breakdown(total: int, embedding: int, layers: nn.ModuleList) -> dict[str, int]:
    # Every layer of these models has one shape; T5's block-0 relative position bias is "other".
    per_layer = numel(layers[-1])
    return {"total": total, "embedding": embedding, "per_layer": per_layer,
            "layers": per_layer * len(layers), "other": total - embedding - per_layer * len(layers)}


def count_parameters(family: str, size: str, n_items: int = 10_000) -> dict[str, Any]:
    """Parameter counts of a published model, built on the meta device (no memory).

    Returns:
        {"name", "family", "size", "n_layers", "hidden",
         "total", "embedding", "per_layer", "layers", "other": the backbone as published (token table
            included; embedding = the token table; other = norms, position tables, T5's position bias),
         "released": {"class", "total", "embedding", "non_embedding", "references", "source"}: the whole
            released model, the figures model cards quote (embedding = input table + untied LM head),
         "recommender": {"n_items", "total", "embedding", "per_layer", "layers", "other"}: the backbone
            with the token table dropped plus the item table and bias (embedding = item table + bias +
            the 2-row stub)}.
    """
    spec = scale_spec(family, size)
    models = meta_shape(scale_config(family, size), n_items)
    return _counts(spec.name, family, size, models, n_items, dict(spec.references), spec.source)


def count_shape(config: PretrainedConfig, n_items: int = 10_000, name: str = "") -> dict[str, Any]:
    """`count_parameters` for any supported shape given by its config (`load_shape`); size is "custom"
    and there are no published references."""
    family = family_of(config).name
    return _counts(name or getattr(config, "_name_or_path", "") or f"custom {family}", family, "custom",
                   meta_shape(config, n_items), n_items, {}, "the config's own shape")


def _counts(name: str, family: str, size: str, models: dict[str, nn.Module], n_items: int,
            references: dict[str, float], source: str) -> dict[str, Any]:
    backbone, released, recommender = models["backbone"], models["released"], models["recommender"]
    released_total, released_tables = numel(released), _tables(released)
    item_tables = numel(recommender.item_embedding) + recommender.item_bias.numel()
    return {
        "name": name, "family": family, "size": size, "n_layers": len(FAMILIES[family].layers(backbone)),
        "hidden": recommender.hidden_size,
        **_breakdown(numel(backbone), _tables(backbone), FAMILIES[family].layers(backbone)),
        "released": {"class": type(released).__name__, "total": released_total, "embedding": released_tables,
                     "non_embedding": released_total - released_tables,
                     "references": references, "source": source},
        "recommender": {"n_items": n_items, **_breakdown(
            numel(recommender), item_tables + _tables(recommender.backbone), recommender.layers)},
    }
