"""Why teacher training stopped is recorded: the epoch budget, early stopping, or the wall-clock cap (the
one reason that makes a teacher depend on the machine's load)."""

from __future__ import annotations

import pytest

from layerwise.training.train import TrainConfig, stop_reason, train_recommender
from tests.helpers.tiny_models import cyclic_data, tiny_model


def train(**settings):
    config = TrainConfig(batch_size=32, max_len=12, eval_every=1, **settings)
    return train_recommender(tiny_model("llama", n_layers=2), cyclic_data(), config, progress=False)


def test_the_epoch_budget():
    result = train(epochs=2, patience=5)
    assert result.stop_reason == "epochs" and result.epochs_run == 2 == len(result.history)


def test_early_stopping():
    result = train(epochs=50, patience=1, lr=0.0)  # nothing is learnt: the second evaluation is no gain
    assert result.stop_reason == "early_stopping" and result.epochs_run == 2 and result.best_epoch == 1


def test_the_time_cap():
    result = train(epochs=50, patience=50, max_minutes=1e-9)  # passed during the first epoch
    assert result.stop_reason == "time_cap" and result.epochs_run == 1


@pytest.mark.parametrize("stale, patience, out_of_time, expected", [
    (0, 3, False, None), (3, 3, False, "early_stopping"), (1, 3, True, "time_cap"),
    (3, 3, True, "early_stopping"),  # it would have stopped there on any machine
])
def test_stop_reason(stale, patience, out_of_time, expected):
    assert stop_reason(stale, patience, out_of_time) == expected


def test_the_schedule_clock():
    result = train(epochs=50, patience=50, schedule="cosine", schedule_minutes=1e-9)  # done after a step
    assert result.stop_reason == "schedule_clock" and result.epochs_run == 1 and result.best_epoch == 1
    assert stop_reason(3, 3, False, True) == "early_stopping" and stop_reason(0, 3, True, True) == "time_cap"
