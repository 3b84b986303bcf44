"""The epoch schedule of the multi-task loop: which task batches each optimiser step takes, and
the per-task batch sizes and weights a TrainConfig gives.

- "cycle" (sm4's earlier loop): every step takes one batch of every task; the epoch lasts as many
  steps as the largest task has batches, and smaller tasks start over (they are seen many times
  per epoch).
- "once" (the papers' / HighMMT's loop): every sample once per epoch, in as many steps as the
  largest task has batches. HighMMT's ``train`` (train_structure_multitask.py) lists step c as the
  c-th batch of every task that has one, then runs that list reversed: a task with n of the S
  batches takes part in the last n steps, so every task is in the epoch's final steps and only
  the largest ones in its first. Here too; within a step the tasks come in the data's order
  (HighMMT's list order), and each task's batches in its loader's order (HighMMT reverses a
  shuffled order, another draw of the same distribution, and holds the whole epoch's batches in
  memory to do it; the loaders here are iterated). HighMMT picks per-task batch sizes so that the
  tasks have about as many batches (``TrainConfig.task_batch_size``, the papers' Tables 13-15).
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
    steps = steps_per_epoch(loaders)
    for index in range(steps):
        step = []
        for task, loader in loaders.items():
            if schedule == "once" and index < steps - len(loader):  # joins for its last len(loader) steps
                continue
            try:
                step.append((task, next(iterators[task])))
            except StopIteration:
                if schedule == "once":  # a loader that yields fewer batches than its len()
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
