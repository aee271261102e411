"""Healing: bridge pre-fitting, the KD losses, the trainable switch, LoRA merged back, early stopping."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from layerwise.compression.compact import build_compact, load_compact, save_compact
from layerwise.compression.distill import HealConfig, distillation_loss, heal, prefit_bridges
from layerwise.training.train import TrainConfig, train_recommender, training_windows
from tests.helpers.tiny_models import cyclic_data, tiny_model


@functools.lru_cache(maxsize=None)
def trained_teacher():
    data = cyclic_data(n_users=60)
    teacher = tiny_model("llama", n_layers=4, n_items=data.n_items)
    train_recommender(teacher, data, TrainConfig(epochs=10, eval_every=2, max_len=12, lr=5e-3), progress=False)
    return teacher.eval(), data


def quick(**overrides) -> HealConfig:
    return HealConfig(**{"epochs": 4, "max_len": 12, "batch_size": 32, "prefit_steps": 50, "lr": 3e-3,
                         "patience": 4, **overrides})


def test_distillation_loss_terms():
    student = torch.tensor([[float("-inf"), 1.0, 0.0, -1.0]])
    labels = torch.tensor([1])
    assert distillation_loss(student, student.clone(), labels, 2.0, 1.0, 0.0).abs() < 1e-6
    ce = distillation_loss(student, student, labels, 2.0, 0.0, 1.0)
    assert torch.isclose(ce, F.cross_entropy(student, labels))
    teacher = torch.tensor([[float("-inf"), -1.0, 0.0, 1.0]])
    assert distillation_loss(student, teacher, labels, 2.0, 1.0, 0.0) > 0.1


def test_prefit_makes_bridges_map_across_the_gap():
    teacher, data = trained_teacher()
    student = build_compact(teacher, [0, 3], bridge_rank=8)
    inputs, _ = training_windows(data, 12, True)
    before = prefit_bridges(build_compact(teacher, [0, 3], bridge_rank=8), teacher, inputs, steps=0)
    after = prefit_bridges(student, teacher, inputs, steps=150)
    assert before == {} and set(after) == {"1"}
    # An identity bridge leaves the full gap; a fitted one must explain part of the variance.
    identity = build_compact(teacher, [0, 3], bridge_rank=8)
    zero_fit = prefit_bridges(identity, teacher, inputs, steps=1, lr=0.0)
    assert after["1"] < zero_fit["1"]


def test_healing_recovers_quality_and_keeps_the_best_epoch():
    teacher, data = trained_teacher()
    student = build_compact(teacher, [0, 3], bridge_rank=8)
    result = heal(student, teacher, data, quick(), progress=False)
    unhealed = build_compact(teacher, [0, 3], bridge_rank=0)
    from layerwise.training.train import _validate
    # Epoch 0 is the unhealed model: a best epoch after it is a healed model that validated strictly better.
    assert result.best_epoch > 0
    assert result.best_valid["ndcg@10"] > _validate(unhealed, data, 12)["ndcg@10"]
    assert _validate(student, data, 12)["ndcg@10"] == pytest.approx(result.best_valid["ndcg@10"])
    assert len(result.history) >= 1 and all("loss" in h for h in result.history)


def test_bridges_only_trains_nothing_else():
    teacher, data = trained_teacher()
    student = build_compact(teacher, [0, 3], bridge_rank=4)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith("bridges.")}
    heal(student, teacher, data, quick(trainable="bridges", epochs=1), progress=False)
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    with pytest.raises(ValueError, match="nothing to train"):
        heal(build_compact(teacher, [0, 1, 2, 3]), teacher, data, quick(trainable="bridges"), progress=False)


def test_lora_is_merged_into_plain_linear_layers(tmp_path):
    teacher, data = trained_teacher()
    student = build_compact(teacher, [0, 3], bridge_rank=4)
    before = student.layers[0].self_attn.q_proj.weight.clone()
    heal(student, teacher, data, quick(trainable="lora", epochs=2, lora_rank=4), progress=False)
    q_proj = student.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear
    assert not torch.equal(q_proj.weight, before)
    save_compact(student, tmp_path / "c", {})
    reloaded = load_compact(tmp_path / "c")
    histories = data.padded_histories(list(range(10)), "test", 12)
    with torch.no_grad():
        assert torch.allclose(reloaded.score(histories), student.eval().score(histories), atol=1e-5)


def test_unknown_trainable_is_rejected():
    teacher, data = trained_teacher()
    with pytest.raises(ValueError, match="trainable"):
        heal(build_compact(teacher, [0, 3]), teacher, data, quick(trainable="everything"), progress=False)


def test_teacher_cache_holds_the_teachers_states_at_each_batchs_targets():
    from layerwise.compression.distill import TeacherCache, heal_loss, teacher_targets
    from layerwise.compression.hidden import capture_layer_inputs

    teacher, data = trained_teacher()
    student = build_compact(teacher, [0, 2])
    inputs, targets = training_windows(data, 12, causal=True)
    layers = teacher_targets(teacher, student)
    cache = TeacherCache.build(teacher, inputs, targets, layers, batch_size=7)
    assert set(cache.states) == {0, 2, 4, "final"} and len(cache.states["final"]) == int((targets != 0).sum())
    windows = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))[:16]
    rows = cache.rows(windows)
    with torch.no_grad():
        states, _ = capture_layer_inputs(teacher, inputs[windows])
    where = targets[windows] != 0
    for key in (0, 2, 4, "final"):
        assert torch.allclose(rows[key], states[key][where], atol=1e-5), key
    from layerwise.compression.distill import _batch_loss

    config = quick()
    cached = _batch_loss(student, teacher, inputs[windows], targets[windows], config, rows)
    assert torch.allclose(cached, heal_loss(student, teacher, inputs[windows], targets[windows], config), atol=1e-5)


def test_healing_with_the_teacher_cache_matches_healing_without():
    teacher, data = trained_teacher()
    results = {}
    for cache in (False, True):
        student = build_compact(teacher, [0, 3])
        result = heal(student, teacher, data, quick(epochs=2, prefit_steps=0, cache_teacher=cache), progress=False)
        results[cache] = (result, student.item_embedding.weight.detach().clone())
    (plain, items), (cached, cached_items) = results[False], results[True]
    assert plain.cache_seconds is None and cached.cache_seconds > 0
    assert [r["loss"] for r in cached.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-4)
    assert torch.allclose(cached_items, items, atol=1e-4)
    encoder = tiny_model("bert", n_layers=2, n_items=data.n_items)
    with pytest.raises(ValueError, match="needs a decoder"):
        heal(build_compact(encoder, [0]), encoder, data, quick(epochs=1, cache_teacher=True), progress=False)


def test_a_stopped_healing_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    from layerwise.compression.distill import _heal_epoch

    teacher, data = trained_teacher()
    config = quick(epochs=4, prefit_steps=20)
    straight = build_compact(teacher, [0, 3], bridge_rank=8)
    expected = heal(straight, teacher, data, config, progress=False)
    calls = []

    def stopped_in_epoch_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("stopped in epoch 3")  # a Ctrl-C, or the end of a machine's session
        return _heal_epoch(*args)

    checkpoint = tmp_path / "heal"
    with pytest.raises(KeyboardInterrupt):
        heal(build_compact(teacher, [0, 3], bridge_rank=8), teacher, data, config, progress=False,
             epoch_fn=stopped_in_epoch_3, checkpoint=checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["epoch-2"]
    resumed_student = build_compact(teacher, [0, 3], bridge_rank=8)  # built again, as a new process would
    resumed = heal(resumed_student, teacher, data, config, progress=False, checkpoint=checkpoint)
    assert not checkpoint.exists()  # the healed model is the output
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4] and resumed.best_epoch == expected.best_epoch
    for got, want in zip(resumed.history, expected.history):
        assert {k: v for k, v in got.items() if "seconds" not in k} == {
            k: v for k, v in want.items() if "seconds" not in k}
    assert all(h["train_cpu_seconds"] > 0 for h in expected.history)  # beside the wall seconds, every epoch
    for (name, a), (_, b) in zip(resumed_student.state_dict().items(), straight.state_dict().items()):
        assert torch.equal(a, b), name
    # A checkpoint of another healing recipe is refused, naming what differs.
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        heal(build_compact(teacher, [0, 3], bridge_rank=8), teacher, data, config, progress=False,
             epoch_fn=stopped_in_epoch_3, checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        heal(build_compact(teacher, [0, 3], bridge_rank=8), teacher, data, quick(epochs=4, prefit_steps=20, lr=1e-3),
             progress=False, checkpoint=checkpoint)


def test_a_stage_of_several_healings_keeps_the_finished_ones_and_resumes_the_stopped_one(tmp_path):
    from layerwise.compression.distill import _heal_epoch
    from layerwise.training.resume import stage_checkpoints

    teacher, data = trained_teacher()
    configs = [quick(epochs=3, prefit_steps=0, seed=s) for s in (1, 2)]

    def stage(epoch_fn=None):
        """Two healings in a row, as a baseline's random draws are."""
        students = [build_compact(teacher, keep, bridge_rank=0) for keep in ([0, 3], [1, 2])]
        results = [heal(s, teacher, data, c, progress=False, **({"epoch_fn": epoch_fn} if epoch_fn else {}))
                   for s, c in zip(students, configs)]
        return students, results

    expected_students, expected = stage()
    calls = []

    def stopped_in_the_second_healing(*args):
        calls.append(1)
        if len(calls) == 5:  # the first healing's 3 epochs, then the second's first, then a stop
            raise KeyboardInterrupt("stopped")
        return _heal_epoch(*args)

    directory = tmp_path / "stage-heal"
    with pytest.raises(KeyboardInterrupt), stage_checkpoints(directory):
        stage(stopped_in_the_second_healing)
    assert sorted(p.name for p in directory.iterdir()) == ["heal-1", "heal-2"]  # kept: the stage did not end
    ran = []

    def counted(*args):
        ran.append(1)
        return _heal_epoch(*args)

    with stage_checkpoints(directory):
        students, results = stage(counted)
    assert len(ran) == 2  # the first healing's result was kept; the second went on after its first epoch
    assert not directory.exists()  # the stage ended: its checkpoints go
    for got, want in zip(results, expected):
        assert [h["loss"] for h in got.history] == [h["loss"] for h in want.history]
        assert got.best_epoch == want.best_epoch and got.best_valid == want.best_valid
    for student, want in zip(students, expected_students):
        for (name, a), (_, b) in zip(student.state_dict().items(), want.state_dict().items()):
            assert torch.equal(a, b), name
