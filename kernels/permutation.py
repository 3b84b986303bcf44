"""Triton kernels of token permutation: routing metadata, permute, unpermute and their backwards.

Pipeline position: between gating and the expert GEMMs (see sm4/types.py RoutingMetadata).

    routing_metadata: expert_ids (T, k) -> counts (E,), offsets (E + 1,), sorted_assignment (N,),
                      sorted_token (N,), assignment_row (T, k)          [N = T * k, all int64]
    permute:          x (T, d) -> x_sorted (N, d)      row assignment_row[t, r] = x[t]
    unpermute:        y_sorted (N, d), gates (T, k) -> y (T, d) = sum_r gates[t, r] * row

Metadata is a stable counting sort over E + 1 bins (the last holds inactive assignments, which
thus fill the padding rows in (token, rank) order, as in the reference): a block histogram
kernel with integer atomics (exact), block-ordered start rows from two int64 cumsums in PyTorch,
then a scatter kernel where each assignment's rank within its block and bin is counted by a
pairwise comparison (stable, no atomics). The combine kernels gather a token's ranks in order;
nothing is scatter-added, so every result is deterministic. All offsets are int64.

Bad metadata (GPU tensors are not validated: a check would be a host sync; sm4.ops validates CPU
tensors). No kernel reads or writes outside its tensors: an expert id outside [-1, E) counts as
inactive (-1); an assignment_row value outside [-1, N) is an inactive rank: permute drops it (its
x row is written nowhere), unpermute and permute's backward add nothing for it, and unpermute's
backward gives it no gradient. The padding zeroing reads offsets[E] and clamps it into [0, N).
Output rows that no valid assignment writes hold unspecified values, in-bounds.
"""

import torch
import triton
import triton.language as tl

from sm4._double_backward import differentiable_permute_backward, differentiable_unpermute_backward

# Assignments per program of the sort: the in-block rank costs BLOCK^2 comparisons.
SORT_BLOCK = 128
# The scatter's 128 x 128 comparison tile is 64 values per thread at 8 warps (128 at Triton's
# default 4, which spilled 184 bytes per thread on sm_90).
SCATTER_WARPS = 8


@triton.jit
def _bin_counts_kernel(ids_ptr, block_counts_ptr, num_assignments, num_experts, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = i < num_assignments
    e = tl.load(ids_ptr + i, mask=in_range, other=-1).to(tl.int64)
    bins = tl.where((e < 0) | (e >= num_experts), num_experts, e)  # an id outside [0, E): inactive
    tl.atomic_add(block_counts_ptr + pid * (num_experts + 1) + bins, tl.full((BLOCK,), 1, tl.int64), mask=in_range)


@triton.jit
def _scatter_kernel(ids_ptr, block_start_ptr, sorted_assignment_ptr, sorted_token_ptr, assignment_row_ptr,
                    num_assignments, num_experts, k, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    i = pid * BLOCK + lanes.to(tl.int64)
    in_range = i < num_assignments
    e = tl.load(ids_ptr + i, mask=in_range, other=-1).to(tl.int64)
    inactive = (e < 0) | (e >= num_experts)
    bins = tl.where(inactive, num_experts, e).to(tl.int32)  # in [0, E]: int32 halves the compare tile
    # Rank among the earlier assignments of this block in the same bin: keeps the sort stable. The
    # (BLOCK, BLOCK) comparison is summed in int32 (a rank is < BLOCK).
    same_bin_before = (bins[:, None] == bins[None, :]) & (lanes[None, :] < lanes[:, None]) & in_range[None, :]
    rank = tl.sum(same_bin_before.to(tl.int32), axis=1)
    start = tl.load(block_start_ptr + pid * (num_experts + 1) + bins, mask=in_range, other=0)
    row = start + rank
    tl.store(sorted_assignment_ptr + row, i, mask=in_range)
    tl.store(sorted_token_ptr + row, i // k, mask=in_range)
    tl.store(assignment_row_ptr + i, tl.where(inactive, -1, row), mask=in_range)


@triton.jit
def _scatter_rows_kernel(x_ptr, rows_ptr, out_ptr, num_tokens, num_rows, dim, K: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (tokens[:, None] < num_tokens) & (cols[None, :] < dim)
    x = tl.load(x_ptr + tokens[:, None] * dim + cols[None, :], mask=mask)
    for r in tl.static_range(K):
        row = tl.load(rows_ptr + tokens * K + r, mask=tokens < num_tokens, other=-1)
        valid = (row >= 0) & (row < num_rows)  # a row outside [0, N) is dropped
        tl.store(out_ptr + tl.where(valid, row, 0)[:, None] * dim + cols[None, :], x, mask=mask & valid[:, None])


@triton.jit
def _zero_padding_kernel(out_ptr, offsets_ptr, num_experts, num_rows, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    active = tl.load(offsets_ptr + num_experts)  # A, read on the device: no host sync
    mask = (rows[:, None] >= active) & (rows[:, None] < num_rows) & (cols[None, :] < dim)
    tl.store(out_ptr + rows[:, None] * dim + cols[None, :], tl.zeros((BLOCK_R, BLOCK_D), out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(src_ptr, weights_ptr, rows_ptr, out_ptr, num_tokens, num_rows, dim, K: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    token_mask = tokens < num_tokens
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for r in tl.static_range(K):
        row = tl.load(rows_ptr + tokens * K + r, mask=token_mask, other=-1)
        row = tl.where(row < num_rows, row, -1)  # a row outside [0, N) is an inactive rank: adds nothing
        active = (row >= 0)[:, None] & (cols[None, :] < dim)
        values = tl.load(src_ptr + row[:, None] * dim + cols[None, :], mask=active, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + tokens * K + r, mask=token_mask, other=0.0).to(tl.float32)
            values = values * weight[:, None]
        acc += tl.where(active, values, 0.0)  # an inactive rank adds exactly nothing
    tl.store(out_ptr + tokens[:, None] * dim + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=token_mask[:, None] & (cols[None, :] < dim))


@triton.jit
def _unpermute_backward_kernel(grad_y_ptr, y_sorted_ptr, gates_ptr, rows_ptr, grad_sorted_ptr, grad_gates_ptr,
                               num_tokens, num_rows, dim, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                               D_BLOCKS: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    token_mask = tokens < num_tokens
    for r in tl.static_range(K):
        row = tl.load(rows_ptr + tokens * K + r, mask=token_mask, other=-1)
        row = tl.where(row < num_rows, row, -1)  # a row outside [0, N): no gradient, nothing written
        gate = tl.load(gates_ptr + tokens * K + r, mask=token_mask, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK_T,), tl.float32)
        for block in range(D_BLOCKS):
            cols = block * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
            col_mask = cols[None, :] < dim
            active = (row >= 0)[:, None] & col_mask
            grad_y = tl.load(grad_y_ptr + tokens[:, None] * dim + cols[None, :], mask=token_mask[:, None] & col_mask, other=0.0).to(tl.float32)
            y = tl.load(y_sorted_ptr + row[:, None] * dim + cols[None, :], mask=active, other=0.0).to(tl.float32)
            tl.store(grad_sorted_ptr + row[:, None] * dim + cols[None, :], (gate[:, None] * grad_y).to(grad_sorted_ptr.dtype.element_ty), mask=active)
            dot += tl.sum(tl.where(active, grad_y * y, 0.0), axis=1)
        tl.store(grad_gates_ptr + tokens * K + r, tl.where(row >= 0, dot, 0.0), mask=token_mask)


def _row_blocks(dim: int, device: torch.device):
    interpreted = device.type == "cpu"
    block_d = max(16, min(triton.next_power_of_2(max(dim, 1)), 128 if interpreted else 256))
    return (64 if interpreted else 16), block_d


def _zero_padding(out: torch.Tensor, expert_offsets: torch.Tensor):
    rows, dim = out.shape
    if rows and dim:
        block_r, block_d = 64, max(16, min(triton.next_power_of_2(dim), 128))
        grid = (triton.cdiv(rows, block_r), triton.cdiv(dim, block_d))
        _zero_padding_kernel[grid](out, expert_offsets, expert_offsets.numel() - 1, rows, dim, BLOCK_R=block_r, BLOCK_D=block_d)


def _combine(src: torch.Tensor, weights: torch.Tensor | None, assignment_row: torch.Tensor) -> torch.Tensor:
    src = src.contiguous()
    tokens, k = assignment_row.shape
    dim = src.shape[1]
    out = torch.empty(tokens, dim, dtype=src.dtype, device=src.device)
    if tokens and dim:
        block_t, block_d = _row_blocks(dim, src.device)
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(dim, block_d))
        _combine_kernel[grid](src, weights.contiguous() if weights is not None else src, assignment_row.contiguous(), out,
                              tokens, src.shape[0], dim, K=k, HAS_WEIGHTS=weights is not None, BLOCK_T=block_t, BLOCK_D=block_d)
    return out


@torch.library.custom_op("sm4::triton_routing_metadata", mutates_args=(), device_types=("cuda", "cpu"))
def routing_metadata_op(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = expert_ids.contiguous()
    tokens, k = ids.shape
    n = ids.numel()
    device = ids.device
    blocks = max(triton.cdiv(n, SORT_BLOCK), 1)
    block_counts = torch.zeros(blocks, num_experts + 1, dtype=torch.int64, device=device)
    if n:
        _bin_counts_kernel[(blocks,)](ids, block_counts, n, num_experts, BLOCK=SORT_BLOCK)
    # Start row of each (block, bin): bins in order, blocks in order within a bin (stable).
    bin_totals = block_counts.sum(0)
    bin_base = torch.cumsum(bin_totals, 0) - bin_totals
    block_start = (bin_base[None, :] + torch.cumsum(block_counts, 0) - block_counts).contiguous()
    sorted_assignment = torch.empty(n, dtype=torch.int64, device=device)
    sorted_token = torch.empty(n, dtype=torch.int64, device=device)
    assignment_row = torch.empty(tokens, k, dtype=torch.int64, device=device)
    if n:
        _scatter_kernel[(blocks,)](ids, block_start, sorted_assignment, sorted_token, assignment_row, n, num_experts, k,
                                   BLOCK=SORT_BLOCK, num_warps=SCATTER_WARPS)
    counts = bin_totals[:num_experts].clone()
    offsets = bin_base[: num_experts + 1].clone()  # bin E starts at A, the number of active rows
    return counts, offsets, sorted_assignment, sorted_token, assignment_row


@routing_metadata_op.register_fake
def _(expert_ids, num_experts):
    tokens, k = expert_ids.shape
    new = lambda *shape: expert_ids.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return new(num_experts), new(num_experts + 1), new(tokens * k), new(tokens * k), new(tokens, k)


@torch.library.custom_op("sm4::triton_permute", mutates_args=(), device_types=("cuda", "cpu"))
def permute_op(x: torch.Tensor, assignment_row: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    tokens, k = assignment_row.shape
    dim = x.shape[1]
    out = torch.empty(tokens * k, dim, dtype=x.dtype, device=x.device)
    if tokens and dim:
        block_t, block_d = _row_blocks(dim, x.device)
        grid = (triton.cdiv(tokens, block_t), triton.cdiv(dim, block_d))
        _scatter_rows_kernel[grid](x, assignment_row.contiguous(), out, tokens, out.shape[0], dim, K=k, BLOCK_T=block_t, BLOCK_D=block_d)
    _zero_padding(out, expert_offsets)
    return out


@permute_op.register_fake
def _(x, assignment_row, expert_offsets):
    return x.new_empty((assignment_row.shape[0] * assignment_row.shape[1], x.shape[1]))


@torch.library.custom_op("sm4::triton_unpermute", mutates_args=(), device_types=("cuda", "cpu"))
def unpermute_op(y_sorted: torch.Tensor, gates: torch.Tensor, assignment_row: torch.Tensor,
                 expert_offsets: torch.Tensor) -> torch.Tensor:
    """expert_offsets is unused here; the backward needs it to zero the padding rows' gradient."""
    return _combine(y_sorted, gates, assignment_row)


@unpermute_op.register_fake
def _(y_sorted, gates, assignment_row, expert_offsets):
    return y_sorted.new_empty((assignment_row.shape[0], y_sorted.shape[1]))


@torch.library.custom_op("sm4::triton_unpermute_backward", mutates_args=(), device_types=("cuda", "cpu"))
def unpermute_backward_op(grad_y: torch.Tensor, y_sorted: torch.Tensor, gates: torch.Tensor,
                          assignment_row: torch.Tensor, expert_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_y, y_sorted = grad_y.contiguous(), y_sorted.contiguous()
    tokens, k = assignment_row.shape
    rows, dim = y_sorted.shape
    grad_sorted = torch.empty_like(y_sorted)
    grad_gates = torch.zeros(tokens, k, dtype=torch.float32, device=y_sorted.device)
    if tokens and dim:
        block_t, block_d = _row_blocks(dim, y_sorted.device)
        _unpermute_backward_kernel[(triton.cdiv(tokens, block_t),)](
            grad_y, y_sorted, gates.contiguous(), assignment_row.contiguous(), grad_sorted, grad_gates, tokens, rows, dim,
            K=k, BLOCK_T=block_t, BLOCK_D=block_d, D_BLOCKS=triton.cdiv(dim, block_d))
    _zero_padding(grad_sorted, expert_offsets)
    return grad_sorted, grad_gates.to(gates.dtype)


@unpermute_backward_op.register_fake
def _(grad_y, y_sorted, gates, assignment_row, expert_offsets):
    return torch.empty_like(y_sorted), torch.empty_like(gates)


@torch.library.custom_op("sm4::triton_permute_backward", mutates_args=(), device_types=("cuda", "cpu"))
def permute_backward_op(grad_sorted: torch.Tensor, assignment_row: torch.Tensor) -> torch.Tensor:
    """grad_x[t] = sum of the gradient rows of t's active ranks (the unweighted combine)."""
    return _combine(grad_sorted, None, assignment_row)


@permute_backward_op.register_fake
def _(grad_sorted, assignment_row):
    return grad_sorted.new_empty((assignment_row.shape[0], grad_sorted.shape[1]))


# Autograd (through custom ops only, so that torch.compile can trace the backward): permute's
# backward gathers each token's rows back; unpermute's gives the rows gate * grad_y and the gates
# row . grad_y.
def _permute_setup(ctx, inputs, output):
    _x, assignment_row, _offsets = inputs
    ctx.save_for_backward(assignment_row)


def _permute_backward(ctx, grad):
    (assignment_row,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the same sum in differentiable PyTorch ops
        return differentiable_permute_backward(grad, assignment_row), None, None
    return permute_backward_op(grad, assignment_row), None, None


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad_y):
    y_sorted, gates, assignment_row, expert_offsets = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable PyTorch ops
        return (*differentiable_unpermute_backward(grad_y, y_sorted, gates, assignment_row), None, None)
    grad_sorted, grad_gates = unpermute_backward_op(grad_y, y_sorted, gates, assignment_row, expert_offsets)
    return grad_sorted, grad_gates, None, None


torch.library.register_autograd("sm4::triton_permute", _permute_backward, setup_context=_permute_setup)
torch.library.register_autograd("sm4::triton_unpermute", _unpermute_backward, setup_context=_unpermute_setup)


def routing_metadata(expert_ids, num_experts):
    from sm4.types import RoutingMetadata

    return RoutingMetadata(*routing_metadata_op(expert_ids, num_experts))


def permute(x, metadata):
    return permute_op(x, metadata.assignment_row, metadata.expert_offsets)


def unpermute(y_sorted, gates, metadata):
    return unpermute_op(y_sorted, gates, metadata.assignment_row, metadata.expert_offsets)

