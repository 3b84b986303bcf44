"""The epoch schedules of the multi-task loop (sm4.training.schedule) and the per-task settings."""

import pytest

from sm4.model import get_setting
from sm4.training import schedule


def test_once_sees_every_batch_once_in_highmmts_step_order_and_cycle_repeats_the_smaller_tasks():
    loaders = {"big": ["b0", "b1", "b2"], "small": ["s0"]}
    once = list(schedule.epoch_batches(loaders, "once"))
    # HighMMT runs its list of steps reversed: the smaller task is in the last step, not the first
    assert once == [[("big", "b0")], [("big", "b1")], [("big", "b2"), ("small", "s0")]]
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


def test_once_matches_highmmts_loop():
    """HighMMT's train(): step c holds the c-th batch of each task that has one, the list reversed;
    per step the tasks in list order. Same tasks per step and each batch once (batch order
    within a task aside: HighMMT's reversal of a shuffled order)."""
    loaders = {"enrico": [f"e{i}" for i in range(2)], "avmnist": [f"a{i}" for i in range(5)], "push": [f"p{i}" for i in range(3)]}
    fulltrains = []
    for task, batches in loaders.items():  # HighMMT's loop, transcribed
        for count, batch in enumerate(batches):
            if count >= len(fulltrains):
                fulltrains.append({})
            fulltrains[count][task] = batch
    fulltrains.reverse()
    once = list(schedule.epoch_batches(loaders, "once"))
    assert [[task for task, _ in step] for step in once] == [list(step) for step in fulltrains]
    assert sorted(b for step in once for _, b in step) == sorted(b for batches in loaders.values() for b in batches)
    assert [b for step in once for task, b in step if task == "push"] == loaders["push"]  # loader order
