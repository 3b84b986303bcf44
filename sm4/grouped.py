"""The expert layers of every kernel backend, built once from its two grouped-GEMM primitives.

A backend (cpu, cuda, triton) supplies ``grouped_mm`` and ``grouped_weight_grad`` (contract in
csrc/sm4_ops.cpp; plain-PyTorch truth in sm4/reference.py). This module turns them into
differentiable layers, as ScatterMoE does, with the backward written out:

    unfused (x already in expert order, the public grouped_linear / grouped_ffn):
        x_sorted (N, in) --GEMM--> y_sorted (N, out)
    fused (the fast path of moe_linear / moe_ffn; no x_sorted copy is made):
        x (T, in) --gather rows in the GEMM prologue--> GEMM --scatter in the epilogue-->
        expert outputs in token order (T * k, out) --combine: weighted sum over each token's k rows--> (T, out)

Backward (per GEMM ``out = act(a @ W + b)``): dA is a grouped GEMM on the transposed weights
(fused: scattered back to token order, then summed over the k rows of each token), dW and db are
per-expert reductions (grouped_weight_grad), d-gates are row dot products in the combine. Every
reduction has a fixed order: results are deterministic.

FFN backward: where the backend supplies ``ffn_backward`` for the tensors at hand (the cpu
backend, fp32), the whole FFN backward is one op (dH with the GELU derivative in its epilogue,
dW2/db2, dW1/db1 and dX from the same cache-resident tiles); elsewhere, or with
``FUSED_FFN_BACKWARD`` off (``SM4_FUSED_FFN_BACKWARD=0``), the layered backward below.

FFN memory: by default the forward saves the pre-activation hidden layer (N x h elements, in x's
dtype) for the backward. ``recompute_hidden=True`` saves nothing extra and recomputes it with one
more grouped GEMM in the backward: that trades 1/3 more backward FLOPs of the first layer for
N * h elements of activation memory (at T = 16384, k = 2, h = 14336 in bf16: 0.9 GiB per layer).
"""

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._double_backward import refuse_double_backward
from .reference import ACTIVATION_CODES
from .types import RoutingMetadata


# The fused FFN backward (one pass per expert tile for dH, GELU', dW2/db2, dW1/db1 and dX; the
# cpu backend's sm4::grouped_ffn_backward) where the backend has one for the tensors at hand; on
# by default, off with SM4_FUSED_FFN_BACKWARD=0 or by setting this flag (read at each backward).
FUSED_FFN_BACKWARD = os.environ.get("SM4_FUSED_FFN_BACKWARD", "1") != "0"


class GroupedKernels(NamedTuple):
    """A backend's grouped-GEMM primitives, with sm4.reference.grouped_mm's signatures.

    compute_dtype (optional): ``(dtype, device) -> dtype``, the dtype the layers compute in for
    inputs of dtype on device (the cpu backend: fp32 for bf16 / fp16 on CPUs without a bf16
    matrix unit, sm4/compute_dtype.py); inputs and parameters are cast to it (differentiably: the
    gradients come back in each parameter's dtype) and the output back to x's dtype.

    ffn_backward (optional): ``(grad_out, x, w1, w2, preact, offsets, gather, scatter, activation,
    compute_grad_x, compute_bias1, compute_bias2) -> (grad_x, grad_w1, grad_b1, grad_w2, grad_b2)``,
    the whole FFN-expert backward in one op, or None when it has no kernel for these tensors
    (device, dtype): the layers then take the layered backward.
    """

    grouped_mm: object
    grouped_weight_grad: object
    ffn_backward: object = None
    compute_dtype: object = None  # (dtype, device) -> dtype the GEMMs run in; None: x's own


def _sum_token_rows(rows: torch.Tensor, tokens: int) -> torch.Tensor:
    """(T * k, d) token-order rows -> (T, d), the k rows of each token summed in fp32 (in order)."""
    k = rows.shape[0] // max(tokens, 1)
    if k == 1:
        return rows
    summed = rows.view(tokens, k, rows.shape[1]).sum(1, dtype=torch.promote_types(rows.dtype, torch.float32))
    return summed.to(rows.dtype)


def make_layers(kernels: GroupedKernels):
    """(expert_linear_rows, expert_ffn_rows, expert_linear_combined, expert_ffn_combined): the
    differentiable grouped layers of one backend (the last two are the fused linear and FFN layers
    with their combine, each one autograd node).

    Both take ``x`` and the GEMM index pair: ``gather`` (M,) reads row gather[i] of x for sorted
    row i, ``scatter`` (M,) writes its output to row scatter[i] of a (num_out_rows, out) result.
    None/None is the unfused layer over x_sorted. In the fused layer gather = scatter // k (the
    token of each assignment), which the backward relies on to sum a token's k input gradients.
    """
    grouped_mm, weight_grad, ffn_backward, compute_dtype = kernels

    def compute_in(x):
        return x.dtype if compute_dtype is None else compute_dtype(x.dtype, x.device)

    def input_grad(grad_rows, weight, offsets, scatter, tokens, read_index):
        """dA of ``a @ W``: grad rows (read through read_index) times W^T, back to a's rows."""
        if scatter is None:
            return grouped_mm(grad_rows, weight, None, offsets, gather_index=read_index, transpose_weight=True)[0]
        token_rows = grouped_mm(grad_rows, weight, None, offsets, gather_index=read_index, scatter_index=scatter,
                                num_out_rows=scatter.shape[0], transpose_weight=True)[0]
        return _sum_token_rows(token_rows, tokens)

    class ExpertLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, offsets, gather, scatter, num_out_rows):
            out, _ = grouped_mm(x, weight, bias, offsets, gather_index=gather, scatter_index=scatter,
                                num_out_rows=num_out_rows)
            ctx.save_for_backward(x, weight, offsets, gather, scatter)
            ctx.has_bias = bias is not None
            return out

        @staticmethod
        def backward(ctx, grad_out):
            refuse_double_backward(f"sm4 expert_linear / grouped_linear ({grouped_mm.__module__} kernels)")
            x, weight, offsets, gather, scatter = ctx.saved_tensors
            grad_out = grad_out.contiguous()
            grad_x = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                # Rows of the output are at scatter[i] (token order) or i; so are their gradients.
                grad_x = input_grad(grad_out, weight, offsets, scatter if gather is not None else None, x.shape[0], scatter)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                want_bias = ctx.has_bias and ctx.needs_input_grad[2]
                grad_weight, grad_bias = weight_grad(x, grad_out, offsets, a_index=gather, grad_index=scatter,
                                                     compute_bias=want_bias)
                grad_bias = grad_bias if want_bias else None
            return grad_x, grad_weight, grad_bias, None, None, None, None

    def linear_combine_forward(x, weight, bias, gates, offsets, gather, scatter):
        """(token-order expert rows (M, out), their gated combine (M / k, out)); see ExpertLinearCombine."""
        rows, _ = grouped_mm(x, weight, bias, offsets, gather_index=gather, scatter_index=scatter,
                             num_out_rows=scatter.shape[0])
        return rows, combine(rows, gates)

    class ExpertLinearCombine(torch.autograd.Function):
        """The fused linear expert layer and its combine as one autograd node (moe_linear, moe_qkv).

        forward: rows = grouped GEMM of x's gathered rows, scattered to token order (M = T' * k rows,
        T' = gates.shape[0]); y = combine(rows, gates) (T', out). As two nodes (ExpertLinear, then
        combine's multiply / addcmul on row slices) the backward ran a dozen small autograd nodes:
        select/slice backwards that each zero-fill a (T, k, out) buffer, per-rank multiplies, and
        the gradient accumulation into rows. Here it is one pass each:
            grad_rows (M, out) = gates (T', k, 1) * grad_y (T', 1, out), made once and read by both
                the input-gradient GEMM and the weight gradient (the "gathered dY" of both);
            grad_gates (T', k) = row dot products <rows, grad_y> (the forward's rows are saved);
            grad_x, grad_weight, grad_bias as ExpertLinear's backward.
        Inactive ranks have zero rows and zero gates, so their gradients are exactly zero.
        """

        @staticmethod
        def forward(ctx, x, weight, bias, gates, offsets, gather, scatter):
            rows, y = linear_combine_forward(x, weight, bias, gates, offsets, gather, scatter)
            ctx.save_for_backward(x, weight, gates, offsets, gather, scatter, rows if ctx.needs_input_grad[3] else None)
            ctx.has_bias = bias is not None
            return y

        @staticmethod
        def backward(ctx, grad_y):
            refuse_double_backward(f"sm4 expert_linear ({grouped_mm.__module__} kernels)")
            x, weight, gates, offsets, gather, scatter, rows = ctx.saved_tensors
            need = ctx.needs_input_grad
            tokens, k = gates.shape
            out_features = grad_y.shape[1]
            cdt = torch.promote_types(grad_y.dtype, torch.float32)
            grad_c = grad_y.to(cdt)
            grad_x = grad_weight = grad_bias = grad_gates = None
            if need[3]:
                grad_gates = (rows.view(tokens, k, out_features).to(cdt) * grad_c[:, None]).sum(-1).to(gates.dtype)
            if need[0] or need[1] or need[2]:
                grad_rows = (gates.to(cdt)[..., None] * grad_c[:, None]).to(x.dtype).view(tokens * k, out_features)
                if need[0]:
                    grad_x = input_grad(grad_rows, weight, offsets, scatter, x.shape[0], scatter)
                if need[1] or need[2]:
                    want_bias = ctx.has_bias and need[2]
                    grad_weight, grad_bias = weight_grad(x, grad_rows, offsets, a_index=gather, grad_index=scatter,
                                                         compute_bias=want_bias)
                    grad_bias = grad_bias if want_bias else None
            return grad_x, grad_weight, grad_bias, grad_gates, None, None, None

    def ffn_forward(x, w1, b1, w2, b2, offsets, gather, scatter, num_out_rows, activation, save):
        """(output rows (num_out_rows, out), the pre-activation (N, h) if save else None)."""
        hidden, pre = grouped_mm(x, w1, b1, offsets, gather_index=gather, activation=ACTIVATION_CODES[activation],
                                 save_preact=save)
        out, _ = grouped_mm(hidden, w2, b2, offsets, scatter_index=scatter, num_out_rows=num_out_rows)
        return out, pre if save else None

    def ffn_grads(grad_out, x, w1, b1, w2, offsets, gather, scatter, pre, activation, has_bias, need):
        """(grad_x, grad_w1, grad_b1, grad_w2, grad_b2) of the FFN experts, each None unless
        need[i] (need: x, w1, b1, w2, b2); grad_out (num_out_rows, out) contiguous, read through
        scatter. The fused op where the backend has one for these tensors, else layered."""
        if pre is None:  # recompute_hidden: one more GEMM instead of keeping N x h elements
            pre = grouped_mm(x, w1, b1, offsets, gather_index=gather)[0]
        want_b1, want_b2 = has_bias[0] and need[2], has_bias[1] and need[4]
        fused = None
        if FUSED_FFN_BACKWARD and ffn_backward is not None and activation in ("gelu", "gelu_tanh"):
            fused = ffn_backward(grad_out, x, w1, w2, pre, offsets, gather, scatter, ACTIVATION_CODES[activation],
                                 need[0], want_b1, want_b2)
        if fused is not None:
            grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = fused
            return (grad_x if need[0] else None, grad_w1 if need[1] else None, grad_b1 if want_b1 else None,
                    grad_w2 if need[3] else None, grad_b2 if want_b2 else None)
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if need[3] or need[4]:
            hidden = F.gelu(pre, approximate=approximate)
            grad_w2, grad_b2 = weight_grad(hidden, grad_out, offsets, grad_index=scatter, compute_bias=want_b2)
        if need[0] or need[1] or need[2]:  # dH and dPre only when a first-layer gradient wants them
            grad_hidden = grouped_mm(grad_out, w2, None, offsets, gather_index=scatter, transpose_weight=True)[0]
            grad_pre = torch.ops.aten.gelu_backward(grad_hidden, pre, approximate=approximate)
            if need[0]:
                grad_x = input_grad(grad_pre, w1, offsets, scatter if gather is not None else None, x.shape[0], None)
            if need[1] or need[2]:
                grad_w1, grad_b1 = weight_grad(x, grad_pre, offsets, a_index=gather, compute_bias=want_b1)
        return (grad_x, grad_w1 if need[1] else None, grad_b1 if want_b1 else None,
                grad_w2 if need[3] else None, grad_b2 if want_b2 else None)

    class ExpertFFN(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w1, b1, w2, b2, offsets, gather, scatter, num_out_rows, activation, recompute_hidden):
            # The pre-activation is written out only when a backward will read it.
            save = not recompute_hidden and any(ctx.needs_input_grad)
            out, pre = ffn_forward(x, w1, b1, w2, b2, offsets, gather, scatter, num_out_rows, activation, save)
            ctx.save_for_backward(x, w1, b1, w2, offsets, gather, scatter, pre)
            ctx.has_bias = (b1 is not None, b2 is not None)
            ctx.activation = activation
            return out

        @staticmethod
        def backward(ctx, grad_out):
            refuse_double_backward(f"sm4 expert_ffn / grouped_ffn ({grouped_mm.__module__} kernels)")
            x, w1, b1, w2, offsets, gather, scatter, pre = ctx.saved_tensors
            grads = ffn_grads(grad_out.contiguous(), x, w1, b1, w2, offsets, gather, scatter, pre, ctx.activation,
                              ctx.has_bias, ctx.needs_input_grad[:5])
            return (*grads, None, None, None, None, None, None)

    def ffn_combine_forward(x, w1, b1, w2, b2, gates, offsets, gather, scatter, activation, save):
        """(token-order FFN rows (M, out), the pre-activation or None, combine (M / k, out))."""
        rows, pre = ffn_forward(x, w1, b1, w2, b2, offsets, gather, scatter, scatter.shape[0], activation, save)
        return rows, pre, combine(rows, gates)

    class ExpertFFNCombine(torch.autograd.Function):
        """The fused FFN expert layer and its combine as one autograd node (moe_ffn, expert_ffn).

        forward: rows (M = T' * k, out) = FFN experts of x's gathered rows, scattered to token
        order; y = combine(rows, gates) (T', out). The backward, as ExpertLinearCombine's: the
        gated output gradient grad_rows = gates (T', k, 1) * grad_y (T', 1, out) is made once and
        is the FFN backward's grad_out (the fused op where it applies, else layered); d-gates are
        row dot products <rows, grad_y> on the saved rows (saved only when gates want a gradient).
        """

        @staticmethod
        def forward(ctx, x, w1, b1, w2, b2, gates, offsets, gather, scatter, activation, recompute_hidden):
            need = ctx.needs_input_grad
            save = not recompute_hidden and any(need[:5])
            rows, pre, y = ffn_combine_forward(x, w1, b1, w2, b2, gates, offsets, gather, scatter, activation, save)
            ctx.save_for_backward(x, w1, b1, w2, gates, offsets, gather, scatter, pre, rows if need[5] else None)
            ctx.has_bias = (b1 is not None, b2 is not None)
            ctx.activation = activation
            return y

        @staticmethod
        def backward(ctx, grad_y):
            refuse_double_backward(f"sm4 expert_ffn ({grouped_mm.__module__} kernels)")
            x, w1, b1, w2, gates, offsets, gather, scatter, pre, rows = ctx.saved_tensors
            need = ctx.needs_input_grad
            tokens, k = gates.shape
            out_features = grad_y.shape[1]
            cdt = torch.promote_types(grad_y.dtype, torch.float32)
            grad_c = grad_y.to(cdt)
            grads = (None,) * 5
            grad_gates = None
            if need[5]:
                grad_gates = (rows.view(tokens, k, out_features).to(cdt) * grad_c[:, None]).sum(-1).to(gates.dtype)
            if any(need[:5]):
                grad_rows = (gates.to(cdt)[..., None] * grad_c[:, None]).to(x.dtype).view(tokens * k, out_features)
                grads = ffn_grads(grad_rows, x, w1, b1, w2, offsets, gather, scatter, pre, ctx.activation, ctx.has_bias,
                                  need[:5])
            return (*grads, grad_gates, None, None, None, None, None)

    def expert_linear_rows(x, weight, bias, offsets, gather=None, scatter=None, num_out_rows=None):
        rows = x.shape[0] if num_out_rows is None else num_out_rows
        cdt = compute_in(x)
        out = ExpertLinear.apply(x.to(cdt).contiguous(), _as(weight, cdt), _as(bias, cdt), offsets, gather, scatter, rows)
        return out.to(x.dtype)

    def expert_ffn_rows(x, w1, b1, w2, b2, offsets, activation, recompute_hidden, gather=None, scatter=None, num_out_rows=None):
        rows = x.shape[0] if num_out_rows is None else num_out_rows
        cdt = compute_in(x)
        out = ExpertFFN.apply(x.to(cdt).contiguous(), _as(w1, cdt), _as(b1, cdt), _as(w2, cdt), _as(b2, cdt), offsets,
                              gather, scatter, rows, activation, recompute_hidden)
        return out.to(x.dtype)

    def expert_linear_combined(x, weight, bias, gates, offsets, gather, scatter):
        """y (T', out) = combine(rows of the linear experts in token order, gates (T', k))."""
        cdt = compute_in(x)
        xc, weight, bias = x.to(cdt).contiguous(), _as(weight, cdt), _as(bias, cdt)
        gates = gates.contiguous()
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xc, weight, bias, gates))):
            return linear_combine_forward(xc, weight, bias, gates, offsets, gather, scatter)[1].to(x.dtype)  # no node
        return ExpertLinearCombine.apply(xc, weight, bias, gates, offsets, gather, scatter).to(x.dtype)

    def expert_ffn_combined(x, w1, b1, w2, b2, gates, offsets, gather, scatter, activation, recompute_hidden):
        """y (T', out) = combine(rows of the FFN experts in token order, gates (T', k))."""
        cdt = compute_in(x)
        xc, w1, b1, w2, b2 = x.to(cdt).contiguous(), _as(w1, cdt), _as(b1, cdt), _as(w2, cdt), _as(b2, cdt)
        gates = gates.contiguous()
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xc, w1, b1, w2, b2, gates))):
            return ffn_combine_forward(xc, w1, b1, w2, b2, gates, offsets, gather, scatter, activation, False)[2].to(x.dtype)
        return ExpertFFNCombine.apply(xc, w1, b1, w2, b2, gates, offsets, gather, scatter, activation,
                                      recompute_hidden).to(x.dtype)

    return expert_linear_rows, expert_ffn_rows, expert_linear_combined, expert_ffn_combined


def _as(parameter, dtype):
    """The kernels take weights in the compute dtype, contiguous (the cast and copy are differentiable)."""
    return None if parameter is None else parameter.to(dtype).contiguous()


def combine(token_rows: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs: (T * k, d) rows and (T, k) gates -> (T, d).

    Computed in promote(dtype, fp32), summed over the k rows in rank order, returned in the rows'
    dtype. Inactive ranks have zero rows and zero gates, so they add exactly zero. d-gates are
    the row dot products (autograd of this expression). For the usual small k, one multiply and
    k - 1 ``addcmul``s over (T, d) slices: about half the time of a broadcast multiply and a sum
    over the k axis (27 against 56 µs at T = 2304, k = 2, d = 64; 38 against 62 ms at T = 16384,
    d = 1024, on the development CPU), and far faster than a batched (1 x k) @ (k x d) matmul at
    small T. For large k the single reduction is cheaper than k ops.
    """
    tokens, k = gates.shape
    cdt = torch.promote_types(token_rows.dtype, torch.float32)
    rows = token_rows.view(tokens, k, token_rows.shape[1])
    weights = gates.to(cdt)
    if k > 8:
        return (weights.unsqueeze(-1) * rows).sum(1, dtype=cdt).to(token_rows.dtype)
    out = rows[:, 0] * weights[:, :1]
    for rank in range(1, k):
        out = torch.addcmul(out, rows[:, rank], weights[:, rank : rank + 1])
    return out.to(token_rows.dtype)


def make_backend_ops(kernels: GroupedKernels) -> dict:
    """The sm4.ops entry points (grouped_linear, grouped_ffn, expert_linear, expert_ffn) of a backend."""
    expert_linear_rows, expert_ffn_rows, expert_linear_combined, expert_ffn_combined = make_layers(kernels)

    def grouped_linear(x_sorted, weight, bias, expert_offsets):
        return expert_linear_rows(x_sorted, weight, bias, expert_offsets)

    def grouped_ffn(x_sorted, w1, b1, w2, b2, expert_offsets, activation="gelu", recompute_hidden=False):
        return expert_ffn_rows(x_sorted, w1, b1, w2, b2, expert_offsets, activation, recompute_hidden)

    def expert_linear(x, weight, bias, gates, metadata: RoutingMetadata):
        # gates (T, k), or (T, G, k) for G routings over one x in one launch (the fused Q/K/V):
        # each token's rows are then G groups of k, combined group by group.
        y = expert_linear_combined(x, weight, bias, gates.reshape(-1, gates.shape[-1]), metadata.expert_offsets,
                                   metadata.sorted_token, metadata.sorted_assignment)
        return y.view(*gates.shape[:-1], y.shape[1])

    def expert_ffn(x, w1, b1, w2, b2, gates, metadata: RoutingMetadata, activation="gelu", recompute_hidden=False):
        return expert_ffn_combined(x, w1, b1, w2, b2, gates, metadata.expert_offsets, metadata.sorted_token,
                                   metadata.sorted_assignment, activation, recompute_hidden)

    return {"grouped_linear": grouped_linear, "grouped_ffn": grouped_ffn, "expert_linear": expert_linear,
            "expert_ffn": expert_ffn}
