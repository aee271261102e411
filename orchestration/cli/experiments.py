"""`layerwise run|baselines|tune|study`: the long, tracked jobs. Each parses its command line here and
hands a config to its capability: orchestration.pipeline, .baselines, .search and .study.

Smallest CPU runs (tiny synthetic data, minutes on 2 cores):
    layerwise run data.dataset=synthetic:300:60:6000:0 teacher.preset=tiny teacher.train.epochs=4
    layerwise study seeds=[0,1] data.dataset=synthetic:300:60:6000:0 teacher.preset=tiny \
        teacher.train.epochs=3 compress.heal.epochs=1 sweep.heal_epochs=1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from orchestration.cli.data import add_data_args, add_device_arg, load_data


def add_parsers(sub) -> None:
    _run_parser(sub)
    _baselines_parser(sub)
    _tune_parser(sub)
    _study_parser(sub)


def _run_parser(sub) -> None:
    run = sub.add_parser(
        "run", help="the main job: train a teacher, score its layers, build and heal the compact model, "
                    "evaluate and benchmark both; resumable, tracked in MLflow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The main job, in resumable stages: data -> teacher -> evaluate the teacher (and MostPop) "
                    "-> importance\n(every estimator, sharded over Ray tasks) -> compact model (selection, "
                    "healing) -> evaluate it -> benchmark\nboth. It ends with the headline table (retention "
                    "and speedup with 95% CIs, the Amdahl bound) and\nwhere the time went.\n\n"
                    "Each stage writes runs/<name>/<stage>-<hash>/ (run_dir, name); a rerun with the same "
                    "settings skips\nfinished stages, so Ctrl-C and rerun resumes. MLflow logs to "
                    "runs/mlflow.db (in run_dir)\nunless tracking.uri is set.",
        epilog="examples:\n"
               "  layerwise run                                        # the defaults: ml-100k, small LLaMA, "
               "keep 25%\n"
               "  layerwise run compress.keep=0.5 teacher.train.epochs=30\n"
               "  layerwise run studies/recipes/smollm2.yaml           # the SmolLM2-135M recommender\n"
               "  layerwise run data.dataset=beauty data.data_dir=../shared/data/amazon-yelp\n"
               "The keys are the sections of orchestration/pipeline/config.py (data, teacher, compress, ray,\n"
               "tracking, bench); an unknown key or a wrong type is an error that names it.")
    run.add_argument("config", nargs="?", default=None, help="YAML config (default: the embedded defaults)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.train.epochs=30")
    run.add_argument("--device", default=None, metavar="DEVICE",
                     help="where every stage runs: auto, cpu, cuda or cuda:N (the same as the override "
                          "device=...; default: the config's, auto)")


def _baselines_parser(sub) -> None:
    base = sub.add_parser("baselines", help="every baseline under our budget, measured alike, in one table")
    add_data_args(base)
    base.add_argument("--teacher", required=True, help="trained teacher directory")
    base.add_argument("--keep", type=float, default=0.25,
                      help="fraction of layers to keep (<= 1) or a layer count (default: %(default)s)")
    base.add_argument("--json", required=True, help="write the full table (and benchmark) here")
    base.add_argument("--md", default=None, help="also write the Markdown table here")
    base.add_argument("--only", nargs="+", default=None, metavar="NAME",
                      help="baselines to run (default: all); ours and the teacher always run")
    base.add_argument("--heal-epochs", type=int, default=20)
    base.add_argument("--trainable", choices=["bridges", "lora", "all"], default="all")
    base.add_argument("--bridge-rank", type=int, default=0, help="as `layerwise compress` (default: %(default)s)")
    base.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                      help="random-layer draws; the first seeds every other method")
    base.add_argument("--runs", type=int, default=30, help="interleaved benchmark rounds")
    base.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add_device_arg(base)  # INT8/INT4 run on the CPU whatever it says: torch has no CUDA kernels for them


def _tune_parser(sub) -> None:
    from orchestration.search.arguments import add_arguments  # light: no torch, Ray or MLflow

    add_arguments(sub.add_parser("tune", help="search depth, bridges, selector and healing with Ray Tune + "
                                              "Optuna; register the Pareto front and promote a champion"))


def _study_parser(sub) -> None:
    study = sub.add_parser(
        "study", help="ours vs every baseline over seeds, with ablation, k sweep, noise, slices and a report",
        description="Seeds run in parallel as Ray tasks; every stage resumes. Writes runs/<name>/report/"
                    "report.md and report.html and logs them to MLflow. Example at tiny size: layerwise study "
                    "seeds=[0,1] data.dataset=synthetic:300:60:6000:0 teacher.preset=tiny "
                    "teacher.train.epochs=3 compress.heal.epochs=1 sweep.heal_epochs=1. "
                    "`layerwise study report RUN_DIR --out results/NAME` publishes a finished study; "
                    "`layerwise study archive RUN_DIR --out DIR` keeps its finished stages (the weights only "
                    "of the teacher and our model) for a machine that resumes it; "
                    "`layerwise study status CONFIG` says what remains.")
    study.add_argument("config", nargs="?", default=None,
                       help="YAML config (default: embedded defaults: ml-100k, small LLaMA, 5 seeds)")
    study.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0,1] sweep.ks=[1,2]")
    study.add_argument("--device", default=None, metavar="DEVICE",
                       help="where every seed's stages and the speed benchmark run: auto, cpu, cuda or cuda:N "
                            "(the same as the override device=...; default: the config's, auto); in no "
                            "stage's key, so finished stages are reused on either")


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(YAML path or None, key=value overrides): `layerwise run key=value ...` has no YAML file, so a first
    argument with "=" that is not an existing file is an override."""
    path, overrides = args.config, list(args.overrides)
    if path and "=" in path and not Path(path).exists():
        path, overrides = None, [path, *overrides]
    if getattr(args, "device", None):  # --device is the override device=..., given last so that it wins
        overrides.append(f"device={args.device}")
    return path, overrides


def run(args: argparse.Namespace) -> int:
    from orchestration.pipeline.config import load_config
    from orchestration.pipeline.run import run_pipeline

    run_pipeline(load_config(*_config_and_overrides(args)))
    return 0


def baselines(args: argparse.Namespace) -> int:
    from layerwise.compression.distill import HealConfig
    from orchestration.baselines.table import format_markdown, run_baselines

    heal = HealConfig(epochs=args.heal_epochs, trainable=args.trainable)
    result = run_baselines(args.teacher, load_data(args), keep=args.keep, heal_config=heal,
                           seeds=tuple(args.seeds), out_json=args.json, out_md=args.md, which=args.only,
                           bridge_rank=args.bridge_rank, runs=args.runs, memory=not args.no_memory,
                           device=args.device)
    print(format_markdown(result))
    return 0


def tune(args: argparse.Namespace) -> int:
    from orchestration.search.tuning import tune_command

    return tune_command(args)


def study(args: argparse.Namespace) -> int:
    from orchestration.study.config import load_study_config
    from orchestration.study.driver import run_study

    results = run_study(load_study_config(*_config_and_overrides(args)))
    head = results["headline"]
    print(json.dumps({"retention": head["retention"], "speedup": head.get("speedup")}, indent=1))
    return 0


def study_report(argv: list[str]) -> int:
    """`layerwise study report RUN_DIR --out results/NAME` (its own parser: `study` takes a YAML path)."""
    from orchestration.study.publish import publish_study

    parser = argparse.ArgumentParser(
        prog="layerwise study report",
        description="Publish a finished study: its report (Markdown and HTML), figures (PNG) and summary.json "
                    "(headline, every table, the protocol), regenerated from its run folder.")
    parser.add_argument("run_dir", help="the study's run folder, e.g. runs/ml100k-llama")
    parser.add_argument("--out", required=True, help="where to publish, e.g. results/ml100k-llama")
    parser.add_argument("--serving", metavar="SWEEP_JSON",
                        help="a `layerwise bench-serve --sweep` JSON of this study's models (the teacher and ours "
                             "of one seed): adds the report's Serving section, a table and a figure")
    parser.add_argument("--plan", nargs="+", metavar=("CONFIG", "KEY=VALUE"),
                        help="the config and overrides the whole study runs with, when its last run was a part "
                             "of it: the stages of this plan that have not finished are named in the report "
                             "(default: the plan of its last run, the run folder's config.json)")
    args = parser.parse_args(argv)
    plan = _config_and_overrides(argparse.Namespace(config=args.plan[0], overrides=args.plan[1:])) if args.plan \
        else None
    paths = publish_study(args.run_dir, args.out, serving=args.serving, plan=plan)
    print(f"published {args.run_dir} to {args.out}: report.md, report.html, summary.json and "
          f"{len(paths['figures'])} figures")
    return 0


def study_archive(argv: list[str]) -> int:
    """`layerwise study archive RUN_DIR --out DIR`: see orchestration.study.archive."""
    from orchestration.study.archive import MAX_WEIGHT_BYTES, archive_study

    parser = argparse.ArgumentParser(
        prog="layerwise study archive",
        description="Keep a study's finished stages in a folder small enough to commit: their rows, tables cut "
                    "to the tested metric and models. The teacher's and our compact model's weights are kept "
                    "(later stages build on them) up to --max-weight-mb a stage; every other model, and one "
                    "too big, keeps a digest and the shapes of each weight file instead. A study run with that "
                    "folder in its `reuse` list on another machine skips those stages; a stripped teacher or "
                    "compact model is trained again there only if a stage still to run needs it, and must "
                    "match the digests, which in practice needs the same kind of CPU.")
    parser.add_argument("run_dir", help="the study's run folder, e.g. runs/study-beauty-llama")
    parser.add_argument("--out", required=True, help="the archive folder, e.g. studies/archive/study-beauty-llama "
                                                      "(stages already there are kept; a stripped teacher or "
                                                      "compact model gets the run's weights if they have its digests)")
    parser.add_argument("--max-weight-mb", type=float, default=MAX_WEIGHT_BYTES / 2**20,
                        help="the most weights kept for one stage's models, in MB (default %(default).0f; 0 keeps "
                             "none: a resumed study then trains them again and checks their digests)")
    args = parser.parse_args(argv)
    if args.max_weight_mb < 0:
        parser.error(f"--max-weight-mb must be 0 or more, not {args.max_weight_mb}")
    summary = archive_study(args.run_dir, args.out, max_weight_bytes=int(args.max_weight_mb * 2**20))
    there = len(summary["kept"]) + len(summary["filled"])
    print(f"archived {len(summary['added'])} stages to {args.out} ({there} were there, "
          f"{len(summary['filled'])} of them given their weights; {len(summary['unfinished'])} unfinished "
          f"left out, {len(summary['carried'])} of them with the progress they go on from); the archive holds "
          f"{summary['bytes'] / 2**20:.1f} MB")
    for name in summary["held"]:
        print(f"held back: {name}")
    return 0


def study_status(argv: list[str]) -> int:
    """`layerwise study status [CONFIG] [key=value ...]`: see orchestration.study.status."""
    from orchestration.outputs import write_json
    from orchestration.study.config import load_study_config
    from orchestration.study.status import format_status, study_status

    parser = argparse.ArgumentParser(
        prog="layerwise study status",
        description="Where a study stands, running nothing: each seed's stages in running order, done here, "
                    "reused (from an archive or another run in `reuse`), started or pending, with the time "
                    "the finished ones took and an estimate for the rest from the same stage on other seeds. "
                    "Give the config and overrides the study runs with.")
    parser.add_argument("config", nargs="?", default=None, help="the study's YAML config (default: the defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as given to `layerwise study`")
    parser.add_argument("--rows", action="store_true",
                        help="also print what the finished stages measured, seed by seed: each row's test "
                             "NDCG@10, its retention of the teacher, and ours against it on that seed's users "
                             "(ratio with its bootstrap CI, Wilcoxon p unadjusted). Interim figures: the report "
                             "pools the seeds and Holm-adjusts")
    parser.add_argument("--json", default=None, help="also write the status (and with --rows, the rows) to this "
                                                     "JSON file")
    args = parser.parse_args(argv)
    status = study_status(load_study_config(*_config_and_overrides(args)))
    print(format_status(status))
    if args.rows:
        from orchestration.study.interim import format_interim, interim_rows

        status["rows"] = interim_rows(status)
        print(format_interim(status["rows"]))
    if args.json:
        write_json(Path(args.json), status)
    return 0


HANDLERS = {"run": run, "baselines": baselines, "tune": tune, "study": study}
