"""The GPU machine's side of benchmarks/gpu_pack.py: which parts have arrived, and the files they make.

    python3 benchmarks/gpu_stage.py status /tmp/gpu-stage              # after a staging call
    python3 benchmarks/gpu_stage.py install /tmp/gpu-stage /tmp/site   # the check's call (gpu_check.sh)

The parts are one byte stream cut in order (part-1/data, part-2/data, ...), and every part holds the manifest
naming each file's offset, bytes and sha256 in it. A file is made when every part it spans has arrived, and
kept only if its sha256 matches; the wheels made are installed with pip --no-index --no-deps --target SITE.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path


def manifest(stage: Path) -> dict | None:
    """The manifest of the newest pack among the staged parts, or None when no part has arrived."""
    found = sorted(stage.glob("part-*/manifest.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text()) if found else None


def arrived(stage: Path, pack: dict) -> list[bool]:
    """Whether each part of `pack` is staged whole: its data has the manifest's bytes, and its manifest is the
    pack's (a part left from another pack, cut for another tree, does not count)."""
    def whole(part: dict) -> bool:
        data, own = stage / part["folder"] / "data", stage / part["folder"] / "manifest.json"
        return (data.is_file() and data.stat().st_size == part["bytes"] and own.is_file()
                and json.loads(own.read_text())["id"] == pack["id"])

    return [whole(p) for p in pack["parts"]]


def read_range(stage: Path, pack: dict, start: int, size: int) -> bytes:
    """Bytes [start, start + size) of the stream, read from the parts that hold them."""
    chunks, offset = [], 0
    for part in pack["parts"]:
        end = offset + part["bytes"]
        if end > start and offset < start + size:
            with (stage / part["folder"] / "data").open("rb") as f:
                f.seek(max(start - offset, 0))
                chunks.append(f.read(min(end, start + size) - max(start, offset)))
        offset = end
    return b"".join(chunks)


def whole_files(stage: Path, pack: dict) -> tuple[list[dict], list[str]]:
    """(the files every part of which arrived, the names of the others)."""
    here, starts, offset = arrived(stage, pack), [], 0
    for part in pack["parts"]:
        starts.append(offset)
        offset += part["bytes"]
    ready, missing = [], []
    for f in pack["files"]:
        spans = [i for i, (start, part) in enumerate(zip(starts, pack["parts"]))
                 if start + part["bytes"] > f["offset"] and start < f["offset"] + f["bytes"]]
        if all(here[i] for i in spans):
            ready.append(f)
        else:
            missing.append(f["name"])
    return ready, missing


def status(stage: Path) -> int:
    pack = manifest(stage)
    if pack is None:
        print(f"gpu_stage: no part staged in {stage}")
        return 0
    here = arrived(stage, pack)
    ready, missing = whole_files(stage, pack)
    print(f"gpu_stage: parts {[p['folder'] for p, ok in zip(pack['parts'], here) if ok]} of {len(here)} staged; "
          f"{len(ready)} of {len(pack['files'])} files whole" + (f"; waiting for {missing}" if missing else ""))
    return 0


def install(stage: Path, site: Path) -> int:
    """Make and check the whole files, install the wheels among them; 1 when something is missing or wrong."""
    pack = manifest(stage)
    if pack is None:
        print("gpu_stage: nothing staged: the check runs on the machine's own packages", file=sys.stderr)
        return 1
    ready, missing = whole_files(stage, pack)
    made, bad = [], []
    out = stage / "files"
    out.mkdir(exist_ok=True)
    for f in ready:
        data = read_range(stage, pack, f["offset"], f["bytes"])
        if hashlib.sha256(data).hexdigest() != f["sha256"]:
            bad.append(f["name"])
            continue
        (out / f["name"]).write_bytes(data)
        made.append(out / f["name"])
    wheels = [str(p) for p in made if p.suffix == ".whl"]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *wheels]
    if wheels and subprocess.run(pip).returncode != 0:
        print(f"gpu_stage: pip could not install {len(wheels)} wheels into {site}", file=sys.stderr)
        return 1
    print(f"gpu_stage: installed {len(wheels)} wheels into {site}" + (f"; not staged: {missing}" if missing else "")
          + (f"; sha256 mismatch, left out: {bad}" if bad else ""), file=sys.stderr)
    return 1 if missing or bad else 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "status":
        return status(Path(argv[1]))
    if len(argv) == 3 and argv[0] == "install":
        return install(Path(argv[1]), Path(argv[2]))
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
