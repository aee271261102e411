"""Interactions in, splits out: readers, the ml-100k resolver, synthetic data, leave-one-out, cache.

    from layerwise.data import load_dataset
    data = load_dataset("ml-100k")                 # local dir -> RecBole wheel -> GroupLens download
    data = load_dataset("synthetic:1000:200:20000:0")
    data = load_dataset("beauty")                  # also sports, toys, yelp: local dir -> cache -> download
    data = load_dataset("seqfile:data/Beauty.txt") # any one-line-per-user file, `user item item ...`
    batch = data.padded_histories([0, 1, 2], "test", max_len=50)   # (3, 50) LongTensor, left-padded
"""

from layerwise.data.atomic import atomic_path, write_atomic
from layerwise.data.benchmarks import (
    BENCHMARKS,
    LITERATURE_METRICS,
    benchmark_stats,
    format_stats_table,
    resolve_benchmark,
)
from layerwise.data.cache import load_dataset, load_sequences, save_sequences
from layerwise.data.movielens import ML100K_URL, resolve_ml100k
from layerwise.data.readers import DataError, Interactions, read_atomic
from layerwise.data.seqfile import read_seqfile
from layerwise.data.tabular import read_table
from layerwise.data.split import SequenceData, build_sequences, fingerprint
from layerwise.data.stats import dataset_stats
from layerwise.data.synthetic import generate_synthetic

__all__ = [
    "BENCHMARKS",
    "LITERATURE_METRICS",
    "ML100K_URL",
    "DataError",
    "Interactions",
    "SequenceData",
    "atomic_path",
    "benchmark_stats",
    "build_sequences",
    "dataset_stats",
    "fingerprint",
    "format_stats_table",
    "generate_synthetic",
    "load_dataset",
    "load_sequences",
    "read_atomic",
    "read_seqfile",
    "read_table",
    "resolve_benchmark",
    "resolve_ml100k",
    "save_sequences",
    "write_atomic",
]
