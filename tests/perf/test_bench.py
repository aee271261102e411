"""Tests of layerwise.perf.bench on tiny models: structure, interleaving, 0-layer variants, peaks (FLOPs: test_cost).

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

from layerwise.perf.bench import bench_dirs, benchmark, interleaved_schedule, kept_variant, ratio_ci, zero_layer_variant
from layerwise.perf.table import format_table
from layerwise.perf.cost import forward_flops, make_histories
from layerwise.perf.memory import parallel_measurements, peak_memories, peak_memory
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
                       warmup=1, max_len=8, reference="teacher", remeasures=0)  # re-measures: test_bench_guard
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
                       warmup=1, max_len=8, reference="teacher", remeasures=0)
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
            calls.append((self.tag, self.n_layers))  # the teacher's copies keep its tag, with their own layers
            return super().score(histories)

    teacher = tiny()
    small = compact(teacher, [0])
    for tag, model in enumerate((teacher, small)):
        model.__class__, model.tag = Recording, tag
    benchmark({"teacher": teacher, "compact": small}, batch_sizes=(1,), runs=4, warmup=0, max_len=8,
              reference="teacher", remeasures=0)
    rounds = [calls[i: i + 4] for i in range(0, 16, 4)]
    assert len(calls) == 16
    # teacher, compact, the teacher's 0-layer copy and its 1-layer copy (the compact model's measured ceiling)
    assert all(sorted(r) == [(0, 0), (0, 1), (0, 2), (1, 1)] for r in rounds)
    assert len({tuple(r) for r in rounds}) == 4  # each of the four leads one round


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt2", "bert", "t5"])
def test_kept_variant_keeps_the_last_layers_and_shares_nothing(family):
    model = tiny(family, layers=4)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    kept = kept_variant(model, 2)
    assert kept.n_layers == 2 and model.n_layers == 4  # the original keeps its layers, and its values
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    ours = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ours for p in kept.parameters())
    for i, layer in enumerate(kept.layers):  # the last two, weight for weight
        theirs = dict(model.layers[2 + i].named_parameters())
        assert all(torch.equal(p, theirs[name]) for name, p in layer.named_parameters() if name in theirs)
    histories = make_histories(3, 8, N_ITEMS, seed=0)
    with torch.inference_mode():
        assert torch.isfinite(kept.score(histories)[:, 1:]).all()
    with pytest.raises(ValueError, match="1 to 4 layers"):
        kept_variant(model, 0)


def test_a_measured_ceiling_is_timed_for_every_depth_of_the_reference_layers():
    teacher = tiny(layers=4)
    models = {"teacher": teacher, "two": compact(teacher, [0, 3]), "one": compact(teacher, [2]),
              "also two": compact(teacher, [1, 2])}
    result = benchmark(models, batch_sizes=(2,), runs=3, warmup=1, max_len=8, reference="teacher", remeasures=0)
    for name in ("two", "one", "also two"):
        e = result["models"][name]["batches"]["2"]
        low, high = e["ceiling_ci95"]
        assert e["ceiling"] > 0 and low <= e["ceiling"] <= high
    two, also = result["models"]["two"]["batches"]["2"], result["models"]["also two"]["batches"]["2"]
    assert two["ceiling"] == also["ceiling"] and two["ceiling_ci95"] == also["ceiling_ci95"]  # one copy per depth
    assert format_table(result).count("k = 2:") == 1
    assert result["models"]["teacher"]["batches"]["2"]["ceiling"] is None  # nothing to bound at full depth
    assert "Measured ceilings" in format_table(result) and "k = 1:" in format_table(result)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "bert", "t5"])
def test_zero_layer_variant_runs_for_every_family(family):
    model = tiny(family)
    zero = zero_layer_variant(model)
    histories = make_histories(3, 8, N_ITEMS, seed=0)
    with torch.inference_mode():
        scores = zero.score(histories)
    assert zero.n_layers == 0 and model.n_layers == 2  # the original keeps its layers
    ours = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ours for p in zero.parameters())  # nothing shared once the layers are gone
    assert scores.shape == (3, N_ITEMS + 1) and torch.isfinite(scores[:, 1:]).all()
    assert forward_flops(zero, 3, 8)["layers"] == 0
    attention_only = 4 * 8 * 8 * 32 * 3
    assert all(x > attention_only for x in forward_flops(model, 3, 8)["per_layer"])  # projections counted


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
def test_peak_memories_run_side_by_side_and_come_back_in_order(tmp_path):
    save_recommender(tiny(), tmp_path / "a", {})
    save_recommender(compact(tiny(), [1]), tmp_path / "b", {})
    jobs = [(tmp_path / "a", 2), (tmp_path / "b", 4), (tmp_path / "a", 4)]
    peaks = peak_memories(jobs, max_len=8)
    assert [p["batch_size"] for p in peaks] == [2, 4, 4] and len({p["pid"] for p in peaks}) == 3
    assert peaks[1]["param_bytes"] < peaks[0]["param_bytes"] == peaks[2]["param_bytes"]  # b keeps 1 layer
    assert 1 <= parallel_measurements([tmp_path / "a"]) <= os.cpu_count()
    assert parallel_measurements([tmp_path / "a"], device="cuda:0") == 1  # processes would share the card
    with pytest.raises(RuntimeError, match="peak-memory subprocess failed for .*missing"):
        peak_memories([(tmp_path / "a", 2), (tmp_path / "missing", 2)], max_len=8)


@pytest.mark.slow
def test_bench_dirs_names_duplicates_and_measures_peaks(tmp_path):
    teacher = tiny()
    save_recommender(teacher, tmp_path / "a" / "model", {})
    save_recommender(compact(teacher, [1]), tmp_path / "b" / "model", {})
    result = bench_dirs([str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model")], batch_sizes=(2,),
                        runs=3, warmup=1, max_len=8, remeasures=0)
    assert list(result["models"]) == ["model", "b/model"]
    assert result["settings"]["reference"] == "model"
    assert result["models"]["b/model"]["n_layers"] == 1
    for entry in result["models"].values():
        assert entry["batches"]["2"]["memory"]["peak_over_baseline_bytes"] > 0
    assert "(abs " in format_table(result)
