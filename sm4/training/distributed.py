"""Data-parallel training across processes with ``torch.distributed`` (``torchrun``; gloo on CPU,
nccl on GPU), kept deliberately plain: every process runs the same model on its share of each
batch, and the gradients are summed across processes before each optimiser step.

Why not ``DistributedDataParallel``: one SM4 step runs one forward per task before a single
backward, and each forward uses only its task's head; DDP expects one forward per backward and
every parameter used. Summing the gradients by hand after the backward is exact and simple.

Shares: process r of W takes rows r, r + W, ... of every batch (all processes draw the same
shuffled batches: the shuffle generator is seeded alike). The published settings' training
forward then equals one process's, row for row (``sm4.modules.batch_share``; the trainer runs
every training forward inside a share, alone too): router noise and dropout are drawn for the
whole batch from a stream keyed on (seed, epoch, step, task) and each process keeps its rows;
the heads' BatchNorm (``sm4.model.batch_norm``) and the balancing loss's CV^2 of importance and
load use sums over all processes (``all_sum``, differentiable).

Gradients: each process's loss is its part of the whole batch's loss and the parts sum to it:
its task losses are scaled by its share of the batch (local rows / batch rows), and the balancing
loss, whole-batch and so alike on every process, by 1/W. ``all_sum``'s backward is again a sum
over the processes (the adjoint of a sum), so after ``sum_gradients`` every process holds the
gradient of the whole batch's loss: the single-process gradient, up to the order of float sums.
A parameter without a gradient on any process keeps none (as alone, where Adam skips it).

Validation, AEA and ALP decisions are made alike on every process (each evaluates the whole
validation split; the ALP entropy sums are summed here), and only process 0 writes logs and
checkpoints. Whole epochs match one process (tests/test_distributed.py). Limits: a batch needs at
least W rows (``share`` refuses fewer); dropout outside the sparse layers and SM4EncoderLayer
(torch's ``nn.MultiheadAttention`` of a dense baseline) draws from each process's own stream.
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
    """This process's rows of a batch ``(inputs dict, target)`` and the fraction of the batch they are.

    ValueError when the batch has fewer rows than there are processes (one would hold none)."""
    world = world_size() if world is None else world
    index = rank() if index is None else index
    inputs, target = batch
    if world == 1:
        return batch, 1.0
    rows = target.shape[0]
    if rows < world:
        raise ValueError(f"a batch of {rows} rows cannot be shared by {world} processes: use a batch size of at least "
                         f"{world} (or fewer processes)")
    return ({name: x[index::world] for name, x in inputs.items()}, target[index::world]), len(range(index, rows, world)) / rows


class _AllSum(torch.autograd.Function):
    """Sum over the processes; its backward sums the gradients over the processes (the adjoint)."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes, differentiable (see the module docstring); itself alone."""
    return _AllSum.apply(tensor) if active() else tensor


def sum_gradients(parameters) -> None:
    """Sum every gradient over the processes (one all-reduce for all of them). A parameter with a
    gradient on some process gets zeros where it has none; one with none anywhere keeps none."""
    if not active():
        return
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        return
    device = parameters[0].device
    # Which parameters have a gradient anywhere (a host read once a step, a handful of bytes).
    has = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=device)
    dist.all_reduce(has)
    used = [p for p, count in zip(parameters, has.tolist()) if count]
    for parameter in used:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    for dtype in dict.fromkeys(p.grad.dtype for p in used):  # one flat buffer per dtype
        grads = [p.grad for p in used if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


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
