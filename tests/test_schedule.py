"""The epoch schedules of the multi-task loop (sm4.training.schedule) and the per-task settings."""

import pytest

from sm4.model import get_setting
from sm4.training import schedule


def test_once_sees_every_batch_once_in_the_tasks_order_and_cycle_repeats_the_smaller_tasks():
    loaders = {"big": ["b0", "b1", "b2"], "small": ["s0"]}
    once = list(schedule.epoch_batches(loaders, "once"))
    assert once == [[("big", "b0"), ("small", "s0")], [("big", "b1")], [("big", "b2")]]
    cycle = list(schedule.epoch_batches(loaders, "cycle"))
    assert cycle == [[("big", "b0"), ("small", "s0")], [("big", "b1"), ("small", "s0")], [("big", "b2"), ("small", "s0")]]
    assert schedule.steps_per_epoch(loaders) == 3 and schedule.steps_per_epoch({}) == 0
    with pytest.raises(ValueError, match="schedule"):
        next(schedule.epoch_batches(loaders, "random"))


def test_per_task_batch_sizes_and_weights_come_from_the_setting():
    large = get_setting("large").train
    assert schedule.task_batch_size(large, "mimic") == 20 and schedule.task_batch_size(large, "avmnist") == 40
    assert schedule.task_batch_size(large, "digits") == large.batch_size  # a task the setting does not name
    assert schedule.task_train_weight(large, "urfunny", 1.0) == 0.2
    assert schedule.task_train_weight(large, "digits", 0.5) == 0.5
    assert schedule.task_eval_weight(get_setting("small").train, "push", 1.0) == 100.0
    with pytest.raises(ValueError, match="epoch_schedule"):
        type(large)(epoch_schedule="sometimes").validate()
