"""What a study archive keeps of a LoRA-trained LLM teacher, and what rebuilding it costs: the SmolLM2-135M
recommender on ml-100k (30 layers, LoRA r16 on every projection, the study's setup with random item vectors
so that no titles are encoded), its adapters given random values (as training would leave them), saved,
stripped of its merged backbone as `layerwise study archive` strips it, and rebuilt from the pretrained
model (layerwise.models.rebuild), with one torch thread.

    PYTHONPATH=. .venv/bin/python benchmarks/lora_rebuild.py --json benchmarks/results/lora_rebuild.json

It prints and writes each weight file's size, what the archive keeps, the seconds to save and to rebuild,
whether every rebuilt file has the saved one's SHA-256, the CPU, and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path


def measure(work: Path, rank: int = 16) -> dict:
    import torch

    torch.set_num_threads(1)
    from layerwise.data import load_dataset
    from layerwise.models.checkpoint import file_digests, save_recommender, strip_weights
    from layerwise.models.factory import build_recommender
    from layerwise.models.llm import LLMSetup
    from layerwise.models.pretrained import get_pretrained
    from layerwise.models.rebuild import BACKBONE_WEIGHTS, rebuild_backbone

    data = load_dataset("ml-100k")
    pretrained = get_pretrained("smollm2-135m")
    model = build_recommender(data, "llama", pretrained=str(pretrained.path), dropout=0.1, head="cos", seed=0,
                              llm=LLMSetup(item_init="random", lora_rank=rank))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero; trained adapters are not
        for name, tensor in model.backbone.named_parameters():
            if "lora_B" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
    started = time.perf_counter()
    save_recommender(model.eval(), work / "teacher", {"kind": "teacher", "pretrained": "smollm2-135m"})
    save_seconds = time.perf_counter() - started
    saved = file_digests(work / "teacher")
    sizes = {name: (work / "teacher" / name).stat().st_size for name in saved}
    kept = tuple(name for name in saved if name != BACKBONE_WEIGHTS)
    strip_weights(work / "teacher", work / "archived", keep=kept)
    started = time.perf_counter()
    rebuild_backbone(work / "archived")
    rebuild_seconds = time.perf_counter() - started
    return {"model": "smollm2-135m recommender, ml-100k, 30 layers, LoRA r16", "bytes": sizes,
            "kept": list(kept), "kept_mib": round(sum(sizes[k] for k in kept) / 2**20, 2),
            "whole_mib": round(sum(sizes.values()) / 2**20, 2), "save_seconds": round(save_seconds, 2),
            "rebuild_seconds": round(rebuild_seconds, 2),
            "same_digests": file_digests(work / "archived") == saved, "torch_threads": 1,
            "cpu": _cpu(), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def _cpu() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (the study's: 16)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = measure(Path(work), args.rank)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["same_digests"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
