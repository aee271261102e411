"""What storing a LoRA teacher in float16 costs: a study's teacher is saved with its adapters and own weights
(items, head) in float16 and every stage reads it loaded back (orchestration/study/teacher.py). Its training
recorded the validation metrics of the float32 model at the kept epoch (the manifest's `valid`); this
evaluates the stored teacher on the same validation users and on the test users, and gives the difference
and the size of the files an archive keeps, against what float32 files would take.

    PYTHONPATH=. .venv/bin/python benchmarks/fp16_teacher.py \\
        runs/study-smollm2-ml100k/seeds/seed-0/teacher-9f8750751933/model \\
        --json benchmarks/results/fp16_teacher.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def measure(model_dir: Path, threads: int) -> dict:
    import torch
    from safetensors import safe_open

    from layerwise.compression.compact import load_compact
    from layerwise.data import load_dataset
    from layerwise.evaluation.evaluate import evaluate
    from layerwise.models.checkpoint import read_manifest

    torch.set_num_threads(threads)
    manifest = read_manifest(model_dir)
    if manifest.get("weights_dtype") != "float16":
        raise SystemExit(f"{model_dir} was not stored in float16 (weights_dtype: {manifest.get('weights_dtype')})")
    data = load_dataset(manifest["dataset"])
    if data.fingerprint != manifest.get("data_fingerprint"):
        raise SystemExit(f"{model_dir} was trained on other data than {manifest['dataset']} here")
    model = load_compact(model_dir).eval()
    out: dict = {"model": str(model_dir), "best_epoch": manifest["best_epoch"], "threads": threads}
    for stage in ("valid", "test"):
        started = time.perf_counter()
        result = evaluate(model.score, data, stage=stage, exclude_seen=True, max_len=manifest["max_len"])
        out[stage] = {k: result.means[k] for k in ("ndcg@10", "hr@10", "mrr")}
        out[f"{stage}_seconds"] = time.perf_counter() - started
    recorded = manifest["valid"]  # the float32 model's, at the kept epoch, in training
    out["valid_float32_recorded"] = recorded
    out["valid_difference"] = {k: out["valid"][k] - recorded[k] for k in recorded if k in out["valid"]}
    files = {}
    for name in ("lora.safetensors", "recommender.safetensors"):
        with safe_open(str(model_dir / name), "pt") as f:
            tensors = [f.get_slice(key) for key in f.keys()]
            float32 = sum(4 * _numel(t.get_shape()) for t in tensors)
        files[name] = {"bytes": (model_dir / name).stat().st_size, "float32_bytes": float32}
    out["files"] = files
    out["kept_mb"] = sum(f["bytes"] for f in files.values()) / 2**20
    out["kept_float32_mb"] = sum(f["float32_bytes"] for f in files.values()) / 2**20
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a study teacher's model folder (teacher-<key>/model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    out = measure(args.model, args.threads)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
