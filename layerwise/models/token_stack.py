"""A plain decoder LM's layer stack on text, for the forward-only importance estimators.

`layerwise.compression.tracing.trace_layers` (and so `compute_importance` and the sharded version in
`orchestration.distributed.shards`) reads a model through a small contract: `layers`, `n_layers`,
`family`, `backbone` and `encode(inputs) -> (B, T, H)`, with 0 marking padding. `TokenStack` gives a
stock transformers decoder (Qwen2Model, LlamaModel, ...) that contract, so layer importance can be
measured on the LM's own text instead of through a recommender. Token ids travel shifted by one
(`t + 1`), because id 0 is a real token in most vocabularies and 0 means padding here.

Only the forward estimators apply (`TEXT_METHODS`): the gradient ones need a loss over item targets.

    stack = TokenStack(AutoModel.from_pretrained(directory))
    batches = text_batches(tokenizer, ["Toy Story", "GoldenEye"], batch_size=2, max_tokens=16)
    scores = compute_importance(stack, batches, TEXT_METHODS)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from transformers import PreTrainedModel

from layerwise.models.families import Family, family_of

TEXT_METHODS = ("block_influence", "angular", "activation")


class TokenStack(nn.Module):
    """A decoder backbone (no LM head) seen as the tracing contract's model.

    Args:
        backbone: a transformers base model of a causal family (Qwen2Model, LlamaModel, Qwen3Model, ...).
    """

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone
        self.family: Family = family_of(backbone.config)
        if not self.family.causal:
            raise ValueError(f"TokenStack needs a decoder LM; {self.family.name} is bidirectional")

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.backbone)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def encode(self, inputs: Tensor) -> Tensor:
        """inputs: (B, T) token ids + 1, 0 = padding (right-padded) -> (B, T, H) final hidden states."""
        mask = inputs != 0
        ids = (inputs - 1).clamp(min=0)
        return self.backbone(input_ids=ids, attention_mask=mask.long(), use_cache=False).last_hidden_state


def text_batches(tokenizer, texts: list[str], batch_size: int, max_tokens: int) -> list[tuple[Tensor, Tensor]]:
    """Texts as `(inputs, targets)` calibration pairs for a `TokenStack`, in order, empty texts skipped.

    Each batch is (B, T) token ids + 1, right-padded with 0, at most `max_tokens` tokens per text. The
    targets equal the inputs: the forward estimators only read which rows and positions are real.
    """
    texts = [t for t in texts if t]
    batches = []
    for start in range(0, len(texts), batch_size):
        rows = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts[start:start + batch_size]]
        inputs = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        for i, ids in enumerate(rows):
            inputs[i, :len(ids)] = torch.as_tensor(ids) + 1
        batches.append((inputs, inputs.clone()))
    return batches
