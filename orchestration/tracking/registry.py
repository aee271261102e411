"""The one MLflow helper, part two: the model registry. A layerwise model directory is logged as a pyfunc
model from code (pyfunc_model.py beside this file: no pickle, the weights stay safetensors), registered,
and promoted to an alias; `load_champion` brings the aliased model back as a local directory.

    with tracked_run("search"):
        version = log_compact_model("runs/default/compact-1a2b/model", "layerwise-compact")
    promote("layerwise-compact", version, alias="champion")
    model_dir = load_champion("layerwise-compact")   # load with layerwise.compression.compact.load_compact
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def log_compact_model(model_dir: str | Path, registered_name: str, name: str = "model") -> int:
    """Log a layerwise model directory as a pyfunc model (code + safetensors, no pickle), register it
    under `registered_name` and return the new version number.

    Call inside `tracked_run` to link the model to the run. Loading needs `layerwise` installed.
    """
    from layerwise.models.checkpoint import read_manifest

    manifest = read_manifest(model_dir)  # fails clearly on a directory that is not a model
    info = mlflow.pyfunc.log_model(
        name=name, python_model=str(PYFUNC_CODE), artifacts={"model_dir": str(Path(model_dir).resolve())},
        signature=_signature(), registered_model_name=registered_name, pip_requirements=_requirements(),
        input_example=pd.DataFrame({"history": [[1]]}),  # MLflow loads the model and predicts it once
        metadata={k: manifest.get(k) for k in ("kind", "family", "n_layers", "n_items", "kept", "max_len")},
    )
    return int(info.registered_model_version)


def promote(registered_name: str, version: int, alias: str = "champion") -> None:
    """Point `alias` at `version` of the registered model (it moves from any earlier version)."""
    MlflowClient().set_registered_model_alias(registered_name, alias, str(version))


def load_champion(registered_name: str, alias: str = "champion", dst_dir: str | Path | None = None) -> Path:
    """Download `models:/<registered_name>@<alias>` and return the layerwise model directory inside it
    (load it with `layerwise.compression.compact.load_compact`)."""
    from mlflow.models import Model

    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{registered_name}@{alias}", dst_path=None if dst_dir is None else str(dst_dir)))
    artifacts = Model.load(str(local)).flavors["python_function"]["artifacts"]
    return local / artifacts["model_dir"]["path"]


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array("long"), "history")]),
        outputs=Schema([ColSpec(Array("long"), "items"), ColSpec(Array("double"), "scores")]),
        params=ParamSchema([ParamSpec("k", "long", 10), ParamSpec("exclude_seen", "boolean", True)]),
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+')[0]}"
            for package in ("torch", "transformers", "safetensors", "mlflow", "pandas")] + ["layerwise"]
