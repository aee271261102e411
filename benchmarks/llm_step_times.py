"""Where the time goes when SmolLM2-135M is an ml-100k recommender on a CPU, and how big its states get.

    nice -n 10 .venv/bin/python benchmarks/llm_step_times.py --parts lora30 full8 eval norms \
        --json benchmarks/results/llm_step_times.json

The committed results ran part by part (each part replaces its own entry), the step timings in a quiet
spell of the shared 2-core machine (load average 1.4-2.0 at their start; runs at load 4-5 took 4-7
times as long). About 20 minutes in all; the first run also converts SmolLM2 into the cache (~20 s).

Parts (each adds its entries to the JSON, so they can run one at a time):
- lora30 / full8: one training step (forward, backward, AdamW step, timed apart) on 32 ml-100k training
  windows of 50 items and of 20 items, for all 30 layers with LoRA r=16 and for the first 8 layers fully
  fine-tuned: fp32, bf16 autocast, and fp32 with gradient checkpointing, interleaved on one model. One
  warm-up round, then the median of `--rounds` timed rounds.
- eval: one full-ranking evaluation pass over ml-100k's 943 test users (30 layers, fp32, seen items
  excluded), the cost of every validation during training.
- norms: the mean L2 norm and the largest entry of the residual stream at the input and after each of
  the 30 layers, for the LLM's own title tokens and for item histories whose vectors are random at std
  0.02, random at the token-embedding std, and initialised from the titles (the "massive activations").

Torch uses every core it is given; the load average at the start is recorded with each part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from layerwise.data import load_dataset
from layerwise.evaluation.evaluate import evaluate
from layerwise.perf.memory import peak_rss_bytes
from layerwise.models.factory import build_recommender
from layerwise.models.llm import LLMSetup, layer_state_norms, set_checkpointing
from layerwise.models.pretrained import get_pretrained
from layerwise.training.train import TrainConfig, next_item_loss, training_windows

MODEL = "smollm2-135m"
SETUPS = {"lora30": {"finetune": "lora", "lora_rank": 16, "n_layers": None},
          "full8": {"finetune": "full", "n_layers": 8}}
# mode -> (gradient checkpointing, bf16 autocast); each is timed at both history lengths.
MODES = {"fp32": (False, False), "bf16": (False, True), "fp32_checkpointing": (True, False)}


def _machine() -> dict:
    return {"load_avg_1m": os.getloadavg()[0], "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}


def _batch(data, max_len: int, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = training_windows(data, max_len, causal=True)
    # Full windows only, so both lengths time exactly n x max_len positions.
    full = torch.nonzero(inputs[:, 0] != 0).squeeze(1)
    pick = full[torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:n]]
    return inputs[pick], targets[pick]


def _step(model, optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool, encode=None) -> dict[str, float]:
    """One timed training step; `encode` replaces model.encode (benchmarks/train_compile.py: a compiled one)."""
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = next_item_loss(model, (encode or model.encode)(x), y, TrainConfig(), torch.Generator())
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0,
            "step_cpu_seconds": time.process_time() - c0, "loss": loss.item()}


def time_modes(model, x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Median (and fastest) seconds per step part for each mode, the modes interleaved (A B C A B C ...)
    so that the load of a shared machine hits them alike; one warm-up round first.

    The process's CPU seconds per step (all threads) come with each: on a busy machine the wall time
    grows with other jobs' load more than the CPU time does.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for round_ in range(rounds + 1):
        for mode, (checkpointing, bf16) in MODES.items():
            set_checkpointing(model.backbone, checkpointing)
            sample = _step(model, optimizer, x, y, bf16)
            if round_:  # the first round warms up allocators and kernels
                samples[mode].append(sample)
    out = {}
    for mode, rows in samples.items():
        out[mode] = {key: statistics.median(s[key] for s in rows) for key in rows[0]}
        # Other jobs only ever add time: the fastest round is the best estimate of the step's own cost.
        out[mode].update({f"{key}_min": min(s[key] for s in rows) for key in ("forward", "backward", "step")})
        out[mode]["step_samples"] = [s["step"] for s in rows]
    return out


def part_steps(data, name: str, rounds: int) -> list[dict]:
    rows = []
    for max_len in (50, 20):
        setup = LLMSetup(**SETUPS[name], item_init="random")
        model = build_recommender(data, "llama", pretrained=MODEL, dropout=0.0, llm=setup)
        x, y = _batch(data, max_len)
        machine = _machine()
        for mode, timing in time_modes(model, x, y, rounds).items():
            checkpointing, bf16 = MODES[mode]
            row = {"setup": name, "layers": model.n_layers, "finetune": setup.finetune, "max_len": max_len,
                   "batch": len(x), "checkpointing": checkpointing, "bf16": bf16, "rounds": rounds,
                   "trainable": model.llm_info["trainable_parameters"], **machine, **timing,
                   "peak_rss_gb": peak_rss_bytes() / 2**30}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
    return rows


def part_eval(data) -> dict:
    model = build_recommender(data, "llama", pretrained=MODEL, dropout=0.0,
                              llm=LLMSetup(finetune="frozen", item_init="random")).eval()
    started = time.perf_counter()
    result = evaluate(model.score, data, stage="test", exclude_seen=True, max_len=50)
    row = {"users": data.n_users, "layers": model.n_layers, "max_len": 50, "seconds": time.perf_counter() - started,
           "ndcg@10_untrained": result.means["ndcg@10"], **_machine()}
    print(json.dumps(row), flush=True)
    return row


def _title_tokens(tokenizer, texts: list[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer.padding_side = "right"
    tokens = tokenizer([t for t in texts[1:] if t][:n], padding=True, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def part_norms(data, n: int = 64) -> dict:
    from transformers import AutoTokenizer

    path = get_pretrained(MODEL).path
    model = build_recommender(data, "llama", pretrained=MODEL, dropout=0.0, llm=LLMSetup(
        finetune="frozen", item_init="title_hidden", keep_token_table=True)).eval()
    histories = data.padded_histories(list(range(n)), "test", 50)
    token_std = model.llm_info["token_std"]
    out = {"token_std": token_std, "token_row_norm": model.llm_info["token_row_norm"], **_machine()}
    ids, mask = _title_tokens(AutoTokenizer.from_pretrained(path), list(data.item_text), n)
    with torch.no_grad():
        out["title_tokens"] = layer_state_norms(model, model.backbone.get_input_embeddings()(ids), mask)
        out["items_title_hidden"] = layer_state_norms(model, *model.embed(histories))
        for label, std in (("items_std_0.02", 0.02), ("items_token_std", token_std)):
            generator = torch.Generator().manual_seed(0)
            shape = model.item_embedding.weight.shape
            model.item_embedding.weight.copy_(torch.randn(shape, generator=generator) * std)
            out[label] = layer_state_norms(model, *model.embed(histories))
    for key in ("title_tokens", "items_title_hidden", "items_std_0.02", "items_token_std"):
        print(key, "mean", [round(v) for v in out[key]["mean_norm"]], flush=True)
        print(key, "median", [round(v) for v in out[key]["median_norm"]], flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["lora30", "full8", "eval", "norms"], required=True)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (one step per mode) after a warm-up")
    parser.add_argument("--json", type=Path, required=True, help="results file; existing parts are kept")
    args = parser.parse_args(argv)
    data = load_dataset("ml-100k")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results["model"] = MODEL
    for part in args.parts:
        started = time.perf_counter()
        if part in SETUPS:
            results.setdefault("steps", {})[part] = part_steps(data, part, args.rounds)
        elif part == "eval":
            results["eval"] = part_eval(data)
        else:
            results["norms"] = part_norms(data)
        print(f"{part}: {time.perf_counter() - started:.0f} s", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
