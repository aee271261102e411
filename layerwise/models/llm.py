"""Pretrained decoder LLMs as sequential recommenders: the E4SRec / SLMRec setting.

The LLM's layers are the sequence model. Item ids get their own vectors in the LLM's hidden size, fed
through `inputs_embeds` (causal, the next item at every position); scores are dot products with the
same item vectors, so the LM head is never used. `apply_llm_setup` turns a `SequentialRecommender` on a
pretrained backbone into that recommender:

- item vectors start at random or from the LLM itself, for data with titles: the mean of its last
  hidden states over an item's title tokens ("title_hidden"), or the mean of the title's token
  embeddings ("title_tokens"); then either centred and scaled to a chosen std, by default the std of the
  LLM's own token embeddings (as its embedding module outputs them: Gemma's sqrt(H) factor included),
  or each one rescaled to the token embeddings' mean row norm (`item_scale="row_norm"`), because the
  pretrained layers were trained on inputs of that size;
- optionally every input vector is rescaled to the token embeddings' mean norm (`input_norm`);
- the first `n_layers` pretrained layers can be kept, the rest dropped before training;
- `layer_init="random"` re-initialises the layers (the same architecture without its pretraining,
  the item vectors still from the LLM's titles): the control that says what the pretraining is worth;
- LoRA (peft) on every projection of the layers, full fine-tuning, or frozen layers;
- the token table is cut to a 2-row stub afterwards (a recommender never reads it; Gemma 3 270M's is
  168M of its 268M parameters), and gradient checkpointing is a switch.

    model = build_recommender(data, "llama", pretrained="smollm2-135m",
                              llm=LLMSetup(item_init="title_hidden", lora_rank=16))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from layerwise.models.lora import add_lora
from layerwise.models.recommender import SequentialRecommender

ITEM_INITS = ("random", "title_hidden", "title_tokens")
ITEM_SCALES = ("std", "row_norm")
LAYER_INITS = ("pretrained", "random")
FINETUNES = ("lora", "full", "frozen")
INPUT_NORMS = ("none", "token")


@dataclass(frozen=True)
class LLMSetup:
    """How a pretrained LLM becomes a recommender (every choice is recorded with the run).

    Attributes:
        finetune: "lora" (adapters on the layers; items and bias train fully), "full" or "frozen".
        lora_rank: LoRA rank r (alpha = 2r) on q, k, v, o, gate, up and down projections.
        n_layers: keep only the first n pretrained layers; None keeps all.
        item_init: "random", "title_hidden" or "title_tokens" (see the module docstring).
        item_std: std of the initial item vectors; None matches the LLM's token embeddings.
        item_scale: "std" (centre over the items, then scale to `item_std`) or "row_norm" (rescale each
            vector to the token embeddings' mean L2 norm, not centred; `item_std` then unused).
        input_norm: "none", or "token": rescale every input item vector to the token embeddings'
            mean L2 norm.
        gradient_checkpointing: recompute each layer's activations in the backward pass.
        keep_token_table: keep the LLM's token table (normally cut to 2 rows after initialisation).
        layer_init: "pretrained", or "random": the layers start from the architecture's own random
            initialisation (after the item vectors were taken from the pretrained LLM).
    """

    finetune: str = "lora"
    lora_rank: int = 16
    n_layers: int | None = None
    item_init: str = "random"
    item_std: float | None = None
    input_norm: str = "none"
    gradient_checkpointing: bool = False
    keep_token_table: bool = False
    item_scale: str = "std"
    layer_init: str = "pretrained"

    def __post_init__(self):
        choices = [(self.finetune, FINETUNES, "finetune"), (self.item_init, ITEM_INITS, "item_init"),
                   (self.input_norm, INPUT_NORMS, "input_norm"), (self.item_scale, ITEM_SCALES, "item_scale"),
                   (self.layer_init, LAYER_INITS, "layer_init")]
        for value, allowed, what in choices:
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")


@torch.no_grad()
def token_embedding_stats(backbone: nn.Module, n_sample: int = 8192) -> dict[str, float]:
    """{"std", "row_norm"} of the LLM's token embeddings as its embedding module outputs them.

    Rows are sampled evenly over the vocabulary (special tokens at either end excluded).
    """
    table = backbone.get_input_embeddings()
    vocab = table.weight.shape[0]
    ids = torch.linspace(min(100, vocab - 1), vocab - 1, min(n_sample, vocab)).long().unique()
    rows = table(ids).float()
    return {"std": rows.std().item(), "row_norm": rows.norm(dim=-1).mean().item()}


@torch.inference_mode()
def encode_item_texts(backbone: nn.Module, tokenizer, texts: list[str], mode: str = "title_hidden",
                      batch_size: int = 32, max_tokens: int = 32,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """One vector per text from the LLM itself. texts: n strings -> (n, H) float32; "" -> zeros.

    mode: "title_hidden" averages the final hidden states (after the final norm) over the text's
    tokens; "title_tokens" averages its token embeddings. Padding never enters the mean.
    progress: called with (done, total) after each batch.
    """
    if mode not in ("title_hidden", "title_tokens"):
        raise ValueError(f"unknown text encoding {mode!r}; choose title_hidden or title_tokens")
    hidden = backbone.config.hidden_size
    out = torch.zeros(len(texts), hidden)
    real = [i for i, t in enumerate(texts) if t]
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(real), batch_size):
        rows = real[start:start + batch_size]
        tokens = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=max_tokens,
                           return_tensors="pt")
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        if mode == "title_hidden":
            states = backbone(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                              use_cache=False).last_hidden_state
        else:
            states = backbone.get_input_embeddings()(tokens["input_ids"])
        out[rows] = ((states.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0))
        if progress:
            progress(min(start + batch_size, len(real)), len(real))
    return out


def row_scaled_item_vectors(vectors: torch.Tensor, norm: float) -> torch.Tensor:
    """Rescale every item's vector to L2 norm `norm` (not centred). vectors: (n_items + 1, H).

    Row 0 (padding) stays zero; an item without text gets a random direction at that norm.
    """
    out = vectors.clone()
    rows = out[1:]
    empty = rows.abs().sum(-1) == 0
    rows[empty] = torch.randn(int(empty.sum()), rows.shape[1])
    out[1:] = nn.functional.normalize(rows, dim=-1) * norm
    out[0] = 0.0
    return out


def scaled_item_vectors(vectors: torch.Tensor, std: float) -> torch.Tensor:
    """Centre text vectors over the real items and scale them to `std`. vectors: (n_items + 1, H).

    Centring removes what every title shares (the LLM's large constant directions), which carries no
    information about which item is which; row 0 (padding) stays zero.
    """
    rows = vectors[1:]
    has_text = rows.abs().sum(-1) > 0
    if not has_text.any():
        raise ValueError("no item has text: nothing to initialise the item vectors from")
    centred = rows - rows[has_text].mean(0)
    centred[~has_text] = torch.randn(int((~has_text).sum()), rows.shape[1]) * centred[has_text].std()
    out = torch.zeros_like(vectors)
    out[1:] = centred * (std / centred.std().clamp(min=1e-12))
    return out


def apply_llm_setup(model: SequentialRecommender, setup: LLMSetup, item_texts: list[str] | None = None,
                    tokenizer_dir: str | Path | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Make `model` (a SequentialRecommender on a pretrained decoder) the LLM recommender `setup` says.

    item_texts: one string per item index (index 0 = padding, ""), needed for the title inits.
    tokenizer_dir: where the LLM's tokenizer is (the pretrained directory).
    Returns what was done: the setup, the token-embedding stats, the item std used, trainable counts.
    """
    if not model.causal:
        raise ValueError("the LLM recommender needs a decoder backbone (llama, qwen2, qwen3, gemma3, gpt2)")
    stats = token_embedding_stats(model.backbone)
    std = setup.item_std if setup.item_std is not None else stats["std"]
    vectors = _item_init(model, setup, item_texts, tokenizer_dir, std, progress)
    if setup.item_scale == "row_norm":
        vectors = row_scaled_item_vectors(vectors, stats["row_norm"])
    elif setup.item_init != "random":
        vectors = scaled_item_vectors(vectors, std)
    if setup.layer_init == "random":
        _reinitialise_layers(model.backbone)
    if setup.n_layers is not None:
        model.family.keep_layers(model.backbone, list(range(setup.n_layers)))
    with torch.no_grad():
        model.item_embedding.weight[: model.n_items + 1] = vectors
        model.item_embedding.weight[model.n_items + 1].normal_(0.0, std)  # the (unused) mask slot
    model.input_norm = stats["row_norm"] if setup.input_norm == "token" else None
    if not setup.keep_token_table:
        drop_token_table(model.backbone)
    _set_trainable(model, setup)
    if setup.gradient_checkpointing:
        set_checkpointing(model.backbone)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"setup": asdict(setup), "token_std": stats["std"], "token_row_norm": stats["row_norm"],
            "item_std": std, "input_norm": model.input_norm, "trainable_parameters": trainable,
            "parameters": sum(p.numel() for p in model.parameters())}


def _reinitialise_layers(backbone: nn.Module) -> None:
    # transformers skips modules that from_pretrained marked initialised, so `_init_weights` on the loaded
    # model would leave the pretrained weights; a fresh model from the same config draws new ones.
    from layerwise.models.presets import build_backbone

    fresh = build_backbone(backbone.config).state_dict()
    table = backbone.get_input_embeddings().weight
    with torch.no_grad():
        for name, tensor in backbone.state_dict().items():
            if tensor is not table:  # the token table is no layer (and titles were read through it)
                tensor.copy_(fresh[name])


def _item_init(model, setup, item_texts, tokenizer_dir, std, progress) -> torch.Tensor:
    """Unscaled item vectors (n_items + 1, H): random at `std`, or each title's mean encoding."""
    n = model.n_items + 1
    if setup.item_init == "random":
        vectors = torch.randn(n, model.hidden_size) * std
        vectors[0] = 0.0
        return vectors
    if not item_texts or not any(item_texts):
        raise ValueError(f"item_init={setup.item_init!r} needs item titles; this data set has none")
    if len(item_texts) != n:
        raise ValueError(f"{len(item_texts)} item texts for {n} item indices (padding included)")
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"item_init={setup.item_init!r} needs the LLM's tokenizer; "
                                f"{tokenizer_dir} has no tokenizer_config.json")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    was_training = model.backbone.training
    model.backbone.eval()
    text = encode_item_texts(model.backbone, tokenizer, list(item_texts), setup.item_init, progress=progress)
    model.backbone.train(was_training)
    return text


def drop_token_table(backbone: nn.Module) -> None:
    """Cut the token table to a 2-row stub (as the small presets have): inputs come as embeddings.

    The config follows (vocab_size 2, pad 0, no BOS/EOS/UNK ids) so a saved backbone reloads stock.
    """
    table = backbone.get_input_embeddings()
    table.weight = nn.Parameter(table.weight.data[:2].clone(), requires_grad=table.weight.requires_grad)
    table.num_embeddings, table.padding_idx = 2, 0
    config = backbone.config
    config.vocab_size, config.pad_token_id = 2, 0
    for key in ("bos_token_id", "eos_token_id", "unk_token_id"):  # ids past a 2-row table mean nothing
        if getattr(config, key, None) is not None:
            setattr(config, key, None)


def set_checkpointing(backbone: nn.Module, enabled: bool = True) -> None:
    """Recompute every layer's activations in the backward pass instead of storing them (in training
    mode only): less memory for a longer backward. `enabled=False` stores them again."""
    # transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_*; older 5.x lack it.
    if hasattr(backbone, "activation_checkpointing_enable"):
        backbone.activation_checkpointing_enable() if enabled else backbone.activation_checkpointing_disable()
    elif enabled:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_disable()


def _set_trainable(model: SequentialRecommender, setup: LLMSetup) -> None:
    model.requires_grad_(True)
    if setup.finetune == "full":
        return
    model.backbone.requires_grad_(False)
    if setup.finetune == "lora":
        add_lora(model, setup.lora_rank)


@torch.no_grad()
def layer_state_norms(model: SequentialRecommender, embeds: torch.Tensor,
                      attention_mask: torch.Tensor) -> dict[str, list[float]]:
    """Size of the residual stream at the input and after each layer, over real positions.

    embeds: (B, T, H) inputs_embeds; attention_mask: (B, T), 1 = real. Returns lists of L + 1 values:
    "mean_norm" and "median_norm" (L2 norm per position), "max_abs" (largest entry). The "massive
    activations" of LLMs sit at a few positions: they lift the mean and the max far above the median.
    The final norm is not included.
    """
    states: list[torch.Tensor] = [embeds]
    hooks = [layer.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.layers]
    try:
        model.backbone(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    real = attention_mask.bool()
    norms = [s[real].float().norm(dim=-1) for s in states]
    return {"mean_norm": [n.mean().item() for n in norms], "median_norm": [n.median().item() for n in norms],
            "max_abs": [s[real].float().abs().max().item() for s in states]}
