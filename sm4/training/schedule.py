"""The epoch schedule of the multi-task loop: which task batches each optimiser step takes, and
the per-task batch sizes and weights a TrainConfig gives.

- "cycle" (sm4's earlier loop): every step takes one batch of every task; the epoch lasts as many
  steps as the largest task has batches, and smaller tasks start over (they are seen many times
  per epoch).
- "once" (the papers' / HighMMT's loop): every sample once per epoch. Every step takes the next
  batch of each task that still has one, tasks in the data's order (HighMMT's list order); the
  epoch ends when every task is exhausted. HighMMT picks per-task batch sizes so that the tasks
  have about as many batches (``TrainConfig.task_batch_size``, the papers' Tables 13-15).
"""

from collections.abc import Iterable, Iterator

SCHEDULES = ("cycle", "once")


def steps_per_epoch(loaders: dict[str, Iterable]) -> int:
    """Optimiser steps of one epoch under either schedule: the most batches of any task."""
    return max((len(loader) for loader in loaders.values()), default=0)


def epoch_batches(loaders: dict[str, Iterable], schedule: str) -> Iterator[list[tuple[str, object]]]:
    """Per step, [(task, batch), ...] in the loaders' order (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    iterators = {task: iter(loader) for task, loader in loaders.items()}
    for _ in range(steps_per_epoch(loaders)):
        step = []
        for task, loader in loaders.items():
            try:
                step.append((task, next(iterators[task])))
            except StopIteration:
                if schedule == "once":  # this task has had all its samples this epoch
                    continue
                iterators[task] = iter(loader)
                step.append((task, next(iterators[task])))
        yield step


def task_batch_size(config, task: str) -> int:
    """The task's batch size: ``task_batch_size[task]``, else ``batch_size``."""
    return int(config.task_batch_size.get(task, config.batch_size))


def task_train_weight(config, task: str, default: float) -> float:
    """The task's loss weight: ``task_train_weight[task]``, else the TaskSpec's (``default``)."""
    return float(config.task_train_weight.get(task, default))


def task_eval_weight(config, task: str, default: float) -> float:
    """The task's weight in the model-selection score: ``task_eval_weight[task]``, else ``default``."""
    return float(config.task_eval_weight.get(task, default))
