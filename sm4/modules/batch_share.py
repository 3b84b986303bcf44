"""Per-sample random draws and whole-batch sums, so that data-parallel training equals one process.

Under data parallelism (``sm4.training.distributed``) process r of W runs the model on rows
r, r + W, ... of each batch. For the run to be the single-process one, every sample must see the
random numbers it would see alone, and every statistic over the batch (the heads' BatchNorm, the
balancing loss's importance and load) must be over the whole batch. While a forward runs inside
``sharing(key, rows, index, world, reduce)`` (the trainer opens one per task and step, alone too):

- the router noise (``sm4.reference.router_noise``) and dropout (``Dropout``, ``dropout``) are
  drawn for the whole batch of ``rows`` samples from a generator seeded with ``key``, and this
  process keeps its rows: a sample gets the same numbers whatever the number of processes;
- ``all_sum(t)`` sums ``t`` over the processes with ``reduce`` (differentiable; t itself alone).

Outside a share (the default, and every evaluation) the draws come from torch's generator as in
plain PyTorch. The state is one module-level variable, not a ContextVar: torch.compile
(fullgraph=True) traces a module global (None outside a share).

Draws are made in the order the forward asks for them, which is the same on every process (one
model, one code path), and always for the whole batch: each process draws W times the numbers it
uses (small beside the forward).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference

_SHARE = None  # the Share of the forward running now, or None


class Share:
    """One forward's share of a batch: this process's rows ``index::world`` of ``rows`` samples.

    key: seeds the draws (e.g. from seed, epoch, step, task). reduce: sums a tensor over the
    processes (differentiable), None alone."""

    def __init__(self, key: int, rows: int, index: int = 0, world: int = 1, reduce=None):
        if not 0 <= index < world:
            raise ValueError(f"batch_share: index must be in [0, world={world}), got {index}")
        if rows < world:
            raise ValueError(f"batch_share: a batch of {rows} rows cannot be shared by {world} processes "
                             "(each needs at least one row)")
        self.key, self.rows, self.index, self.world, self.reduce = int(key), int(rows), index, world, reduce
        self.local_rows = len(range(index, rows, world))
        self._generators = {}

    def _generator(self, device) -> torch.Generator:
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, torch.get_device_module(device.type).current_device())
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device).manual_seed(self.key)
        return generator

    def draw(self, local_shape, device, fill) -> torch.Tensor:
        """This process's rows of the whole batch's float32 draws: ``fill(tensor, generator)`` fills
        a (rows, *local_shape[1:]) tensor in place; returns (local_rows, *local_shape[1:])."""
        if local_shape[0] != self.local_rows:
            raise ValueError(f"batch_share: a draw for {local_shape[0]} samples inside a share of {self.local_rows} "
                             f"rows (of {self.rows}); per-sample draws need the batch on dim 0")
        full = torch.empty((self.rows, *local_shape[1:]), dtype=torch.float32, device=device)
        fill(full, self._generator(device))
        return full if self.world == 1 else full[self.index::self.world]

    def router_noise(self, num_tokens: int, num_experts: int, device) -> torch.Tensor:
        """(T, E) standard-normal noise for T = local_rows * L tokens, sample-major (the flattened
        (B, L) tokens of the modules)."""
        if num_tokens % self.local_rows:
            raise ValueError(f"batch_share: router noise for {num_tokens} tokens inside a share of {self.local_rows} "
                             "samples: the tokens must be whole samples, (B, L) flattened")
        per_sample = (self.local_rows, num_tokens // self.local_rows, num_experts)
        return self.draw(per_sample, device, lambda t, g: t.normal_(generator=g)).reshape(num_tokens, num_experts)


def current() -> Share | None:
    """The share of the forward running now (None outside ``sharing``)."""
    return _SHARE


@contextlib.contextmanager
def sharing(key: int, rows: int, index: int = 0, world: int = 1, reduce=None):
    """Run the forwards of this block as rows ``index::world`` of a batch of ``rows`` samples (see
    the module docstring). Not re-entrant across threads: one training loop per process."""
    global _SHARE
    previous, previous_noise = _SHARE, reference.sample_noise
    _SHARE = Share(key, rows, index, world, reduce)
    reference.sample_noise = _SHARE.router_noise
    try:
        yield _SHARE
    finally:
        _SHARE, reference.sample_noise = previous, previous_noise


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes of the current share (differentiable); itself alone."""
    share = _SHARE
    if share is None or share.reduce is None:
        return tensor
    return share.reduce(tensor)


def dropout(x: torch.Tensor, p: float, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``F.dropout``, with a mask drawn per sample (samples on dim 0) inside a share."""
    share = _SHARE
    if share is None or not training or p == 0.0:
        return F.dropout(x, p, training, inplace)
    if p >= 1.0:
        return x * 0.0
    keep = share.draw(x.shape, x.device, lambda t, g: t.bernoulli_(1.0 - p, generator=g))
    return x * (keep * (1.0 / (1.0 - p))).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask, inside a share, is drawn per sample (samples on dim 0: batch-first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.inplace)
