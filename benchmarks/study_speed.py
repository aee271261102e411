"""A study's speed stage, run apart from the study: the first seed's finished models timed by the stage's
own code (orchestration.study.driver._time_models: float models in one interleaved benchmark with the
Amdahl bound and the measured ceiling, INT8 rows after them in a second), on a machine kept quiet for it.

The study times its models only when every seed is done, and its speed stage's key names every stage
folder of the first seed, so it is redone whenever an extra stage lands. This gives the same figures for
the stages finished so far, at the batch sizes asked for, without running the study; it changes nothing
under the study's folder. Stop the study first: another job on the cores is what the guard is for.

    PYTHONPATH=. .venv/bin/python benchmarks/study_speed.py studies/smollm2-ml100k.yaml \\
        --batch-sizes 1 --json benchmarks/results/study_speed_smollm2_b1.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def first_seed_dirs(config, data) -> dict[str, Path]:
    """The first seed's finished stages (this machine's or the archive's), by stage name."""
    from orchestration.study.status import study_status

    first = config.seeds[0]
    return {row["stage"]: Path(row["folder"]) for row in study_status(config, data)["stages"]
            if row["seed"] == first and row["state"] in ("done", "reused") and row["folder"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the study's YAML (studies/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as `layerwise study` takes them")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated; default: the study's bench.batch_sizes")
    parser.add_argument("--json", type=Path, help="write the stage's speed.json here, with the command's settings")
    args = parser.parse_args(argv)

    from layerwise.perf.table import format_table
    from orchestration.study.config import load_study_config
    from orchestration.study.config import load_study_data
    from orchestration.study.driver import _time_models, collect_rows

    overrides = list(args.overrides)
    if args.batch_sizes:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        if not sizes or min(sizes) < 1:
            parser.error(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
        overrides.append(f"bench.batch_sizes=[{','.join(map(str, sizes))}]")
    config = load_study_config(args.config, overrides)
    data = load_study_data(config)
    dirs = first_seed_dirs(config, data)
    missing = {"teacher", "ours"} - set(dirs)
    if missing:
        raise SystemExit(f"seed {config.seeds[0]} of {config.name} has not finished {sorted(missing)}: nothing to time")
    rows = collect_rows({config.seeds[0]: dirs})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        final = _time_models(config, data, dirs, rows, Path(out))
        result = json.loads((Path(out) / "speed.json").read_text())
    result["command"] = {"config": args.config, "overrides": overrides, "stages": sorted(dirs),
                         "seconds": round(time.perf_counter() - started, 1), "final": final}
    print(format_table(result))
    if result.get("quantized"):
        print(f"\nQuantized rows ({', '.join(result['quantized']['models'])}) timed after the float ones: "
              f"{result['quantized']['status']}.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if final else 1


if __name__ == "__main__":
    raise SystemExit(main())
