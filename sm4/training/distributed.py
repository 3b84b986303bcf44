"""Data-parallel training across processes with ``torch.distributed`` (``torchrun``; gloo on CPU,
nccl on GPU), kept deliberately plain: every process runs the same model on its share of each
batch, and the gradients are summed across processes before each optimiser step.

Why not ``DistributedDataParallel``: one SM4 step runs one forward per task before a single
backward, and each forward uses only its task's head; DDP expects one forward per backward and
every parameter used. Summing the gradients by hand after the backward is exact and simple.

Shares: process r of W takes rows r, r + W, ... of every batch (all processes draw the same
shuffled batches: the shuffle generator is seeded alike). Each process scales its task loss by
its share of the batch (local rows / batch rows), so the summed gradient is the gradient of the
whole batch's mean loss, whatever the shares' sizes. Validation, AEA and ALP decisions are made
alike on every process (each evaluates the whole validation split; the ALP entropy sums are
all-reduced), and only process 0 writes logs and checkpoints.

Exactly the single-process gradient only where the forward of a row does not depend on the other
rows or on random draws: no router noise (``noise_std=0``), no dropout, no BatchNorm in the heads
(``head_batch_norm=False``) and no balancing loss (``balance_loss_weight=0``); then whole epochs
match a single process (tests/test_distributed.py). The published settings have all four: each
process draws its own noise and dropout (its own stream, seeded by seed, epoch and rank), its
heads' BatchNorm normalises over its share of the batch, and the balancing loss's CV² sees its
own tokens. Such a run is as valid as a single-process one but not the same draw: after an epoch
its validation numbers differ from a single-process run's as two seeds' do.
"""

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return active()


def share(batch, world: int | None = None, index: int | None = None):
    """This process's rows of a batch ``(inputs dict, target)`` and the fraction of the batch they are."""
    world = world_size() if world is None else world
    index = rank() if index is None else index
    inputs, target = batch
    if world == 1:
        return batch, 1.0
    rows = target.shape[0]
    return ({name: x[index::world] for name, x in inputs.items()}, target[index::world]), len(range(index, rows, world)) / rows


def sum_gradients(parameters) -> None:
    """All-reduce (sum) every gradient across processes; parameters without one get zeros first,
    so every process reduces the same tensors in the same order."""
    if not active():
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Wait for every process (nothing to wait for alone)."""
    if active():
        dist.barrier()


def finish() -> None:
    """Leave the process group together: a process tearing it down while another still runs a
    collective aborts (seen with gloo), so all meet at a barrier first."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
