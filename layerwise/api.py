"""The Python API: one function per step of the method, each a thin wrapper over the library function that
does the work (named in its docstring). `import layerwise` reaches them lazily (layerwise/__init__.py).

Smallest run (tiny synthetic data, a 2-layer model, CPU, seconds):

    import layerwise as lw

    data = lw.load_dataset("synthetic:300:60:6000:0")
    teacher = lw.build_recommender(data, "llama", preset="tiny")
    lw.train(teacher, data, lw.TrainConfig(epochs=4))
    compact = lw.compress(teacher, data, lw.CompressConfig(keep=0.5)).model
    print(lw.evaluate(compact, data).means["ndcg@10"])
    lw.save(compact, "/tmp/compact", data)
    model = lw.load("/tmp/compact", data)      # refused if `data` is not the data set it was trained on
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from layerwise.compression.compress import CompressConfig, CompressResult, default_selection
from layerwise.models.recommender import SequentialRecommender
from layerwise.training.train import TrainConfig, TrainResult


def load_dataset(spec: str | Path, **options: Any):
    """A data set read, filtered and split (chronological leave-one-out): `layerwise.data.load_dataset`.

    spec: "ml-100k", "beauty", "synthetic:USERS:ITEMS:INTERACTIONS:SEED", "seqfile:PATH", a folder of RecBole
    atomic files, or a CSV/Parquet file. options: data_dir, cache_dir, min_core, min_seq, progress.
    """
    from layerwise.data import load_dataset as _load

    return _load(spec, **options)


def build_recommender(data, family: str = "llama", preset: str = "small", **options: Any) -> SequentialRecommender:
    """A fresh recommender sized for `data`'s catalogue: `layerwise.models.factory.build_recommender`.

    family/preset: a backbone from `layerwise.models.FAMILIES` at "tiny", "small" or "base"; or
    pretrained="smollm2-135m" (a known name, a GGUF file or a Hugging Face folder) with llm=LLMSetup(...).
    options: pretrained, text_features, max_len, dropout, seed, causal, llm, head ("dot" or "cos").
    """
    from layerwise.models.factory import build_recommender as _build

    return _build(data, family, preset, **options)


def train(model: SequentialRecommender, data, config: TrainConfig | None = None, progress: bool = True,
          **options: Any) -> TrainResult:
    """Train `model` in place on `data`'s training histories; it keeps the best validation epoch's weights.
    `layerwise.training.train.train_recommender`; options: checkpoint, stop, on_epoch."""
    from layerwise.training.train import train_recommender

    return train_recommender(model, data, config or TrainConfig(), progress=progress, **options)


def compress(teacher: SequentialRecommender, data, config: CompressConfig | None = None, progress: bool = True,
             **options: Any) -> CompressResult:
    """Select layers of `teacher`, build the physically smaller model, heal it: `layerwise.compression.compress.compress`.

    config: None keeps a quarter of the layers, selected as `layerwise.compression.compress.default_selection` says
    for the teacher's depth (`beam` up to 12 layers, `topk` on `combined` scores beyond).
    The result's `.model` is the compact model, `.kept` the teacher layers it kept. options: precomputed.
    """
    from layerwise.compression.compress import compress as _compress

    if config is None:
        config = CompressConfig(**default_selection(teacher.n_layers))
    return _compress(teacher, data, config, progress=progress, **options)


def evaluate(model: SequentialRecommender | Callable, data, stage: str = "test", **options: Any):
    """Full-ranking metrics (NDCG, HR, MRR, ... at 5/10/20) per user and their means: `layerwise.evaluate`.

    model: a recommender, or any scorer histories (B, T) -> scores (B, n_items + 1). Returns an EvalResult
    (`.means["ndcg@10"]`, `.per_user`). options: exclude_seen, ks, max_len, batch_size, sampled, users.
    """
    from layerwise.evaluation.evaluate import evaluate as _evaluate

    scorer = model.eval().score if isinstance(model, SequentialRecommender) else model
    return _evaluate(scorer, data, stage=stage, **options)


def benchmark(models: Mapping[str, SequentialRecommender], reference: str | None = None, **options: Any) -> dict:
    """Interleaved latency and throughput, with speedups against `reference` (default: the first model)
    and their Amdahl bounds: `layerwise.perf.bench.benchmark`. options: batch_sizes, runs, warmup, max_len, seed.
    `result["models"][name]["batches"]["1"]["speedup"]` is a model's speedup at batch 1."""
    from layerwise.perf.bench import benchmark as _benchmark

    if not models:
        raise ValueError("benchmark needs at least one model")
    return _benchmark(dict(models), reference=reference or next(iter(models)), **options)


def save(model: SequentialRecommender, out_dir: str | Path, data, **manifest: Any) -> Path:
    """Write `model` as safetensors + manifest.json (no pickle), recording `data`'s fingerprint so that
    `load(out_dir, data)` can check it: `layerwise.compression.compact.save_compact` for a compact model,
    `layerwise.models.checkpoint.save_recommender` otherwise. manifest: extra JSON-able entries (e.g.
    dataset="ml-100k", the spec `layerwise serve` reloads the data set from; default: the data set's name)."""
    from layerwise.compression.compact import save_compact
    from layerwise.models.checkpoint import save_recommender

    record = {"dataset": data.name, "data_fingerprint": data.fingerprint, **manifest}
    if getattr(model, "kept", None) is not None and getattr(model, "teacher_layers", None) is not None:
        return save_compact(model, out_dir, record)
    return save_recommender(model, out_dir, {"kind": "teacher", **record})


def load(model_dir: str | Path, data=None) -> SequentialRecommender:
    """A saved model (teacher or compact, bridges included) in eval mode: `layerwise.compression.compact.load_compact`.
    With `data`, it is first checked to be the data set the model was trained on (same catalogue and split;
    `layerwise.models.checkpoint.check_data`), and a ValueError says what differs."""
    from layerwise.compression.compact import load_compact

    return load_compact(model_dir, data=data)
