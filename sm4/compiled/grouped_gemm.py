"""Python side of the compiled grouped-GEMM ops: fake kernels and the two primitives with the
signatures of sm4.reference.grouped_mm / grouped_weight_grad, from which sm4.grouped builds the
layers (the autograd lives there, on top of the primitives, as in ScatterMoE)."""

import torch

from ..grouped import GroupedKernels, make_backend_ops


@torch.library.register_fake("sm4::grouped_mm")
def _grouped_mm_fake(a, weight, bias, expert_offsets, gather_index, scatter_index, scatter_scale, num_out_rows,
                     transpose_weight, activation, save_preact):
    out_features = weight.shape[1] if transpose_weight else weight.shape[2]
    rows = gather_index.shape[0] if gather_index is not None else a.shape[0]
    keep = save_preact and activation != 0
    return a.new_empty((num_out_rows, out_features)), a.new_empty((rows if keep else 0, out_features))


@torch.library.register_fake("sm4::grouped_weight_grad")
def _grouped_weight_grad_fake(a, grad, expert_offsets, a_index, grad_index, compute_bias):
    experts = expert_offsets.shape[0] - 1
    return a.new_empty((experts, a.shape[1], grad.shape[1])), a.new_empty((experts if compute_bias else 0, grad.shape[1]))


def grouped_mm(a, weight, bias, expert_offsets, gather_index=None, scatter_index=None, scatter_scale=None,
               num_out_rows=None, transpose_weight=False, activation=0, save_preact=False):
    rows = gather_index.shape[0] if gather_index is not None else a.shape[0]
    return torch.ops.sm4.grouped_mm(a, weight, bias, expert_offsets, gather_index, scatter_index, scatter_scale,
                                    rows if num_out_rows is None else num_out_rows, transpose_weight, activation,
                                    save_preact)


def grouped_weight_grad(a, grad, expert_offsets, a_index=None, grad_index=None, compute_bias=True):
    return torch.ops.sm4.grouped_weight_grad(a, grad, expert_offsets, a_index, grad_index, compute_bias)


OPS = make_backend_ops(GroupedKernels(grouped_mm, grouped_weight_grad))
