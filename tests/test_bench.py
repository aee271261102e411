"""Tests of layerwise.bench on tiny models: structure, interleaving, FLOPs by hand, 0-layer variants, peaks.

Timings on a shared CPU are noise, so no test asserts a timing; they assert structure and invariants.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from layerwise.bench import (
    bench_dirs, benchmark, format_table, forward_flops, interleaved_schedule, make_histories, parameter_bytes,
    ratio_ci, zero_layer_variant,
)
from layerwise.bridges import set_bridges
from layerwise.memory import peak_memory
from layerwise.models import SequentialRecommender, build_backbone, preset_config
from layerwise.models.checkpoint import save_recommender

N_ITEMS = 20


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on two busy cores spin against each other and run ~100x slower; one keeps tests fast.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(family: str = "llama", layers: int = 2, seed: int = 0) -> SequentialRecommender:
    torch.manual_seed(seed)
    config = preset_config(family, "tiny", max_len=8, **{_count_key(family): layers})
    return SequentialRecommender(build_backbone(config), N_ITEMS).eval()


def _count_key(family: str) -> str:
    return {"gpt2": "n_layer", "t5": "num_layers"}.get(family, "num_hidden_layers")


def compact(model: SequentialRecommender, keep: list[int]) -> SequentialRecommender:
    small = copy.deepcopy(model)
    small.family.keep_layers(small.backbone, keep)
    return small


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_result_is_json_and_every_timing_positive_and_finite():
    teacher = tiny()
    result = benchmark({"teacher": teacher, "compact": compact(teacher, [1])}, batch_sizes=(1, 3), runs=3,
                       warmup=1, max_len=8, reference="teacher")
    assert json.loads(json.dumps(result)) == result
    assert result["env"]["torch_threads"] == 1
    for name in ("teacher", "compact"):
        entry = result["models"][name]
        assert entry["param_bytes"] > 0
        assert set(entry["batches"]) == {"1", "3"}
        for batch, stats in entry["batches"].items():
            timing = {k: v for k, v in stats.items() if k not in ("flops", "memory")}
            assert all(math.isfinite(x) and x > 0 for x in _numbers(timing)), timing
            assert stats["runs"] == 3
            assert stats["p95_ms"] >= stats["median_ms"]
            assert stats["users_per_s"] == pytest.approx(int(batch) / (stats["median_ms"] / 1e3))
            assert stats["flops"]["total"] > 0 and all(x >= 0 for x in _numbers(stats["flops"]))
            assert stats["memory"]["status"] == "not measured"  # in-memory CPU model: no invented number
    assert result["models"]["teacher"]["batches"]["1"]["speedup"] == 1.0
    for batch in ("1", "3"):
        f = result["nonlayer"][batch]["f"]
        assert 0 < f and math.isfinite(f)
        stats = result["models"]["compact"]["batches"][batch]
        assert stats["bound"] == pytest.approx(1 / (f + (1 - f) * 1 / 2))
        assert stats["efficiency"] == pytest.approx(stats["speedup"] / stats["bound"])
    table = format_table(result)
    assert table.count("| teacher |") == 2 and table.count("| compact |") == 2 and "f = " in table


def test_speedup_ci_contains_point_estimate():
    teacher = tiny()
    result = benchmark({"teacher": teacher, "compact": compact(teacher, [0])}, batch_sizes=(2,), runs=3,
                       warmup=1, max_len=8, reference="teacher")
    for name in ("teacher", "compact"):
        stats = result["models"][name]["batches"]["2"]
        low, high = stats["speedup_ci95"]
        assert low <= stats["speedup"] <= high
    low, high = result["nonlayer"]["2"]["f_ci95"]
    assert low <= result["nonlayer"]["2"]["f"] <= high


def test_ratio_ci_is_paired_and_contains_the_ratio_of_medians():
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 3.0, 30)  # both models slow down together: pairing must cancel it
    slow, fast = 2.0 * drift * rng.uniform(0.99, 1.01, 30), drift * rng.uniform(0.99, 1.01, 30)
    low, high = ratio_ci(slow, fast, seed=0)
    assert low <= np.median(slow) / np.median(fast) <= high
    assert 1.9 < low < high < 2.1
    assert ratio_ci(slow, fast, seed=0) == (low, high)  # seeded


def test_schedule_rotates_and_calls_really_interleave():
    assert interleaved_schedule(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                        ["a", "b", "c"]]
    calls: list[tuple[int, int]] = []

    class Recording(SequentialRecommender):
        def score(self, histories):
            calls.append((self.tag, self.n_layers))  # the 0-layer copy keeps the tag but has no layers
            return super().score(histories)

    teacher = tiny()
    small = compact(teacher, [0])
    for tag, model in enumerate((teacher, small)):
        model.__class__, model.tag = Recording, tag
    benchmark({"teacher": teacher, "compact": small}, batch_sizes=(1,), runs=3, warmup=0, max_len=8,
              reference="teacher")
    rounds = [calls[i: i + 3] for i in range(0, 9, 3)]
    assert len(calls) == 9
    assert all(sorted(r) == [(0, 0), (0, 2), (1, 1)] for r in rounds)
    assert len({r[0] for r in rounds}) == 3  # each model (and the 0-layer copy) leads one round


def test_flops_match_a_hand_count_for_tiny_llama():
    model = tiny("llama")  # 2 layers, H = 32, 2 heads x 16, FFN 64, no bias, no bridges
    b, t = 3, 8
    per_token = 4 * 2 * 32 * 32 + 3 * 2 * 32 * 64  # q, k, v, o projections + gate, up, down
    attention = 4 * t * t * 32 * b
    flops = forward_flops(model, b, t)
    assert flops["per_layer"] == [per_token * b * t + attention] * 2
    assert flops["layers"] == 2 * (20480 * 24 + 24576)
    assert flops["head"] == 2 * 32 * (N_ITEMS + 1) * b
    assert flops["bridges"] == 0 and flops["item_text"] == 0
    assert flops["total"] == flops["layers"] + flops["head"]


def test_bridges_add_flops_outside_the_layers():
    model = compact(tiny("llama", layers=4), [0, 3])
    set_bridges(model, [1], rank=4)
    flops = forward_flops(model, 2, 8)
    assert flops["bridges"] == (2 * 32 * 4 + 2 * 4 * 32) * 2 * 8


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "bert", "t5"])
def test_zero_layer_variant_runs_for_every_family(family):
    model = tiny(family)
    zero = zero_layer_variant(model)
    histories = make_histories(3, 8, N_ITEMS, seed=0)
    with torch.inference_mode():
        scores = zero.score(histories)
    assert zero.n_layers == 0 and model.n_layers == 2  # the original keeps its layers
    assert scores.shape == (3, N_ITEMS + 1) and torch.isfinite(scores[:, 1:]).all()
    assert forward_flops(zero, 3, 8)["layers"] == 0
    attention_only = 4 * 8 * 8 * 32 * 3
    assert all(x > attention_only for x in forward_flops(model, 3, 8)["per_layer"])  # projections counted


def test_gpt2_conv1d_projections_are_counted():
    # GPT-2 uses transformers' Conv1D, not nn.Linear: c_attn 32->96, attn c_proj 32->32, c_fc 32->64, 64->32.
    flops = forward_flops(tiny("gpt2"), 1, 8)
    assert flops["per_layer"][0] == 2 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32) * 8 + 4 * 8 * 8 * 32


def test_fewer_layers_mean_fewer_bytes_and_proportionally_fewer_layer_flops():
    teacher = tiny("llama", layers=4)
    small = compact(teacher, [0, 3])
    assert parameter_bytes(small) < parameter_bytes(teacher)
    assert parameter_bytes(small.layers) * 2 == parameter_bytes(teacher.layers)
    assert parameter_bytes(teacher) - parameter_bytes(small) == parameter_bytes(teacher.layers[1:3])
    assert forward_flops(small, 4, 8)["layers"] * 2 == forward_flops(teacher, 4, 8)["layers"]
    assert forward_flops(small, 4, 8)["head"] == forward_flops(teacher, 4, 8)["head"]


def test_histories_are_seeded_full_length_valid_items():
    a, b = make_histories(4, 8, N_ITEMS, seed=1), make_histories(4, 8, N_ITEMS, seed=1)
    assert torch.equal(a, b) and a.shape == (4, 8)
    assert a.min() >= 1 and a.max() <= N_ITEMS


def test_different_catalogues_are_refused():
    torch.manual_seed(0)
    other = SequentialRecommender(build_backbone(preset_config("llama", "tiny", max_len=8)), N_ITEMS + 1)
    with pytest.raises(ValueError, match="different catalogues"):
        benchmark({"a": tiny(), "b": other}, runs=1, warmup=0, max_len=8)
    with pytest.raises(ValueError, match="reference"):
        benchmark({"a": tiny()}, runs=1, warmup=0, max_len=8, reference="teacher")


@pytest.mark.slow
def test_peak_memory_comes_from_a_fresh_subprocess(tmp_path):
    save_recommender(tiny(), tmp_path / "teacher", {})
    peak = peak_memory(tmp_path / "teacher", batch_size=4, max_len=8)
    assert peak["status"] == "measured" and peak["pid"] != os.getpid()
    assert peak["baseline_rss_bytes"] > 0 and peak["peak_over_baseline_bytes"] > 0
    assert peak["peak_rss_bytes"] >= peak["loaded_rss_bytes"]
    assert peak["threads"] == 1  # the parent's thread count travels with the command


@pytest.mark.slow
def test_bench_dirs_names_duplicates_and_measures_peaks(tmp_path):
    teacher = tiny()
    save_recommender(teacher, tmp_path / "a" / "model", {})
    save_recommender(compact(teacher, [1]), tmp_path / "b" / "model", {})
    result = bench_dirs([str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")], batch_sizes=(2,),
                        runs=3, warmup=1, max_len=8)
    assert list(result["models"]) == ["model", "b/model"]
    assert result["settings"]["reference"] == "model"
    assert result["models"]["b/model"]["n_layers"] == 1
    for entry in result["models"].values():
        assert entry["batches"]["2"]["memory"]["peak_over_baseline_bytes"] > 0
    assert "(abs " in format_table(result)
