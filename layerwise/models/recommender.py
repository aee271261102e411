"""`SequentialRecommender`: next-item recommendation on any supported transformer backbone.

A history of item indices (left-padded, 0 = padding) becomes item embeddings, optionally plus a frozen
text embedding of each item projected to the hidden size. The sequence runs through the backbone's own
layer stack via `inputs_embeds`; the hidden state at the prediction position is scored against every
item embedding (tied weights) plus a per-item bias: by dot product ("dot"), or by cosine similarity times
a learned temperature ("cos"), which keeps the scores bounded whatever the size of the final hidden
states (a pretrained LLM's are large: norms of 40 and more at initialisation).

Decoder families are causal and predict the next item at every position. Encoder families (BERT, T5)
are bidirectional: training masks random positions (cloze, as BERT4Rec) and inference appends a mask
slot at the end and predicts there.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
from transformers import PreTrainedModel

from layerwise.data.batching import trim_left
from layerwise.models.families import Family, family_of


HEADS = ("dot", "cos")
COS_TEMPERATURE = 16.0  # the cosine head's initial scale: a softmax over items that is neither flat nor peaked


class SequentialRecommender(nn.Module):
    """A transformer backbone wrapped as a next-item recommender.

    Args:
        backbone: a real transformers model (LlamaModel, Qwen3Model, GPT2Model, BertModel, T5EncoderModel).
        n_items: catalogue size; item indices are 1..n_items, 0 is padding, n_items + 1 is the mask slot.
        text_embeddings: optional frozen (n_items + 1, text_dim) features of each item (title, genres).
        dropout: dropout on the input embeddings.
        input_norm: if set, every input item vector is rescaled to this L2 norm before the layers (a
            pretrained LLM's layers then see inputs at the norm of its own token embeddings, however
            the item vectors drift in training); the scores use the vectors as they are.
    """

    def __init__(self, backbone: PreTrainedModel, n_items: int,
                 text_embeddings: torch.Tensor | None = None, dropout: float = 0.1,
                 input_norm: float | None = None, head: str = "dot"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
        self.input_norm = input_norm
        self.head_kind = head
        self.backbone = backbone
        self.family: Family = family_of(backbone.config)
        self.n_items = n_items
        hidden = self.hidden_size
        self.item_embedding = nn.Embedding(n_items + 2, hidden, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        if head == "cos":
            # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which a
            # 0-dim tensor cannot give, so a cosine model could not train or heal on Ray Train.
            self.log_temperature = nn.Parameter(torch.full((1,), math.log(COS_TEMPERATURE)))
        self.dropout = nn.Dropout(dropout)
        self.text_projection: nn.Linear | None = None
        # Modules hooked onto the layers from outside (a compact model's bridge adapters) sit here, so that
        # they move, train, save and load with the model. A teacher has none.
        self.bridges = nn.ModuleDict()
        if text_embeddings is not None:
            if text_embeddings.shape[0] != n_items + 1:
                raise ValueError(f"text_embeddings has {text_embeddings.shape[0]} rows, expected {n_items + 1}")
            self.register_buffer("text_embeddings", text_embeddings.float().clone())
            self.text_projection = nn.Linear(text_embeddings.shape[1], hidden, bias=False)
            nn.init.zeros_(self.text_projection.weight)

    # --- structure -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        config = self.backbone.config
        return getattr(config, "hidden_size", None) or config.d_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.backbone)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def causal(self) -> bool:
        """Predicts the next item at every position: decoder families, and a BERT loaded as a decoder
        (`is_decoder`, a causal mask; see models.presets.load_backbone). Encoders train by cloze instead."""
        return self.family.causal or bool(getattr(self.backbone.config, "is_decoder", False))

    @property
    def mask_index(self) -> int:
        return self.n_items + 1

    # --- the parts before and after the layers ---------------------------------------------------
    def item_vectors(self) -> torch.Tensor:
        """Item representations (n_items + 2, H): learned embedding plus projected text features."""
        weight = self.item_embedding.weight
        if self.text_projection is not None:
            text = self.text_projection(self.text_embeddings)
            weight = weight + torch.cat([text, text.new_zeros(1, text.shape[1])], dim=0)
        return weight

    def prepare(self, histories: torch.Tensor) -> torch.Tensor:
        """Inference input: encoders drop the oldest slot and append the mask slot to predict at.

        histories: (B, T) left-padded item indices -> (B, T) model input.
        """
        if self.causal:
            return histories
        mask = torch.full_like(histories[:, :1], self.mask_index)
        return torch.cat([histories[:, 1:], mask], dim=1)

    def embed(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs: (B, T) indices -> (inputs_embeds (B, T, H), attention_mask (B, T)), on the model's
        device (a batch read on the host moves there; on the same device it is the tensor itself)."""
        inputs = inputs.to(self.item_embedding.weight.device)
        embeds = nn.functional.embedding(inputs, self.item_vectors(), padding_idx=0)
        if self.input_norm is not None:
            embeds = nn.functional.normalize(embeds, dim=-1) * self.input_norm  # padding stays zero
        return self.dropout(embeds), (inputs != 0).long()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., H) -> scores (..., n_items + 1) in float32; column 0 (padding) is -inf."""
        scores = self.item_scores(hidden, self.item_vectors()[: self.n_items + 1], self.item_bias)
        scores[..., 0] = float("-inf")
        return scores

    def item_scores(self, hidden: torch.Tensor, items: torch.Tensor, bias: torch.Tensor,
                    paired: bool = False) -> torch.Tensor:
        """Scores of items, in float32 (or wider) even under autocast: in bf16 (8 bits of mantissa) nearby
        scores tie, and ties count against the target in the ranking metrics.

        hidden: (..., H), items: (n, H), bias: (n,) -> (..., n). paired: hidden (N, H) with items (N, H)
        and bias (N,), row i scored against item i only -> (N,).
        """
        with torch.autocast(hidden.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(hidden.dtype, items.dtype), torch.float32)
            hidden, items = hidden.to(dtype), items.to(dtype)  # float32 at least (a float64 model stays so)
            if self.head_kind == "cos":
                hidden, items = nn.functional.normalize(hidden, dim=-1), nn.functional.normalize(items, dim=-1)
            scores = (hidden * items).sum(-1) if paired else hidden @ items.T
            if self.head_kind == "cos":
                scores = self.log_temperature.exp() * scores
            return scores + bias

    # --- forward passes --------------------------------------------------------------------------
    def encode(self, inputs: torch.Tensor, start: int = 0) -> torch.Tensor:
        """inputs: (B, T) model input indices -> final hidden states (B, T, H).

        `start`: the index of the first column in the full window when leading padding columns were cut
        (layerwise.data.batching.trim_left). The kept columns get the position ids they had in the full window,
        so the result equals the full window's at those columns (up to float rounding).
        """
        embeds, attention_mask = self.embed(inputs)
        extra = {}
        # A backbone without position ids (T5: relative buckets of distances, which cutting keeps) needs none.
        if start and "position_ids" in inspect.signature(self.backbone.forward).parameters:
            positions = torch.arange(start, start + inputs.shape[1], device=inputs.device)
            extra["position_ids"] = positions.unsqueeze(0).expand(inputs.shape[0], -1)
        out = self.backbone(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, **extra)
        return out.last_hidden_state

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Training logits at every position. inputs: (B, T) -> (B, T, n_items + 1)."""
        return self.head(self.encode(inputs))

    def score(self, histories: torch.Tensor) -> torch.Tensor:
        """Scores of every item as the next one. histories: (B, T) left-padded -> (B, n_items + 1).

        Columns that are padding in every row are cut first (exact, see `encode`): a batch of short
        histories costs what its longest history costs, not T.
        """
        start, inputs = trim_left(self.prepare(histories.to(self.item_embedding.weight.device)))
        hidden = self.encode(inputs, start=start)
        return self.head(hidden[:, -1])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_temperature"
        if key in state_dict and state_dict[key].dim() == 0:  # saved while it was a 0-dim scalar
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
