"""A layerwise model directory as an MLflow pyfunc model, logged as code: no pickle anywhere.

`orchestration.tracking.log_compact_model` logs this file with `mlflow.pyfunc.log_model(python_model=<this
file>, artifacts={"model_dir": <safetensors model directory>})` ("models from code"): MLflow stores the
source, not a pickled object, and runs it at load time; the weights stay safetensors + JSON and load with
`layerwise.compression.compact.load_compact` (bridges included).

    model = mlflow.pyfunc.load_model("models:/teacher@champion")
    model.predict(pd.DataFrame({"history": [[3, 17, 5], [8]]}), params={"k": 10})
    # -> DataFrame with "items" (top-k item indices, best first) and "scores" per row
"""

from __future__ import annotations

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

DEFAULT_K = 10


class RecommenderModel(PythonModel):
    """Top-k next items for item-index histories (1..n_items, most recent last)."""

    def load_context(self, context) -> None:
        from layerwise.compression.compact import load_compact
        from layerwise.models.checkpoint import read_manifest

        path = context.artifacts["model_dir"]
        self.model = load_compact(path)
        self.max_len = int(read_manifest(path).get("max_len") or 50)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """model_input: a DataFrame with a "history" column of item-index lists; params: k (default 10),
        exclude_seen (default True). Returns "items" and "scores" columns, one list of k per row."""
        from layerwise.evaluation.evaluate import recommend

        params = params or {}
        histories = pad_histories(list(model_input["history"]), self.max_len, self.model.n_items)
        items, scores = recommend(self.model.score, histories, int(params.get("k", DEFAULT_K)),
                                  bool(params.get("exclude_seen", True)))
        return pd.DataFrame({"items": items.tolist(), "scores": scores.float().tolist()})


def pad_histories(histories: list, max_len: int, n_items: int) -> torch.Tensor:
    """Item-index lists -> (B, max_len) LongTensor, left-padded with 0, keeping the most recent items."""
    out = torch.zeros(len(histories), max_len, dtype=torch.long)
    for row, history in enumerate(histories):
        items = [int(i) for i in history][-max_len:]
        if not items:
            raise ValueError(f"history {row} is empty: at least one item is needed to recommend")
        bad = [i for i in items if not 1 <= i <= n_items]
        if bad:
            raise ValueError(f"history {row} has item indices outside 1..{n_items}: {bad[:5]}")
        out[row, max_len - len(items):] = torch.tensor(items)
    return out


mlflow.models.set_model(RecommenderModel())
