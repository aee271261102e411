"""serve/config.yaml against Serve's own schema, the application builder's arguments, and model resolution
from a real MLflow registry (local sqlite store). No Ray cluster is started here."""

import importlib
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from layerwise.models import SequentialRecommender, build_backbone, preset_config
from layerwise.models.checkpoint import read_manifest, save_recommender
from serve.app import build_app, resolve_model
from serve.schemas import DEFAULT_MODEL, AppArgs

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"


@pytest.fixture(scope="module")
def config() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny llama recommender saved in the layerwise format (enough to resolve and read)."""
    torch.manual_seed(0)
    model = SequentialRecommender(build_backbone(preset_config("llama", "tiny", max_len=8)), 10)
    return save_recommender(model, tmp_path_factory.mktemp("model") / "tiny", {"dataset": "synthetic:30:10:300:0"})


def test_config_binds_loopback(config):
    # Serve config files default to 0.0.0.0; ours must not expose the model to the network.
    assert config.http_options.host == "127.0.0.1"
    assert isinstance(config.http_options.port, int)


def test_config_import_path_resolves_to_the_builder(config):
    (app,) = config.applications
    module, attr = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    assert app.route_prefix == "/"


def test_config_args_are_valid_builder_args(config):
    args = AppArgs.model_validate(config.applications[0].args)
    assert args.model == DEFAULT_MODEL
    assert args.max_ongoing_requests >= args.max_batch_size
    limits = ("max_ongoing_requests", "max_queued_requests", "retry_after_s", "retry_after_max_s",
              "router_max_backoff_s")
    assert [getattr(args, k) for k in limits] == [getattr(AppArgs(), k) for k in limits]  # the file says the defaults
    # The builder accepts them as they are (the champion URI is resolved later, in each replica).
    application = build_app(config.applications[0].args)
    assert type(application).__name__ == "Application"


def test_builder_rejects_unknown_and_bad_args(model_dir):
    with pytest.raises(ValidationError, match="max_batch_sise"):
        build_app({"model": str(model_dir), "max_batch_sise": 8})
    with pytest.raises(ValidationError, match="num_cpus"):
        build_app({"model": str(model_dir), "num_cpus": 0})
    with pytest.raises(ValidationError, match="model_call"):
        build_app({"model": str(model_dir), "model_call": "process"})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        build_app({"model": str(model_dir), "max_batch_size": 32, "max_ongoing_requests": 8})
    with pytest.raises(FileNotFoundError, match="neither a directory nor an MLflow URI"):
        build_app({"model": str(model_dir / "missing")})


def test_builder_applies_replicas_and_cpus(model_dir):
    application = build_app({"model": str(model_dir), "num_replicas": 2, "num_cpus": 0.25,
                             "max_ongoing_requests": 40})
    deployment = application._bound_deployment
    assert deployment.num_replicas == 2
    assert deployment.ray_actor_options["num_cpus"] == 0.25
    assert deployment.max_ongoing_requests == 40


def test_builder_applies_the_bounded_queue(model_dir):
    deployment = build_app({"model": str(model_dir), "max_batch_size": 8, "max_ongoing_requests": 16,
                            "max_queued_requests": 8, "retry_after_s": 2.5,
                            "router_max_backoff_s": 0.01})._bound_deployment
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (16, 8)
    gated = build_app({"model": str(model_dir), "max_batch_size": 8, "max_ongoing_requests": 16,
                       "max_queued_requests": 8, "num_replicas": 2, "proxy_gate": True})._bound_deployment
    assert gated.max_queued_requests == 8 + 2 * 16  # the proxy's gate refuses; Serve's queue absorbs slot hand-overs
    assert (deployment.backpressure_config.status_code, deployment.backpressure_config.retry_after_s) == (503, 2.5)
    router = deployment._deployment_config.request_router_config
    assert (router.initial_backoff_s, router.max_backoff_s) == (0.01, 0.01)
    defaults = AppArgs()  # two batches per replica, as many queued at the proxy
    assert defaults.max_ongoing_requests == 2 * defaults.max_batch_size  # one batch in the call, one filling
    assert defaults.max_queued_requests == defaults.max_batch_size  # and one waiting at the proxy
    assert defaults.router_max_backoff_s < 0.5
    with pytest.raises(ValueError, match="max_queued_requests must be -1"):
        build_app({"model": str(model_dir), "max_queued_requests": 0})
    with pytest.raises(ValidationError, match="max_queued_requests"):
        build_app({"model": str(model_dir), "max_queued_requests": -2})
    with pytest.raises(ValidationError, match="router_max_backoff_s"):
        build_app({"model": str(model_dir), "router_max_backoff_s": 0})


def test_serve_command_options_reach_the_app(model_dir):
    from orchestration.cli.deploy import serve_options
    from orchestration.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--model-call", "thread",
                                      "--max-batch-size", "4", "--torch-threads", "2"])
    application = build_app({"model": args.model, **serve_options(args)})
    app_args = AppArgs.model_validate(application._bound_deployment.init_args[0])
    assert (app_args.model_call, app_args.max_batch_size, app_args.torch_threads) == ("thread", 4, 2)
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--max-ongoing-requests", "20",
                                      "--max-queued-requests", "-1", "--retry-after-s", "3",
                                      "--router-max-backoff-s", "0.05"])
    app_args = AppArgs.model_validate(build_app({"model": args.model, **serve_options(args)})
                                      ._bound_deployment.init_args[0])
    assert (app_args.max_ongoing_requests, app_args.max_queued_requests) == (20, -1)
    assert (app_args.retry_after_s, app_args.router_max_backoff_s) == (3.0, 0.05)
    defaults = AppArgs.model_validate(build_app({"model": args.model, **serve_options(
        build_parser().parse_args(["serve"]))})._bound_deployment.init_args[0])
    assert (defaults.model_call, defaults.max_batch_size, defaults.batch_wait_timeout_s) == ("loop", 16, 0.01)


def test_resolve_model_finds_the_model_inside_a_folder(model_dir):
    assert resolve_model(str(model_dir)) == model_dir
    assert resolve_model(str(model_dir.parent)) == model_dir  # one layerwise model below: found
    with pytest.raises(FileNotFoundError, match="neither a directory nor an MLflow URI"):
        resolve_model("no/such/dir")


@pytest.mark.slow
def test_resolve_model_from_mlflow_run_and_registry(model_dir, tmp_path):
    from orchestration import tracking
    import mlflow

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        _check_mlflow_uris(tracking, mlflow, model_dir, tmp_path)
    finally:  # MLflow's URIs are process-global: leave them as the next test expects
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def _check_mlflow_uris(tracking, mlflow, model_dir: Path, tmp_path: Path) -> None:
    tracking.ensure_experiment("serve-test", tmp_path / "runs")
    uri = tracking.tracking_uri(tmp_path / "runs")
    with tracking.tracked_run("plain-artifacts") as run:  # a model directory logged as plain artifacts
        tracking.log_artifacts(model_dir, "model")
    with tracking.tracked_run("registered"):  # the registry's format: a pyfunc model, then an alias
        version = tracking.log_compact_model(model_dir, "tiny-compact")
    tracking.promote("tiny-compact", version)
    expected = read_manifest(model_dir)
    uris = (f"runs:/{run.info.run_id}/model", f"models:/tiny-compact/{version}", "models:/tiny-compact@champion")
    mlflow.set_tracking_uri("sqlite:///" + str(tmp_path / "elsewhere.db"))  # the argument must win
    for model_uri in uris:
        local = resolve_model(model_uri, tracking_uri=uri, download_dir=str(tmp_path / "downloads"))
        assert local.is_relative_to(tmp_path / "downloads"), model_uri
        assert read_manifest(local) == expected, model_uri
        assert (local / "recommender.safetensors").is_file()


def test_a_replica_asks_ray_for_a_gpu_only_when_its_device_is_one(model_dir):
    from orchestration.cli.deploy import serve_options
    from orchestration.cli.main import build_parser

    def options(*flags):
        args = build_parser().parse_args(["serve", "--model", str(model_dir), *flags])
        return build_app({"model": args.model, **serve_options(args)})._bound_deployment.ray_actor_options

    assert options("--device", "cpu")["num_gpus"] == 0
    assert options("--device", "cuda:0", "--num-gpus", "0.5")["num_gpus"] == 0.5  # asked; Ray places it
    with pytest.raises(ValueError, match="device"):
        build_app({"model": str(model_dir), "device": "gpu"})
