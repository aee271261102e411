"""The LLM teacher against its controls on ml-100k (seed 0, full ranking, seen items excluded): test NDCG@5/
10/20, MRR and HR@10, and where each one's training time goes.

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/llm_teachers.py --variant pretrained
    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/llm_teachers.py --variant random_layers
    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/llm_teachers.py --variant random_items
    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/llm_teachers.py --variant small_llama
    PYTHONPATH=. .venv/bin/python benchmarks/llm_teachers.py --variant pretrained --smoke   # minutes
    PYTHONPATH=. .venv/bin/python benchmarks/llm_teachers.py --compare pretrained small_llama random_layers

Variants (one per run; each writes its entry into the JSON as it finishes). Two runs side by side at
--threads 1 get about 1.4x the work of one at --threads 2 done on 2 cores; give each its own --json then,
since both rewrite the whole file:
- pretrained: the recipe of studies/recipes/smollm2.yaml (SmolLM2-135M, 30 layers, LoRA r16, title-token
  items, cosine head, 10% warm-up then cosine decay over 12 epochs, bf16 autocast);
- random_layers: the same 30-layer architecture with freshly initialised layers, fully trained at lr 3e-4
  (the best random-init rate of the recipe sweep; LoRA on random layers would train almost nothing), the
  items still from the LLM's title tokens, the same head, schedule and autocast;
- random_items: the recipe with random item vectors (at the token-embedding row norm) instead of titles;
- small_llama: the project's default teacher (`layerwise run`'s: 8 layers, 64 wide, its own recipe).
Each trained model is saved under --out/<variant>/model (the pretrained one is what gets compressed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from layerwise.data import load_dataset
from layerwise.evaluation.evaluate import evaluate
from layerwise.perf.memory import peak_rss_bytes
from layerwise.models.checkpoint import save_recommender
from layerwise.models.factory import build_recommender
from layerwise.training.train import train_recommender, training_windows
from orchestration.outputs import write_json
from orchestration.pipeline.config import PipelineConfig, load_config

RECIPE = Path(__file__).resolve().parent.parent / "studies" / "recipes" / "smollm2.yaml"
VARIANTS = {
    "pretrained": [],
    "random_layers": ["teacher.llm.layer_init=random", "teacher.llm.finetune=full", "teacher.train.lr=0.0003"],
    "random_items": ["teacher.llm.item_init=random"],
    "small_llama": None,  # the pipeline's default teacher, not the recipe
}
REPORTED = ("ndcg@5", "ndcg@10", "ndcg@20", "mrr", "hr@10", "hr@20")
PER_USER = "test_per_user.json"  # beside each model: its test metrics per user, for the paired tests


def write_per_user(path: Path, test) -> None:
    write_json(path, {m: [float(v) for v in test.per_user[m]] for m in REPORTED})


def per_user(out: Path, name: str) -> dict[str, list[float]]:
    """OUT/<name>/test_per_user.json, computed from the saved model first if a run predates the file."""
    path = out / name / PER_USER
    if not path.exists():
        from layerwise.compression.compact import load_compact

        model = load_compact(out / name / "model").eval()
        data = load_dataset("ml-100k")
        write_per_user(path, evaluate(model.score, data, stage="test", exclude_seen=True, max_len=50))
    return json.loads(path.read_text())


def compare(out: Path, names: list[str]) -> dict:
    """Paired Wilcoxon tests (per test user, Holm-adjusted) of the first variant against each other one."""
    from layerwise.evaluation.stats import compare_to

    runs = {name: per_user(out, name) for name in names}
    first, others = names[0], names[1:]
    return {metric: {"reference": first, "mean": {n: float(np.mean(runs[n][metric])) for n in names},
                     "tests": compare_to(np.asarray(runs[first][metric]),
                                         {n: np.asarray(runs[n][metric]) for n in others})}
            for metric in ("ndcg@10", "mrr", "hr@10")}


def teacher_config(variant: str, smoke: bool, extra: list[str] | None = None):
    """The teacher section of the run config for `variant` plus `extra` key=value overrides (a smoke run: 2
    layers, 40 steps)."""
    overrides = VARIANTS[variant]
    if overrides is None:
        config = load_config(None, list(extra or []), PipelineConfig)
    else:
        config = load_config(str(RECIPE), [*overrides, *(extra or [])])
    if smoke:
        t = config.teacher
        llm = replace(t.llm, n_layers=2) if t.llm else None
        train = replace(t.train, epochs=1, schedule_minutes=None, max_minutes=None, eval_every=1)
        config = replace(config, teacher=replace(t, llm=llm, train=train))
    return config


def run(variant: str, model_dir: Path, smoke: bool, threads: int, extra: list[str] | None = None) -> dict:
    torch.set_num_threads(threads)
    config = teacher_config(variant, smoke, extra)
    t, seed = config.teacher, 0
    data = load_dataset(config.data.dataset, cache_dir=config.data.cache_dir)
    load_avg = [os.getloadavg()[0]]
    tick = time.monotonic()
    model = build_recommender(data, t.family, t.preset, pretrained=t.pretrained, max_len=config.data.max_len,
                              dropout=t.dropout, seed=seed, head=t.head, llm=t.llm)
    build_seconds = time.monotonic() - tick
    train = replace(t.train, seed=seed, max_len=config.data.max_len)
    tick = time.monotonic()
    # An interrupted run (a session's end) resumes from its last epoch; see layerwise.training.resume.
    result = train_recommender(model, data, train, progress=True, checkpoint=model_dir.parent / "checkpoint")
    train_seconds = time.monotonic() - tick
    load_avg.append(os.getloadavg()[0])
    tick = time.monotonic()
    save_recommender(model, model_dir, {
        "kind": "teacher", "preset": t.preset, "pretrained": t.pretrained, "dataset": data.name,
        "data_fingerprint": data.fingerprint, "max_len": config.data.max_len, "train": result.config,
        "best_epoch": result.best_epoch, "valid": result.best_valid, "llm": getattr(model, "llm_info", None)})
    save_seconds = time.monotonic() - tick
    tick = time.monotonic()
    test = evaluate(model.eval().score, data, stage="test", exclude_seen=True, max_len=config.data.max_len)
    test_seconds = time.monotonic() - tick  # float32, no autocast: the figures are the model's own
    write_per_user(model_dir.parent / PER_USER, test)
    history = result.history
    return {
        "variant": variant, "overrides": list(extra or []), "smoke": smoke, "test": {k: round(test.means[k], 5) for k in REPORTED},
        "valid": result.best_valid, "best_epoch": result.best_epoch,
        "epochs_run": len(history), "steps": history[-1]["steps"] if history else 0,
        "windows": len(training_windows(data, config.data.max_len, causal=True)[0]),
        "resumed_after_epoch": result.resumed_after,  # then "train loop" counts this call only; the epochs count all
        "minutes": {"build (load, title encoding, LoRA)": build_seconds / 60, "train loop": train_seconds / 60,
                    "of which epochs": sum(r["train_seconds"] for r in history) / 60,
                    "of which validation": sum(r.get("valid_seconds", 0.0) for r in history) / 60,
                    "save": save_seconds / 60, "test evaluation (fp32)": test_seconds / 60,
                    "training time (build + train loop)": (build_seconds + (train_seconds if result.resumed_after is None
                                                                     else result.seconds)) / 60},
        "history": history, "teacher": asdict(t), "n_layers": model.n_layers,
        "llm": getattr(model, "llm_info", None), "peak_rss_gb": peak_rss_bytes() / 2**30,
        "machine": {"threads": threads, "cpus": os.cpu_count(), "load_avg_1m_start_end": load_avg,
                    "torch": torch.__version__, "python": platform.python_version()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=list(VARIANTS), help="the variant to train (or use --compare)")
    parser.add_argument("--compare", nargs="+", metavar="NAME",
                        help="instead of training: paired tests of the first entry's test users against each "
                             "other entry's (models under --out), written to the JSON's comparisons")
    parser.add_argument("--out", default="runs/llm_teachers", help="models go to OUT/<name or variant>/model")
    parser.add_argument("--json", default="benchmarks/results/llm_teachers.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on 2 shared cores OpenMP's second thread waits on others' jobs)")
    parser.add_argument("--smoke", action="store_true", help="2 layers, one short epoch: checks the script")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="one more config override after the variant's (repeatable): teacher.train.epochs=8")
    parser.add_argument("--name", help="the entry's key in the JSON (default: the variant's name)")
    args = parser.parse_args()
    if args.compare:
        if len(args.compare) < 2:
            parser.error("--compare needs at least two entries: the reference, then the others")
        path = Path(args.json)
        results = json.loads(path.read_text()) if path.exists() else {"variants": {}}
        results["comparisons"] = compare(Path(args.out), args.compare)
        write_json(path, results)
        print(json.dumps(results["comparisons"]["ndcg@10"], indent=1))
        return
    if not args.variant:
        parser.error("give --variant to train one, or --compare NAME NAME ...")
    entry = run(args.variant, Path(args.out) / (args.name or args.variant) / "model", args.smoke, args.threads,
                args.extra)
    path = Path(args.json if not args.smoke else args.json.replace(".json", "_smoke.json"))
    results = json.loads(path.read_text()) if path.exists() else {"variants": {}}
    results["variants"][args.name or args.variant] = entry
    results["protocol"] = "ml-100k, seed 0, chronological leave-one-out, full ranking, seen items excluded"
    write_json(path, results)
    print(json.dumps({k: entry[k] for k in ("variant", "test", "minutes", "epochs_run", "steps")}, indent=1))


if __name__ == "__main__":
    main()
