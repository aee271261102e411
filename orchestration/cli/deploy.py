"""`layerwise serve|bench-serve|plan`: serving a compact model over HTTP, its load benchmark, and the plan of
a run past one machine.

    layerwise serve --model runs/default/compact-*/model --port 8000
    layerwise plan --family llama --size 13b --keep 0.25 --gpus 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from serve.schemas import add_replica_arguments


def add_parsers(sub) -> None:
    _serve_parser(sub)
    sub.add_parser("bench-serve", add_help=False,
                   help="load benchmark of the served compact model against the teacher "
                        "(see `layerwise bench-serve --help`)")
    _plan_parser(sub)


def _serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="deploy a compact recommender over HTTP with Ray Serve")
    srv.add_argument("--model", default=None,
                     help="model directory or MLflow URI (default: models:/layerwise-compact@champion)")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8000)
    add_replica_arguments(srv)
    srv.add_argument("--device", default="auto", metavar="DEVICE",
                     help="where each replica runs the model: auto (CUDA when a GPU is visible, else CPU), cpu, "
                          "cuda or cuda:N; a GPU replica asks Ray for --num-gpus (default: %(default)s)")
    srv.add_argument("--num-gpus", type=float, default=1.0,
                     help="GPUs per replica with a GPU device; a fraction shares a card (default: %(default)s)")
    srv.add_argument("--dataset", default=None, help="catalogue data set (default: the model's own)")
    srv.add_argument("--data-dir", default=None,
                     help="local folder of the data set's files (default: $LAYERWISE_DATA_DIR), as for train")
    srv.add_argument("--tracking-uri", default="runs",
                     help="MLflow store for models:/ URIs: a run directory or a URI (default: %(default)s)")


def _plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="parameters, memory per GPU under ZeRO 0-3, importance shards and the "
                                       "DeepSpeed config of a model shape, full and compact",
                          description="Plan a run past one machine for a published shape (--family and --size) "
                                      "or any local one (--config), built on the meta device: no weights are "
                                      "read or allocated.")
    plan.add_argument("--family", choices=["llama", "qwen3", "bert", "t5"],
                      help="a published shape's family (with --size)")
    plan.add_argument("--size", help="llama: 1b 3b 8b 13b; qwen3: 1.7b 4b 8b 14b; bert: base large; t5: 3b 11b")
    plan.add_argument("--config", metavar="PATH",
                      help="instead of --family/--size: a local Hugging Face model directory or its config.json "
                           "(llama, qwen2, qwen3, gemma3, bert or t5), e.g. the directory `layerwise models get` "
                           "prints")
    plan.add_argument("--keep", type=float, default=0.25,
                      help="fraction of layers to keep (<= 1) or a layer count (default: %(default)s)")
    plan.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs, ZeRO's N (default: %(default)s)")
    plan.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU in GiB (default: %(default)s)")
    plan.add_argument("--n-items", type=int, default=10_000, help="catalogue size (default: %(default)s)")
    plan.add_argument("--seq-len", type=int, default=50)
    plan.add_argument("--micro-batch", type=int, default=8, help="micro batch per GPU (default: %(default)s)")
    plan.add_argument("--bridge-rank", type=int, default=16, help="bridge adapter rank; 0 = no bridges")
    plan.add_argument("--stage", type=int, default=3, choices=[0, 1, 2, 3],
                      help="ZeRO stage of the emitted DeepSpeed config (default: %(default)s)")
    plan.add_argument("--json", default=None, help="also write the plan to this JSON file")


def serve(args: argparse.Namespace) -> int:
    from orchestration.tracking import tracking_uri
    from serve.app import serve_main

    options = serve_options(args)
    serve_main(args.model, host=args.host, port=args.port, replicas=options.pop("num_replicas"),
               num_cpus=options.pop("num_cpus"), dataset=args.dataset, tracking_uri=tracking_uri(args.tracking_uri),
               proxy_gate=args.proxy_gate, **options)
    return 0


def serve_options(args: argparse.Namespace) -> dict:
    """The `serve.schemas.AppArgs` fields that `layerwise serve` sets besides the model and data set."""
    from serve.schemas import replica_options

    return {"data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,  # replicas' cwd differs
            "device": args.device, "num_gpus": args.num_gpus, **replica_options(args)}


def plan(args: argparse.Namespace) -> int:
    from orchestration.scale.plan import plan_main

    return plan_main(args)


def bench_serve(argv: list[str]) -> int:
    """`layerwise bench-serve ...`: serve/loadtest.py parses its own arguments (and its own --help)."""
    from serve.loadtest import main as loadtest_main

    return loadtest_main(argv)


HANDLERS = {"serve": serve, "plan": plan}
