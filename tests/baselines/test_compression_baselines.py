"""Compression baselines under our budget: each runs on a tiny 4-layer model, is measured by the shared
evaluate/bench code, and removes what it was asked to (the table command: tests/orchestration/baselines/)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import asdict

import pytest
import torch

from layerwise.baselines import BASELINES, Budget, is_quantized, storage_bytes
from layerwise.baselines.attention import attention_kl, eager_attention, recorded_attention
from layerwise.baselines.budget import DRAWS, n_parameters
from layerwise.baselines.nas import BudgetSpent, SubsetObjective, selection_evaluations, top_k_subset
from layerwise.baselines.quantization import linear_weight_bytes, quantize_int8
from layerwise.baselines.sparsity import magnitude_prune, zero_fraction
from layerwise.baselines.width import prune_width
from layerwise.perf.bench import benchmark
from layerwise.compression.compact import build_compact
from layerwise.compression.distill import HealConfig
from layerwise.evaluation.evaluate import evaluate
from layerwise.models.checkpoint import load_recommender, save_recommender
from layerwise.compression.select import SELECTORS
from layerwise.training.train import TrainConfig, train_recommender
from orchestration.search.nas import tpe_search
from tests.helpers.tiny_models import cyclic_data, tiny_model

HEAL = HealConfig(epochs=1, batch_size=64, max_len=12, prefit_steps=5, patience=1)
TRAIN = TrainConfig(epochs=6, batch_size=32, lr=1e-2, max_len=12, patience=6, eval_every=6)


@functools.lru_cache(maxsize=None)
def _teacher(family: str = "llama"):
    data = cyclic_data(n_users=40)
    teacher = tiny_model(family, n_layers=4, n_items=data.n_items)
    train_recommender(teacher, data, TRAIN, progress=False)
    return teacher.eval(), data


def setup(family: str = "llama", seeds=(0,)):
    """A private copy of the shared trained teacher, its data, and the budget of keeping layers [0, 3]."""
    teacher, data = _teacher(family)
    teacher = copy.deepcopy(teacher)
    removed = n_parameters(teacher) - n_parameters(build_compact(teacher, [0, 3], bridge_rank=4))
    return teacher, data, Budget(k=2, heal=HEAL, bridge_rank=4, removed=removed, seeds=seeds, train=TRAIN)


def ndcg(model, data) -> float:
    value = evaluate(model.score, data, max_len=12).means["ndcg@10"]
    assert 0.0 <= value <= 1.0
    return value


def changed(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name, expected", [("first", [0, 1]), ("last", [2, 3]), ("uniform", [1, 3]),
                                            ("shortgpt", None), ("gromov", None)])
def test_depth_baselines_keep_k_layers_and_heal_with_our_budget(name, expected):
    teacher, data, budget = setup()
    unhealed, healed = BASELINES[name](data, teacher=teacher, budget=budget)
    assert unhealed.model.n_layers == healed.model.n_layers == 2
    assert unhealed.info["kept"] == healed.model.kept and len(healed.model.kept) == 2
    if expected:
        assert healed.model.kept == expected
    if name == "gromov":  # a contiguous block of 2 goes
        gone = sorted(set(range(4)) - set(healed.model.kept))
        assert gone[1] - gone[0] == 1
    assert unhealed.training is None and healed.training["epochs_run"] == HEAL.epochs
    assert healed.training["config"] == asdict(HEAL)
    assert changed(unhealed.model, healed.model)  # healing trained something
    ndcg(unhealed.model, data), ndcg(healed.model, data)


def test_random_draws_one_pair_per_seed():
    assert len(DRAWS) >= 5 and Budget(k=1).seeds == DRAWS
    teacher, data, budget = setup(seeds=(0, 1, 2))
    variants = BASELINES["random"](data, teacher=teacher, budget=budget)
    assert [v.row for v in variants] == ["random", "random +heal"] * 3
    for seed, v in zip((0, 1, 2), variants[::2]):
        assert v.info["kept"] == SELECTORS["random"](torch.zeros(4), 2, seed=seed) and v.info["seed"] == seed
    assert len({tuple(v.info["kept"]) for v in variants}) > 1


def test_magnitude_zeros_match_request_stay_zero_and_give_no_speedup():
    teacher, data, budget = setup()
    # Zeros that "stay zero" only mean something once healing kept new weights; a single epoch does not
    # always beat the pruned model's validation score, and then the unhealed weights are kept.
    budget = dataclasses.replace(budget, heal=dataclasses.replace(HEAL, epochs=3, patience=3))
    unhealed, healed = BASELINES["magnitude"](data, teacher=teacher, budget=budget)
    requested = budget.removed / sum(p.numel() for p in teacher.layers.parameters())
    assert 0.3 < requested < 0.7
    assert zero_fraction(unhealed.model) == pytest.approx(requested, abs=1e-4)
    assert zero_fraction(healed.model) == pytest.approx(requested, abs=1e-4) and changed(unhealed.model, healed.model)
    assert not any("weight_orig" in k or "weight_mask" in k for k in healed.model.state_dict())
    assert storage_bytes(healed.model) == storage_bytes(teacher)  # dense: zeros cost as much as any weight
    timing = benchmark({"teacher": teacher, "magnitude": healed.model}, batch_sizes=(8,), runs=3, warmup=1,
                       max_len=12, reference="teacher")
    assert timing["models"]["magnitude"]["batches"]["8"]["speedup"] > 0
    ndcg(healed.model, data)


def test_magnitude_prune_rejects_more_than_the_weights():
    teacher, _, _ = setup()
    with pytest.raises(ValueError, match="cannot prune"):
        magnitude_prune(teacher, 10**9)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_width_matches_compact_size_runs_and_reloads(family, tmp_path):
    teacher, data, budget = setup(family)
    model = prune_width(teacher, budget.removed)
    target = n_parameters(teacher) - budget.removed
    assert abs(n_parameters(model) - target) / target < 0.03
    config = model.backbone.config
    assert config.intermediate_size < teacher.backbone.config.intermediate_size and config.num_attention_heads == 1
    assert all(layer.mlp.down_proj.in_features == config.intermediate_size for layer in model.layers)
    histories = data.padded_histories(range(8), "test", 12)
    with torch.inference_mode():
        expected = model.score(histories)
        reloaded = load_recommender(save_recommender(model, tmp_path / "w", {"kind": "width"})).score(histories)
    torch.testing.assert_close(reloaded, expected)
    unhealed, healed = BASELINES["width"](data, teacher=teacher, budget=budget)
    assert healed.training["epochs_run"] == 1 and n_parameters(healed.model) == n_parameters(model)
    ndcg(healed.model, data)


def test_width_names_the_unsupported_family():
    teacher, _, budget = setup("gpt2")
    with pytest.raises(NotImplementedError, match="gpt2"):
        prune_width(teacher, budget.removed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_int8_stores_layer_weights_in_a_quarter_and_scores_alike(family):
    teacher, data, budget = setup(family)
    model = quantize_int8(teacher)
    assert is_quantized(model) and not is_quantized(teacher)
    assert linear_weight_bytes(teacher.layers) == 4 * linear_weight_bytes(model.layers)
    assert storage_bytes(model) < storage_bytes(teacher)
    histories = data.padded_histories(range(16), "test", 12)
    with torch.inference_mode():
        a, b = teacher.score(histories)[:, 1:], model.score(histories)[:, 1:]
    assert (a - b).abs().max() < 0.05 * (a.max() - a.min())
    assert abs(ndcg(model, data) - ndcg(teacher, data)) < 0.1


def test_int4_packs_two_weights_per_byte_and_scores_alike():
    pytest.importorskip("hqq")  # the INT4 baseline's one extra dependency
    teacher, data, budget = setup()
    (variant,) = BASELINES["int4"](data, teacher=teacher, budget=budget)
    model = variant.model
    assert linear_weight_bytes(teacher.layers) == 8 * linear_weight_bytes(model.layers)
    assert storage_bytes(model.layers) < storage_bytes(teacher.layers) / 4  # scales and zeros included
    histories = data.padded_histories(range(16), "test", 12)
    with torch.inference_mode():
        a, b = teacher.score(histories)[:, 1:], model.score(histories)[:, 1:]
    assert (a - b).abs().max() < 0.2 * (a.max() - a.min())
    timing = benchmark({"teacher": teacher, "int4": model}, batch_sizes=(4,), runs=2, warmup=1, max_len=12,
                       reference="teacher")
    assert timing["models"]["int4"]["batches"]["4"]["median_ms"] > 0


def test_depth_then_int8_quantizes_the_compact_model():
    teacher, data, budget = setup()
    compact = build_compact(teacher, [0, 3], bridge_rank=4)
    (variant,) = BASELINES["ours+int8"](data, teacher=teacher, budget=budget, compact=compact)
    assert variant.model.n_layers == 2 and is_quantized(variant.model) and variant.info["kept"] == [0, 3]
    assert linear_weight_bytes(compact.layers) == 4 * linear_weight_bytes(variant.model.layers)
    ndcg(variant.model, data)


def test_distilbert_student_takes_every_other_layer_without_hidden_term():
    teacher, data, budget = setup()
    (variant,) = BASELINES["distilbert"](data, teacher=teacher, budget=budget)
    assert variant.info["kept"] == [0, 2] and variant.model.n_layers == 2 and not len(variant.model.bridges)
    config = variant.training["config"]
    assert config["hidden_weight"] == 0.0 and config["kd_weight"] > 0 and config["ce_weight"] > 0
    assert config["epochs"] == HEAL.epochs
    ndcg(variant.model, data)


def test_attention_maps_are_recorded_and_compared():
    teacher, data, _ = setup()
    x = data.padded_histories(range(6), "valid", 12)
    with eager_attention(teacher), recorded_attention(teacher, [0, 1]) as maps, torch.no_grad():
        teacher.encode(x)
    assert teacher.backbone.config._attn_implementation == "sdpa"  # restored
    assert maps[0].shape == (6, 2, 12, 12)
    torch.testing.assert_close(maps[0].sum(-1).transpose(1, 2)[x != 0], torch.ones(int((x != 0).sum()), 2))
    mask = x != 0
    assert attention_kl(maps[0], maps[0], mask) == pytest.approx(0.0, abs=1e-6)
    assert attention_kl(maps[1], maps[0], mask) > 1e-4


def test_tinybert_student_distils_attention():
    teacher, data, budget = setup()
    (variant,) = BASELINES["tinybert"](data, teacher=teacher, budget=budget)
    assert variant.info["kept"] == [0, 2] and variant.model.n_layers == 2
    assert math.isfinite(variant.info["attention_kl_last_epoch"]) and variant.info["attention_kl_last_epoch"] > 0
    assert variant.training["config"]["hidden_weight"] > 0
    assert variant.model.backbone.config._attn_implementation == "sdpa"
    assert teacher.backbone.config._attn_implementation == "sdpa"
    ndcg(variant.model, data)


def test_scratch_model_has_k_fresh_layers_trained_with_the_teacher_recipe():
    teacher, data, budget = setup()
    (variant,) = BASELINES["scratch"](data, teacher=teacher, budget=budget)
    model = variant.model
    assert model.n_layers == 2 and model.backbone.config.num_hidden_layers == 2
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, teacher.layers[0].mlp.up_proj.weight)
    assert variant.training["kind"] == "train" and variant.training["config"]["lr"] == TRAIN.lr
    ndcg(model, data)


def test_a_scratch_student_stopped_in_its_stage_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    """Inside a study stage (stage_checkpoints) the student keeps its state after every epoch: stopped in
    epoch 4 of 6 and run again, it trains epochs 4 to 6 only and ends bit-identical to an unstopped run."""
    from layerwise.training import train as train_module
    from layerwise.training.resume import stage_checkpoints

    teacher, data, budget = setup()
    (expected,) = BASELINES["scratch"](data, teacher=teacher, budget=budget)
    real_epoch, calls = train_module._train_epoch, []

    def counted(*args, stop_at=None, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt("the machine's session ended")
        return real_epoch(*args, **kwargs)

    directory = tmp_path / "heal-checkpoint"
    monkeypatch.setattr(train_module, "_train_epoch", functools.partial(counted, stop_at=4))
    with pytest.raises(KeyboardInterrupt), stage_checkpoints(directory):
        BASELINES["scratch"](data, teacher=teacher, budget=budget)
    assert (directory / "heal-1").is_dir()  # epochs 1-3 saved: the stage did not end
    calls.clear()
    monkeypatch.setattr(train_module, "_train_epoch", counted)
    with stage_checkpoints(directory):
        (resumed,) = BASELINES["scratch"](data, teacher=teacher, budget=budget)
    assert len(calls) == 3 and not directory.exists()
    got, want = resumed.training, expected.training
    assert (got["epochs_run"], got["best_epoch"]) == (want["epochs_run"], want["best_epoch"]) == (6, 6)
    assert [c["valid"] for c in got["curve"]] == [c["valid"] for c in want["curve"]]
    assert not changed(resumed.model, expected.model)


def test_selection_budget_and_subset_repair():
    assert selection_evaluations(4) == 11 and selection_evaluations(8) == 37
    assert top_k_subset([0.1, 0.9, 0.5, 0.9], 2) == [1, 3]
    assert top_k_subset([0.5, 0.5, 0.5], 2) == [0, 1]


def test_subset_objective_counts_distinct_evaluations_within_budget():
    teacher, data, _ = setup()
    objective = SubsetObjective(teacher, data, budget=2, max_len=12)
    first = objective([0, 3])
    assert objective([3, 0]) == first and objective.evaluations == 1
    objective([1, 2])
    with pytest.raises(BudgetSpent):
        objective([0, 1])
    assert objective.best[0] == max(first, objective.cache[(1, 2)])


def test_tpe_search_spends_at_most_the_budget_and_finds_the_best_when_it_can_enumerate():
    teacher, data, _ = setup()
    small = SubsetObjective(teacher, data, budget=3, max_len=12)
    tpe_search(small, 4, 2, seed=0)
    assert small.evaluations == 3
    full = SubsetObjective(teacher, data, budget=selection_evaluations(4), max_len=12)  # 11 >= C(4, 2) = 6
    keep = tpe_search(full, 4, 2, seed=0)
    assert full.evaluations == 6 and full.cache[tuple(keep)] == max(full.cache.values())


def test_nas_baseline_heals_the_winner():
    teacher, data, budget = setup()
    unhealed, healed = BASELINES["nas"](data, teacher=teacher, budget=budget, search=tpe_search)
    assert healed.model.n_layers == 2 and healed.info["evaluations"] <= healed.info["budget"] == 11
    assert healed.training["epochs_run"] == 1
    with pytest.raises(ValueError, match="search"):
        BASELINES["nas"](data, teacher=teacher, budget=budget)


def test_compression_baselines_need_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        BASELINES["int8"](cyclic_data())
