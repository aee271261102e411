"""The `layerwise` command: the argparse tree, one module per command group, and the dispatch. Each
subcommand has --help; heavy imports (torch, Ray, MLflow) happen inside the subcommand that needs them.

Smallest CPU run of the whole foundation (a few seconds):
    layerwise data synth --users 300 --items 60 --interactions 6000 --out /tmp/synth
    layerwise train --dataset /tmp/synth --family llama --preset tiny --out /tmp/teacher
    layerwise evaluate --model /tmp/teacher --dataset /tmp/synth --json /tmp/metrics.json
"""

from __future__ import annotations

import argparse
import sys

from orchestration.cli import data, deploy, experiments, model, models
from orchestration.pipeline import interrupts

GROUPS = (data, models, model, experiments, deploy)  # the order of the commands in --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise",
        description="Layer-wise depth compression of transformer recommenders, measured honestly.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench-serve"]:
        return deploy.bench_serve(argv[1:])
    if argv[:2] == ["study", "report"]:  # a subcommand of `study`, whose first argument is otherwise a YAML
        command, call = "study report", lambda: experiments.study_report(argv[2:])
    elif argv[:2] == ["study", "archive"]:
        command, call = "study archive", lambda: experiments.study_archive(argv[2:])
    elif argv[:2] == ["study", "status"]:
        command, call = "study status", lambda: experiments.study_status(argv[2:])
    else:
        args = build_parser().parse_args(argv)
        command, handler = args.command, {n: f for g in GROUPS for n, f in g.HANDLERS.items()}[args.command]
        if command in ("run", "study"):  # resumable stage runs: a Ctrl-C must stop them (see interrupts)
            interrupts.install()
        call = lambda: handler(args)  # noqa: E731 - one call site, two ways to build it
    try:
        return call() or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"layerwise {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if command not in ("run", "study"):
            raise
        print(f"\nlayerwise {command}: interrupted. Finished stages and the epoch checkpoints of started ones "
              f"are kept: run the same command again to resume.", file=sys.stderr)
        return 130  # the shell's code for a Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
