"""Teacher training options: the learning-rate schedule (on steps, or on a time budget) and bf16 autocast."""

from __future__ import annotations

import math
import time

import pytest
import torch

from layerwise.training.train import LRSchedule, TrainConfig, train_recommender, training_windows
from tests.helpers.tiny_models import cyclic_data, tiny_model


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_then_cosine_over_the_planned_steps():
    optimizer = _optimizer(2.0)
    schedule = LRSchedule(optimizer, "cosine", warmup=0.1, total_steps=100)
    rates = []
    for _ in range(100):
        rates.append(optimizer.param_groups[0]["lr"])
        schedule.step()
    assert rates[0] == pytest.approx(2.0 * 0.1, rel=1e-6)  # one step of ten warm-up steps
    assert rates[9] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.09)), rel=1e-6)  # warm-up ends
    assert all(a < b for a, b in zip(rates[:9], rates[1:10]))  # rising
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))  # then decaying
    assert rates[50] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-6)
    assert schedule.done and optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_constant_without_warmup_leaves_the_rate_alone():
    optimizer = _optimizer(0.3)
    schedule = LRSchedule(optimizer, total_steps=10)
    for _ in range(5):
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == 0.3 and not schedule.done


def test_the_time_budget_ends_the_schedule_when_it_runs_out_first():
    optimizer = _optimizer(1.0)
    schedule = LRSchedule(optimizer, "cosine", total_steps=10**6, minutes=0.5 / 60)  # half a second
    schedule.step()
    assert 0.0 < schedule.progress < 0.5 and optimizer.param_groups[0]["lr"] > 0.5
    time.sleep(0.6)
    schedule.step()
    assert schedule.done and optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        LRSchedule(optimizer, "linear")
    with pytest.raises(ValueError, match="warmup is a fraction"):
        LRSchedule(optimizer, warmup=1.5)


def test_training_stops_when_the_schedule_minutes_are_spent():
    data = cyclic_data(n_users=40)
    model = tiny_model("llama", n_layers=2, head="cos")
    config = TrainConfig(epochs=50, batch_size=4, lr=3e-3, eval_every=100, schedule="cosine", warmup=0.1,
                         schedule_minutes=1.0 / 60, max_len=12)
    result = train_recommender(model, data, config, progress=False)
    steps_per_epoch = math.ceil(len(data.sequences) / 4)
    assert len(result.history) < 50 and result.history[-1]["steps"] < 50 * steps_per_epoch
    assert "valid_ndcg@10" in result.history[-1]  # the last (partial) epoch is evaluated and kept
    assert result.best_epoch == len(result.history)


def test_the_safety_cap_stops_after_a_validated_epoch():
    data = cyclic_data(n_users=40)
    model = tiny_model("llama", n_layers=2)
    config = TrainConfig(epochs=5, batch_size=8, lr=3e-3, eval_every=5, schedule="cosine", warmup=0.1,
                         max_minutes=1e-9, max_len=12)
    result = train_recommender(model, data, config, progress=False)
    steps_per_epoch = math.ceil(len(training_windows(data, 12, causal=True)[0]) / 8)
    assert len(result.history) == 1 and result.history[0]["steps"] == steps_per_epoch
    assert "valid_ndcg@10" in result.history[0] and result.best_epoch == 1  # validated, not left at -1
    # Each epoch records its CPU seconds beside its wall seconds (what compares runs at other thread counts).
    assert result.history[0]["train_cpu_seconds"] > 0 and result.history[0]["valid_cpu_seconds"] > 0


def test_bf16_autocast_trains_and_scores_in_float32():
    data = cyclic_data(n_users=40)
    histories = data.padded_histories(range(8), "valid", 12)
    scores = {}
    for autocast in (None, "bf16"):
        model = tiny_model("llama", n_layers=2, seed=1)
        config = TrainConfig(epochs=6, batch_size=8, lr=5e-3, eval_every=6, max_len=12, autocast=autocast)
        result = train_recommender(model, data, config, progress=False)
        assert result.best_valid["ndcg@10"] > 0.3  # a 20-item catalogue: learned, not chance (~0.15)
        with torch.inference_mode():
            scores[autocast] = model.eval().score(histories)
    assert scores["bf16"].dtype == torch.float32
    # bf16 matmuls change the numbers, not what the model learned to rank first.
    agree = (scores[None].argmax(-1) == scores["bf16"].argmax(-1)).float().mean()
    assert agree >= 0.75
    with pytest.raises(ValueError, match="unknown autocast 'fp16'"):
        train_recommender(tiny_model("llama", n_layers=2), data, TrainConfig(epochs=1, autocast="fp16"),
                          progress=False)


def _resumable_model() -> torch.nn.Module:
    model = tiny_model("llama", n_layers=2, seed=3)
    model.dropout.p = 0.2  # dropout draws from torch's global RNG, which the checkpoint must carry
    model.layers[0].requires_grad_(False)  # frozen weights are rebuilt by the caller, not saved
    return model


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    from layerwise.training.resume import saved_names

    data = cyclic_data(n_users=40)
    config = TrainConfig(epochs=5, batch_size=8, lr=3e-3, eval_every=2, patience=5, schedule="cosine",
                         warmup=0.2, max_len=12, seed=4)
    straight = _resumable_model()
    expected = train_recommender(straight, data, config, progress=False)
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt, match="after epoch 3"):
        train_recommender(_resumable_model(), data, config, progress=False, checkpoint=checkpoint,
                          stop=lambda epoch: epoch == 3)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["epoch-3"]  # older epochs were replaced
    names = saved_names(_resumable_model())
    assert names and not any(n.startswith("backbone.layers.0.") for n in names)
    resumed_model = _resumable_model()  # a new process would build it again the same way
    resumed = train_recommender(resumed_model, data, config, progress=False, checkpoint=checkpoint)
    assert not checkpoint.exists()  # the model is the output once training ends
    assert resumed.resumed_after == 3 and expected.resumed_after is None
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5] and resumed.best_epoch == expected.best_epoch
    for got, want in zip(resumed.history, expected.history):
        assert {k: v for k, v in got.items() if "seconds" not in k} == {
            k: v for k, v in want.items() if "seconds" not in k}
    for (name, a), (_, b) in zip(resumed_model.state_dict().items(), straight.state_dict().items()):
        assert torch.equal(a, b), name
    # A checkpoint is refused by a run of another recipe (the safety cap alone may change).
    with pytest.raises(KeyboardInterrupt):
        train_recommender(_resumable_model(), data, config, progress=False, checkpoint=checkpoint,
                          stop=lambda epoch: epoch == 1)
    other = TrainConfig(**{**config.__dict__, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"another config \(differs in \['lr'\]\)"):
        train_recommender(_resumable_model(), data, other, progress=False, checkpoint=checkpoint)
    capped = TrainConfig(**{**config.__dict__, "max_minutes": 60.0})
    assert train_recommender(_resumable_model(), data, capped, progress=False, checkpoint=checkpoint).epochs_run == 5
