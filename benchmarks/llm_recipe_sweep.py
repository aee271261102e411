"""Recipe sweep for a pretrained-LLM (SmolLM2-135M) sequential recommender on ml-100k.

Self-contained (torch, transformers, peft, numpy): it mirrors layerwise's SequentialRecommender
(item embeddings in via inputs_embeds, tied item scoring + bias, causal next-item CE at every position,
non-overlapping windows of 50) and its evaluation (full ranking, seen items excluded, ties count against
the target). Every epoch's valid and test metrics are flushed to JSON, so a killed run keeps its curve.

    python benchmarks/llm_recipe_sweep.py --weights packed.npz.xz --config config.json --data ml100k.npz \
        --recipes all --parallel 12 --out /tmp/sw

It ran on one GPU (results: benchmarks/results/llm_recipe_sweep.json). Its inputs are not in the
repository: --weights holds SmolLM2-135M's layers as the GGUF's own 4-bit blocks (dequantized exactly as
`layerwise models get smollm2-135m` does), --config the converted config.json, --data ml-100k's split as
arrays (offsets, items, n_items) with each title's mean token embedding (tok_mean), mean final hidden state
(hid_mean) and the token-embedding std (tok_std).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Recipe:
    name: str
    weights: str = "pretrained"      # pretrained | random
    n_layers: int = 30               # first n layers of the stack
    tune: str = "lora"               # lora | full | frozen
    rank: int = 16
    lr: float = 1e-3                 # backbone (or LoRA) learning rate
    item_lr: float = 1e-3
    init: str = "rand002"            # rand002 | randtok | title_tok | title_hid
    init_norm: str = "keep"          # keep | token (rescale rows to the token-embedding row norm)
    warmup: float = 0.1              # fraction of steps
    epochs: int = 15
    batch: int = 64
    dropout: float = 0.1
    weight_decay: float = 0.01
    max_len: int = 50
    patience: int = 4
    in_norm: str = "none"            # none | rms: item inputs rescaled to the token row norm every forward
    out: str = "dot"                 # dot (tied, as layerwise) | cos (cosine with a learned temperature)


def recipes() -> list[Recipe]:
    R = Recipe
    tt = dict(init="title_tok", init_norm="token")
    return [
        # LoRA on all 30 pretrained layers: the item start, input norm and head varied
        R("p30-lora16-rand002"),
        R("p30-lora16-randtok", init="randtok"),
        R("p30-lora16-titletok", **tt),
        R("p30-lora16-titlehid", init="title_hid", init_norm="token"),
        R("p30-lora16-titletok-rms", in_norm="rms", **tt),
        R("p30-lora16-titletok-cos", out="cos", **tt),
        R("p30-lora16-rand002-rms-cos", in_norm="rms", out="cos"),
        R("p30-lora64-titletok", rank=64, **tt),
        R("p30-lora16-titletok-lr3e-4", lr=3e-4, **tt),
        R("p30-lora16-titletok-lr3e-3", lr=3e-3, item_lr=3e-3, **tt),
        R("p30-frozen-titletok", tune="frozen", **tt),
        # full fine-tuning of the 30 pretrained layers
        R("p30-full-2e-4-rand002", tune="full", lr=2e-4),
        R("p30-full-1e-4-titletok", tune="full", lr=1e-4, **tt),
        R("p30-full-5e-5-titletok", tune="full", lr=5e-5, **tt),
        R("p30-full-1e-4-titletok-rms-cos", tune="full", lr=1e-4, in_norm="rms", out="cos", **tt),
        R("p30-full-1e-4-randtok", tune="full", lr=1e-4, init="randtok"),
        # the same 30-layer shape from random initialisation
        R("r30-full-1e-3-rand002", weights="random", tune="full", lr=1e-3),
        R("r30-full-3e-4-rand002", weights="random", tune="full", lr=3e-4),
        R("r30-full-3e-4-titletok", weights="random", tune="full", lr=3e-4, **tt),
        R("r30-full-3e-4-rand002-rms-cos", weights="random", tune="full", lr=3e-4, in_norm="rms", out="cos"),
        # the first 8 pretrained layers; 8 layers from scratch
        R("p8-lora16-titletok", n_layers=8, **tt),
        R("p8-full-2e-4-titletok", n_layers=8, tune="full", lr=2e-4, **tt),
        R("r8-full-1e-3-rand002", weights="random", n_layers=8, tune="full", lr=1e-3),
        R("r8-full-1e-3-titletok", weights="random", n_layers=8, tune="full", lr=1e-3, **tt),
        # a CPU-sized budget: 3 epochs, the schedule fitted to them
        R("e3-p30-lora16-titletok", epochs=3, **tt),
        R("e3-p30-full-1e-4-titletok", epochs=3, tune="full", lr=1e-4, **tt),
        R("e3-p30-full-3e-4-titletok", epochs=3, tune="full", lr=3e-4, **tt),
        R("e3-p30-lora16-titletok-rms-cos", epochs=3, in_norm="rms", out="cos", **tt),
        R("e3-r30-full-1e-3-rand002", epochs=3, weights="random", tune="full", lr=1e-3),
        # second round: the cosine head everywhere it matters
        R("p30-full-1e-4-titletok-cos", tune="full", lr=1e-4, out="cos", **tt),
        R("e3-p30-lora16-titletok-cos", epochs=3, out="cos", **tt),
        R("e5-p30-lora16-titletok-cos", epochs=5, out="cos", **tt),
        R("p8-lora16-titletok-cos", n_layers=8, out="cos", **tt),
        R("r8-full-1e-3-rand002-cos", weights="random", n_layers=8, tune="full", lr=1e-3, out="cos"),
        R("r30-full-3e-4-titletok-cos", weights="random", tune="full", lr=3e-4, out="cos", **tt),
    ]


# --- weights -------------------------------------------------------------------------------------
def load_packed(path: str) -> dict[str, torch.Tensor]:
    """Layer weights stored exactly as 4-bit blocks of 32 (nibbles, fp16 scale, fp16 min)."""
    import io

    if path.endswith(".xz"):
        with lzma.open(path) as f:
            z = np.load(io.BytesIO(f.read()))
    else:
        z = np.load(path)
    out = {}
    for key in z.files:
        kind, name = key.split(":", 1)
        if kind == "raw":
            out[name] = torch.from_numpy(z[key].astype(np.float32))
        elif kind == "q":
            packed = z[key]
            q = np.empty((packed.shape[0], 32), dtype=np.uint8)
            q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
            d = z["d:" + name].astype(np.float32)[:, None]
            m = z["m:" + name].astype(np.float32)[:, None]
            out[name] = torch.from_numpy((d * q.astype(np.float32) + m).reshape(tuple(z["s:" + name])))
    return out


def build_backbone(config_path: str, state: dict | None, n_layers: int, dropout_attn: float = 0.0):
    from transformers import LlamaConfig, LlamaModel

    raw = json.load(open(config_path))
    raw.pop("quantization_config", None)
    raw["num_hidden_layers"] = n_layers
    raw["vocab_size"] = 8  # token embeddings are unused: items come in through inputs_embeds
    config = LlamaConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
    config.attention_dropout = dropout_attn
    model = LlamaModel(config)
    if state is not None:
        wanted = {k.removeprefix("model."): v for k, v in state.items()
                  if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
        missing, unexpected = model.load_state_dict(wanted, strict=False)
        assert set(missing) == {"embed_tokens.weight"}, missing
        assert not unexpected, unexpected
    return model


class Recommender(nn.Module):
    def __init__(self, backbone, n_items: int, dropout: float, in_norm: str = "none", out: str = "dot",
                 token_norm: float = 1.0):
        super().__init__()
        self.in_norm, self.out, self.token_norm = in_norm, out, token_norm
        self.log_temperature = nn.Parameter(torch.tensor(math.log(16.0)))
        self.backbone, self.n_items = backbone, n_items
        hidden = backbone.config.hidden_size
        self.item_embedding = nn.Embedding(n_items + 2, hidden, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        self.item_bias = nn.Parameter(torch.zeros(n_items + 1))
        self.dropout = nn.Dropout(dropout)

    def encode(self, x):
        e = F.embedding(x, self.item_embedding.weight, padding_idx=0)
        if self.in_norm == "rms":
            e = e * (self.token_norm / e.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        e = self.dropout(e)
        return self.backbone(inputs_embeds=e, attention_mask=(x != 0).long(), use_cache=False).last_hidden_state

    def head(self, h):
        items = self.item_embedding.weight[: self.n_items + 1]
        if self.out == "cos":
            s = self.log_temperature.exp() * F.normalize(h, dim=-1) @ F.normalize(items, dim=-1).T + self.item_bias
        else:
            s = h @ items.T + self.item_bias
        s[..., 0] = float("-inf")
        return s


def init_items(model: Recommender, recipe: Recipe, data) -> None:
    w = model.item_embedding.weight
    n = model.n_items
    tok_std = float(data["tok_std"])
    with torch.no_grad():
        if recipe.init == "rand002":
            return
        if recipe.init == "randtok":
            w.normal_(0, tok_std)
        else:
            vec = torch.from_numpy(data["tok_mean" if recipe.init == "title_tok" else "hid_mean"].astype(np.float32))
            w[1 : n + 1] = vec[1 : n + 1]
        if recipe.init_norm == "token":
            target = tok_std * math.sqrt(w.shape[1])   # a token row's expected norm
            rows = w[1 : n + 1]
            rows.mul_(target / rows.norm(dim=1, keepdim=True).clamp(min=1e-6))
        w[0].zero_()


# --- data ----------------------------------------------------------------------------------------
def windows(offsets, items, max_len):
    ins, outs = [], []
    for u in range(len(offsets) - 1):
        seq = items[offsets[u]:offsets[u + 1]][:-2].astype(np.int64)
        src, dst = seq[:-1], seq[1:]
        for end in range(len(src), 0, -max_len):
            start = max(0, end - max_len)
            a, b = np.zeros(max_len, np.int64), np.zeros(max_len, np.int64)
            a[max_len - (end - start):], b[max_len - (end - start):] = src[start:end], dst[start:end]
            ins.append(a), outs.append(b)
    return torch.from_numpy(np.stack(ins)), torch.from_numpy(np.stack(outs))


def histories(offsets, items, stage, max_len):
    hold = 2 if stage == "valid" else 1
    n = len(offsets) - 1
    hist = np.zeros((n, max_len), np.int64)
    seen = []
    targets = np.zeros(n, np.int64)
    for u in range(n):
        seq = items[offsets[u]:offsets[u + 1]].astype(np.int64)
        h = seq[:-hold]
        targets[u] = seq[len(seq) - hold]
        tail = h[-max_len:]
        hist[u, max_len - len(tail):] = tail
        seen.append(h)
    return torch.from_numpy(hist), seen, torch.from_numpy(targets)


@torch.no_grad()
def evaluate(model, split, device, ks=(5, 10, 20)):
    hist, seen, targets = split
    model.eval()
    if not hasattr(split, "mask"):
        pass
    n_items = model.n_items
    mask = torch.zeros(len(hist), n_items + 1, dtype=torch.bool)
    for u, h in enumerate(seen):
        mask[u, torch.from_numpy(h)] = True
    mask[torch.arange(len(hist)), targets] = False
    mask[:, 0] = True
    mask = mask.to(device)
    ranks = []
    for s in range(0, len(hist), 512):
        x = hist[s:s + 512].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = model.encode(x)[:, -1]
        scores = model.head(h.float()).float().masked_fill(mask[s:s + 512], float("-inf"))
        t = targets[s:s + 512].to(device)
        target_score = scores.gather(1, t[:, None])
        ranks.append((scores >= target_score).sum(1).cpu())  # 1-based; ties count against the target
    r = torch.cat(ranks).double()
    out = {"mrr": float((1 / r).mean())}
    for k in ks:
        hit = r <= k
        out[f"hr@{k}"] = float(hit.double().mean())
        out[f"ndcg@{k}"] = float(torch.where(hit, 1 / torch.log2(r + 1), torch.zeros_like(r)).mean())
    return out


# --- one recipe ------------------------------------------------------------------------------------
def run(recipe: Recipe, args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    data = np.load(args.data)
    offsets, items, n_items = data["offsets"], data["items"], int(data["n_items"])
    state = load_packed(args.weights) if recipe.weights == "pretrained" else None
    backbone = build_backbone(args.config, state, recipe.n_layers)
    if recipe.weights == "random":
        backbone.apply(backbone._init_weights)
    model = Recommender(backbone, n_items, recipe.dropout, recipe.in_norm, recipe.out,
                        float(data["tok_std"]) * math.sqrt(backbone.config.hidden_size))
    init_items(model, recipe, data)
    if recipe.tune == "lora":
        from peft import LoraConfig, inject_adapter_in_model
        backbone.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=recipe.rank, lora_alpha=2 * recipe.rank, lora_dropout=0.0,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"]), backbone)
    elif recipe.tune == "frozen":
        backbone.requires_grad_(False)
    model.to(device)
    item_params = [model.item_embedding.weight, model.item_bias, model.log_temperature]
    body = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("item_", "log_temperature"))]
    groups = [{"params": item_params, "lr": recipe.item_lr}]
    if body:
        groups.append({"params": body, "lr": recipe.lr})
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    X, Y = windows(offsets, items, recipe.max_len)
    if getattr(args, "max_windows", None):
        X, Y = X[: args.max_windows], Y[: args.max_windows]
    steps_per_epoch = math.ceil(len(X) / recipe.batch)
    total = steps_per_epoch * recipe.epochs
    warm = max(1, int(recipe.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    valid = histories(offsets, items, "valid", recipe.max_len)
    test = histories(offsets, items, "test", recipe.max_len)
    g = torch.Generator().manual_seed(args.seed)
    record = {"recipe": dataclasses.asdict(recipe), "device": str(device), "windows": len(X),
              "trainable": sum(p.numel() for grp in groups for p in grp["params"]), "epochs": []}
    best, stale = -1.0, 0
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(X), generator=g)
        total_loss = 0.0
        for s in range(0, len(X), recipe.batch):
            idx = order[s:s + recipe.batch]
            x, y = X[idx].to(device), Y[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                h = model.encode(x)
            where = y != 0
            loss = F.cross_entropy(model.head(h[where].float()), y[where])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); sched.step()
            total_loss += loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.time() - t0
        v, t = evaluate(model, valid, device), evaluate(model, test, device)
        record["epochs"].append({"epoch": epoch, "loss": total_loss / steps_per_epoch, "train_s": train_s,
                                 "valid": v, "test": t})
        print(f"{recipe.name} ep{epoch} loss {total_loss / steps_per_epoch:.3f} valid {v['ndcg@10']:.4f} "
              f"test {t['ndcg@10']:.4f} ({train_s:.1f}s)", flush=True)
        if v["ndcg@10"] > best:
            best, stale, record["best"] = v["ndcg@10"], 0, {"epoch": epoch, "valid": v, "test": t}
        else:
            stale += 1
        json.dump(record, open(os.path.join(args.out, recipe.name + ".json"), "w"), indent=1)
        if not math.isfinite(total_loss) or stale >= recipe.patience:
            break
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--recipes", default="all", help="comma-separated names, or 'all'")
    p.add_argument("--parallel", type=int, default=1, help="recipes run as this many processes at once")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, default=None, help="smoke runs: train on this many windows")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    chosen = [r for r in recipes() if args.recipes == "all" or r.name in args.recipes.split(",")]
    if args.epochs:
        chosen = [dataclasses.replace(r, epochs=args.epochs) for r in chosen]
    if args.parallel > 1:
        procs, queue = [], list(chosen)
        while queue or procs:
            while queue and len(procs) < args.parallel:
                r = queue.pop(0)
                cmd = [sys.executable, __file__, "--weights", args.weights, "--config", args.config,
                       "--data", args.data, "--recipes", r.name, "--seed", str(args.seed), "--out", args.out]
                if args.epochs:
                    cmd += ["--epochs", str(args.epochs)]
                if args.max_windows:
                    cmd += ["--max-windows", str(args.max_windows)]
                procs.append(subprocess.Popen(cmd))
            time.sleep(1)
            procs = [q for q in procs if q.poll() is None]
        return
    for r in chosen:
        run(r, args)


if __name__ == "__main__":
    main()
