"""Backbone presets: real `transformers` configs at tiny, small and published shapes.

`tiny` presets (2 layers, 32 wide) keep unit tests under a second. `small` is the main job's teacher.
The big shapes (1B-13B) follow the published configs and are only ever built on the meta device for
planning on this machine (see `layerwise plan`).
"""

from __future__ import annotations

from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    Gemma3TextConfig,
    Gemma3TextModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2Model,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

# Width, depth and heads per preset size, shared across families so "small" means the same budget.
_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 32, "layers": 2, "heads": 2, "ffn": 64},
    "small": {"hidden": 64, "layers": 8, "heads": 2, "ffn": 256},
    "base": {"hidden": 256, "layers": 12, "heads": 4, "ffn": 1024},
}


def _llama(s: dict[str, int], max_len: int, dropout: float) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=2, hidden_size=s["hidden"], intermediate_size=s["ffn"], bos_token_id=None, eos_token_id=None,
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"], max_position_embeddings=max_len + 1,
        attention_dropout=dropout, pad_token_id=0, tie_word_embeddings=False,
    )


def _qwen3(s: dict[str, int], max_len: int, dropout: float) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=2, hidden_size=s["hidden"], intermediate_size=s["ffn"], bos_token_id=None, eos_token_id=None,
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"], head_dim=s["hidden"] // s["heads"],
        max_position_embeddings=max_len + 1, attention_dropout=dropout, pad_token_id=0,
        tie_word_embeddings=False,
    )


def _qwen2(s: dict[str, int], max_len: int, dropout: float) -> Qwen2Config:
    # Qwen2/2.5 attend fully in every layer by default (use_sliding_window False): layer_types says so.
    return Qwen2Config(
        vocab_size=2, hidden_size=s["hidden"], intermediate_size=s["ffn"], bos_token_id=None, eos_token_id=None,
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        max_position_embeddings=max_len + 1, max_window_layers=s["layers"], attention_dropout=dropout,
        pad_token_id=0, tie_word_embeddings=False,
    )


def _gemma3(s: dict[str, int], max_len: int, dropout: float) -> Gemma3TextConfig:
    # A sliding window shorter than the history, and sliding/full layers alternating, so the tiny
    # model exercises both attention types (the released 270M has 5 sliding layers per full one).
    heads = s["heads"]
    return Gemma3TextConfig(
        vocab_size=2, hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=s["hidden"] // heads,
        query_pre_attn_scalar=s["hidden"] // heads, max_position_embeddings=max_len + 1,
        sliding_window=max(2, max_len // 4), layer_types=gemma3_layer_types(s["layers"], 2),
        attention_dropout=dropout, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False,
    )


def gemma3_layer_types(n_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's attention pattern: every `pattern`-th layer attends fully, the others in a window."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


def _gpt2(s: dict[str, int], max_len: int, dropout: float) -> GPT2Config:
    return GPT2Config(
        vocab_size=2, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], bos_token_id=None, eos_token_id=None,
        n_inner=s["ffn"], n_positions=max_len + 1, resid_pdrop=dropout, embd_pdrop=dropout,
        attn_pdrop=dropout,
    )


def _bert(s: dict[str, int], max_len: int, dropout: float) -> BertConfig:
    return BertConfig(
        vocab_size=2, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=s["ffn"],
        max_position_embeddings=max_len + 1, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, type_vocab_size=1, pad_token_id=0,
    )


def _t5(s: dict[str, int], max_len: int, dropout: float) -> T5Config:
    return T5Config(
        vocab_size=2, d_model=s["hidden"], d_kv=s["hidden"] // s["heads"], d_ff=s["ffn"],
        num_layers=s["layers"], num_decoder_layers=0, num_heads=s["heads"],
        dropout_rate=dropout, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        use_cache=False, pad_token_id=0,
    )


_CONFIGS = {"llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3, "gpt2": _gpt2,
            "bert": _bert, "t5": _t5}
_MODELS = {"llama": LlamaModel, "qwen2": Qwen2Model, "qwen3": Qwen3Model, "gemma3": Gemma3TextModel,
           "gpt2": GPT2Model, "t5": T5EncoderModel}


def preset_config(family: str, preset: str, max_len: int = 50, dropout: float = 0.1,
                  n_layers: int | None = None, hidden: int | None = None,
                  **overrides: Any) -> PretrainedConfig:
    """A real transformers config for `family` at size `preset` (tiny, small, base).

    n_layers, hidden: change the preset's depth or width before the config is built, so per-layer
    fields (Qwen's layer_types) come out the right length. `overrides` are other config attributes.
    """
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(_CONFIGS)}")
    if preset not in _SHAPES:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(_SHAPES)}")
    shape = dict(_SHAPES[preset])
    if n_layers is not None:
        shape["layers"] = n_layers
    if hidden is not None:
        shape["hidden"], shape["ffn"] = hidden, hidden * shape["ffn"] // shape["hidden"]
    config = _CONFIGS[family](shape, max_len, dropout)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    _resize_layer_types(config, family, overrides)
    # The recommender feeds `inputs_embeds`; token ids for BOS/EOS mean nothing here.
    config.bos_token_id = config.eos_token_id = None
    config._attn_implementation = "sdpa"
    return config


def _resize_layer_types(config: PretrainedConfig, family: str, overrides: dict[str, Any]) -> None:
    # An override of the depth leaves the per-layer list at the preset's length; the mask builder
    # indexes it by layer, so it follows the new depth (unless the caller gave one itself).
    types = getattr(config, "layer_types", None)
    if types is None or "layer_types" in overrides or len(types) == config.num_hidden_layers:
        return
    n = config.num_hidden_layers
    config.layer_types = gemma3_layer_types(n, 2) if family == "gemma3" else ["full_attention"] * n
    if family == "qwen2":
        config.max_window_layers = n


def build_backbone(config: PretrainedConfig) -> PreTrainedModel:
    """Instantiate the real transformers backbone for a config, randomly initialised."""
    if config.model_type == "bert":
        return BertModel(config, add_pooling_layer=False)
    for family, cls in _MODELS.items():
        if cls.config_class.model_type == config.model_type:
            return cls(config)
    return AutoModel.from_config(config)


def load_backbone(path: str, causal: bool = False) -> PreTrainedModel:
    """Load a local pretrained backbone (e.g. all-MiniLM-L6-v2) with stock transformers, no remote code.

    causal: load a BERT as a decoder (`is_decoder=True`: the same weights under a causal mask), so it
    learns the next item at every position instead of by cloze; decoders are causal already. A causal
    BERT saved by `layerwise` reloads causal without it.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    check_causal(config.model_type, causal)
    if config.model_type == "t5":
        return T5EncoderModel.from_pretrained(path)
    if config.model_type == "bert":
        # The recommender never uses BERT's pooler; without it no unused (or random) weights run.
        # A saved causal BERT keeps is_decoder in its config.json; `causal` only ever switches it on.
        return BertModel.from_pretrained(path, add_pooling_layer=False, is_decoder=causal or config.is_decoder)
    return AutoModel.from_pretrained(path, trust_remote_code=False)


def check_causal(model_type: str, causal: bool) -> None:
    """Causal training is built in for decoders and a config switch for BERT; T5's encoder has none."""
    if causal and model_type == "t5":
        raise ValueError("causal training needs a decoder family or BERT (is_decoder); T5's encoder has no "
                         "causal mode, so it trains by cloze")
