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
over the processes (the adjoint of a sum), so after ``GradientSum`` every process holds the
gradient of the whole batch's loss: the single-process gradient, up to the order of float sums.
A parameter without a gradient on any process keeps none (as alone, where Adam skips it).

Validation, AEA and ALP decisions are made alike on every process (each evaluates the whole
validation split; the ALP entropy sums are summed here), and only process 0 writes logs and
checkpoints. Whole epochs match one process (tests/test_distributed.py). Limits: a batch needs at
least W rows (``share`` refuses fewer); a module drawing from torch's generator inside the model
(a plain ``nn.Dropout`` with p > 0 added by a user) draws from each process's own stream. sm4's
models have none: the dense baselines' attention is ``sm4.modules.dense_attention``.
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


class GradientSum:
    """Sums the gradients of a fixed list of parameters over the processes, once a step: one
    all-reduce per dtype of a flat buffer of every trainable parameter (zeros where this process
    has no gradient) with each process's "has a gradient" flags appended. A parameter with a
    gradient on some process ends with the sum; one with none anywhere keeps None (as alone, where
    Adam skips it).

    Which parameters have a gradient anywhere is read to the host only when this process's own set
    of parameters with gradients is one it has not seen (the first step, a step with another set of
    tasks): then it is cached under that set. In the steady state there is no host read; each step
    compares the reduced flags with the cached answer on the device, and ``check()`` (once an epoch)
    raises if they ever differed. They agree as long as equal local sets give equal global ones,
    which holds because every process runs the same forward over the same tasks each step; the
    buffers are alike on every process whatever the sets, so the collectives always match.
    ``host_reads`` counts the reads."""

    def __init__(self, parameters):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.host_reads = 0
        self._used = {}  # local flags (tuple of bools) -> which parameters have a gradient anywhere
        self._mismatch = None  # device bool: a step whose reduced flags differed from the cached ones

    def __call__(self) -> None:
        if not active() or not self.parameters:
            return
        local = tuple(p.grad is not None for p in self.parameters)
        groups = {}  # dtype -> parameters, in order (one flat buffer each)
        for p in self.parameters:
            groups.setdefault(p.dtype, []).append(p)
        summed, counts = {}, None
        for dtype, parameters in groups.items():
            parts = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in parameters]
            if counts is None:  # the flags ride along in the first buffer (small integers: exact in any float)
                parts.append(torch.tensor(local, dtype=dtype, device=parameters[0].device))
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            if counts is None:
                counts = flat[-len(local):]
            sizes = [p.numel() for p in parameters]
            for p, piece in zip(parameters, flat[:sum(sizes)].split(sizes)):
                summed[p] = piece.view_as(p)
        used = self._used.get(local)
        if used is None:
            used = self._used[local] = tuple(bool(count) for count in counts.tolist())
            self.host_reads += 1
        else:
            differs = ((counts > 0) != torch.tensor(used, device=counts.device)).any()
            self._mismatch = differs if self._mismatch is None else self._mismatch | differs
        for p, anywhere in zip(self.parameters, used):
            if not anywhere:
                p.grad = None
            elif p.grad is None:
                p.grad = summed[p].clone()
            else:
                p.grad.copy_(summed[p])

    def check(self) -> None:
        """Raise if a step's parameters with gradients anywhere were not the cached ones (a host
        read: call it where the loop reads its losses anyway)."""
        if self._mismatch is not None and bool(self._mismatch):
            raise RuntimeError("data-parallel: the processes' sets of parameters with gradients differed in a way the "
                               "cached sets did not predict (a data-dependent missing gradient); the summed gradients "
                               "may have kept None where a process had one")
        self._mismatch = None


def sum_gradients(parameters) -> None:
    """Sum every gradient over the processes, once (see ``GradientSum``; a training loop keeps one
    ``GradientSum`` so that the host read is made once per set of parameters, not every step)."""
    GradientSum(parameters)()


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
