"""``BatchNorm1d`` whose training statistics are over the whole batch under data parallelism.

The heads of SM4Model end in a BatchNorm over the batch. Inside a data-parallel share
(``sm4.modules.batch_share``: every training forward of the trainer, one process too) each
process holds only its rows, so the mean and the variance are summed over the processes (a
differentiable all-sum: the gradient of every process's loss reaches every process's rows, as in
one process), in float64, and the running statistics are updated with the whole batch's, alike on
every process. torch's ``SyncBatchNorm`` does the same but only for GPU tensors (it refuses CPU
ones, where gloo runs). Outside a share (evaluation, plain use) it is ``nn.BatchNorm1d`` itself;
its state_dict is nn.BatchNorm1d's.
"""

import torch
from torch import nn

from ..modules import batch_share


class BatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d over (N, C) inputs, with whole-batch statistics inside a share of W > 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = batch_share.current()
        if share is None or not self.training or x.dim() != 2:
            return super().forward(x)
        return self._whole_batch(x, share.rows)

    def _whole_batch(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """x (local rows, C) -> (local rows, C), normalised with the statistics of all ``rows``."""
        if rows < 2:
            raise ValueError(f"BatchNorm1d: expected more than 1 value per channel when training, got a batch of {rows}")
        # In float64: a head's outputs can vary over the batch a thousand times less than their
        # mean (near-identical pooled features early in training), and the centring then loses
        # digits that fp32 partial sums, added in another order by each number of processes,
        # lose differently. Two passes (mean, then the centred squares): E[x^2] - E[x]^2 cancels.
        values = x.double()
        mean = batch_share.all_sum(values.sum(0)) / rows
        centred = values - mean
        var = batch_share.all_sum((centred * centred).sum(0)) / rows  # biased: what normalises
        out = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = var * (rows / (rows - 1))
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(x.dtype)
