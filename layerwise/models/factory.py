"""Build a fresh recommender for a data set from a preset or a pretrained backbone (name, GGUF or dir)."""

from __future__ import annotations

import torch

from layerwise.models.presets import build_backbone, check_causal, load_backbone, preset_config
from layerwise.models.recommender import SequentialRecommender


def build_recommender(data, family: str, preset: str = "small", pretrained: str | None = None,
                      text_features: bool = False, max_len: int = 50, dropout: float | None = None,
                      seed: int = 0, text_encoder: str | None = None, causal: bool = False,
                      llm=None, head: str = "dot") -> SequentialRecommender:
    """A randomly initialised (or pretrained-backbone) recommender sized for `data`'s catalogue.

    With `pretrained` (a local Hugging Face directory, a GGUF file, a known model name such as
    "smollm2-135m", or "minilm" for the bundled all-MiniLM-L6-v2), the family comes from the
    checkpoint's config and `family`/`preset` are ignored. `causal` makes a BERT a decoder (causal mask,
    next item at every position): cloze training of an encoder learns from only the masked ~20% of
    positions and needs many times more epochs. `llm` (a layerwise.models.llm.LLMSetup) makes a
    pretrained decoder the LLM recommender (item vectors from titles, LoRA or full fine-tuning, the
    first n layers kept); what it did is left in `model.llm_info`. A pretrained decoder LLM always
    becomes one (with the default LLMSetup when `llm` is None): left as it is, its 0.02-scale random
    items and unused token table would make a poor recommender. `head` is "dot" or "cos" (see
    SequentialRecommender).
    """
    torch.manual_seed(seed)
    drop = 0.1 if dropout is None else dropout
    if pretrained == "minilm":
        from layerwise.models.text import default_text_encoder

        pretrained = str(default_text_encoder())
    if pretrained:
        from layerwise.models.pretrained import resolve_pretrained

        pretrained = str(resolve_pretrained(pretrained))
        backbone = load_backbone(pretrained, causal=causal)
    else:
        check_causal(family, causal)
        extra = {"is_decoder": True} if causal and family == "bert" else {}
        backbone = build_backbone(preset_config(family, preset, max_len=max_len, dropout=drop, **extra))
    text = None
    if text_features:
        from layerwise.models.text import encode_texts

        if not data.item_text:
            raise ValueError(f"data set {data.name!r} has no item titles or genres for text features")
        text = encode_texts(list(data.item_text), text_encoder)
    model = SequentialRecommender(backbone, data.n_items, text_embeddings=text, dropout=drop, head=head)
    if llm is None and pretrained and model.family.causal:
        from layerwise.models.llm import LLMSetup

        llm = LLMSetup()
    if llm is not None:
        from layerwise.models.llm import apply_llm_setup

        if not pretrained:
            raise ValueError("an LLM setup needs a pretrained backbone "
                             "(pretrained=NAME, a GGUF file or a directory)")
        model.llm_info = apply_llm_setup(model, llm, data.item_text, tokenizer_dir=pretrained)
    return model
