"""Python side of the compiled grouped-GEMM ops: fake kernels and the two primitives with the
signatures of sm4.reference.grouped_mm / grouped_weight_grad, from which sm4.grouped builds the
layers (the autograd lives there, on top of the primitives, as in ScatterMoE)."""

import torch

from .. import _extension
from ..compute_dtype import expert_compute_dtype
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


if "grouped_ffn_backward" in _extension.compiled_ops():  # absent from an extension built before it

    @torch.library.register_fake("sm4::grouped_ffn_backward")
    def _grouped_ffn_backward_fake(grad_out, x, w1, w2, preact, expert_offsets, gather_index, scatter_index, activation,
                                   compute_grad_x, compute_bias1, compute_bias2):
        experts, d_in, hidden = w1.shape
        return (x.new_empty((x.shape[0] if compute_grad_x else 0, d_in)), w1.new_empty(w1.shape),
                x.new_empty((experts if compute_bias1 else 0, hidden)), w2.new_empty(w2.shape),
                x.new_empty((experts if compute_bias2 else 0, w2.shape[2])))


# This module serves the cpu and the cuda backends: the fused backward is taken only where the
# extension has its kernel for x's device (CPU today), and only for fp32 (its one dtype).
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@torch._dynamo.assume_constant_result  # a registry lookup dynamo cannot trace; constant per key
def _has_fused_kernel(dispatch_key: str) -> bool:
    return _extension.has_kernel("grouped_ffn_backward", dispatch_key)


def ffn_backward(grad_out, x, w1, w2, preact, expert_offsets, gather_index, scatter_index, activation, compute_grad_x,
                 compute_bias1, compute_bias2):
    """sm4::grouped_ffn_backward's five gradients, or None where it has no kernel for these
    tensors (another device, a dtype other than fp32): the caller then runs the layered backward."""
    key = _DISPATCH_KEYS.get(x.device.type)
    if key is None or not _has_fused_kernel(key):
        return None
    if any(t.dtype != torch.float32 for t in (grad_out, x, w1, w2, preact)):
        return None
    return torch.ops.sm4.grouped_ffn_backward(grad_out, x, w1, w2, preact, expert_offsets, gather_index, scatter_index,
                                              activation, compute_grad_x, compute_bias1, compute_bias2)


# bf16 / fp16 on a CPU without a bf16 matrix unit compute in fp32 (~10x faster there; see compute_dtype.py).
OPS = make_backend_ops(GroupedKernels(grouped_mm, grouped_weight_grad, ffn_backward, expert_compute_dtype))
