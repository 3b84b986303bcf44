"""Triton kernels of the grouped GEMMs: the expert layers' forward (with gather, bias, activation,
gate-scaled scatter fused in) and their per-expert weight gradient.

Pipeline position: between permutation and unpermute (or, with gather/scatter, in their place).
The contract is csrc/sm4_ops.cpp (grouped_mm, grouped_weight_grad); sm4/reference.py has the truth.

    grouped_mm:          a (R, K), weight (E, K, N) or (E, N, K) with transpose_weight, bias (E, N) or None,
                         expert_offsets (E + 1,) int64, gather_index / scatter_index (M,) int64 or None,
                         scatter_scale (M,) or None
                         -> out (num_out_rows, N), preact (M, N) or (0, N)          [M = rows in expert order]
    grouped_weight_grad: a (R, K), grad (R', N), expert_offsets (E + 1,), a_index / grad_index (M,) or None
                         -> grad_weight (E, K, N), grad_bias (E, N) or (0, N)

grouped_mm. The grid is (cdiv(rows, BLOCK_M) + E) x cdiv(N, BLOCK_N) programs (one axis, in
groups of GROUP_M row tiles that sweep the N tiles, for L2 reuse); the first factor bounds the row
tiles: expert e owns cdiv(count_e, BLOCK_M) tiles, their exclusive prefix ``tile_start`` (E + 1,)
is computed on the device with torch ops (no host sync: expert_offsets is never read on the
host), and program t finds its expert by a binary search over tile_start (bit_length(E) steps, a
compile-time trip count). Its rows are expert_offsets[e] + (t - tile_start[e]) * BLOCK_M + [0,
BLOCK_M), masked at expert_offsets[e + 1]; they are gathered through gather_index in the prologue,
the tile is a tl.dot over K in BLOCK_K steps (fp32 accumulation), and the epilogue adds the bias,
writes the pre-activation (save_preact), applies the activation and the scale and stores through
scatter_index. The programs past the last tile zero the rows no expert writes, reading A =
expert_offsets[E] on the device: out rows [A, num_out_rows) without scatter (with scatter, out is
allocated zeroed) and preact rows [A, M). Since sum_e cdiv(count_e, B) + cdiv(R - A, B) <=
cdiv(R, B) + E for R >= A, the grid always has enough programs for both.

grouped_weight_grad. The grid is E x cdiv(K, BLOCK_K) x cdiv(N, BLOCK_N) programs (one axis, the
expert slowest, so that the programs running together share its rows in L2): a program owns one
(BLOCK_K, BLOCK_N) tile of one expert's gradient and loops over that expert's rows (bounds read
from expert_offsets on the device) in BLOCK_M steps, accumulating a_rows^T @ grad_rows in fp32
and, for the bias, the column sums of grad_rows; the result is written once. Fixed order, no
atomics: deterministic. Empty experts get zeros.

Precision. 16-bit inputs go to tensor-core dots with fp32 accumulation. fp32 inputs use
``input_precision="ieee"`` (exact fp32 products) unless TF32 is enabled for CUDA matmuls
(``torch.backends.cuda.matmul.allow_tf32``, or its newer ``fp32_precision = "tf32"``), in which
case they use "tf32", as torch.matmul would. Bias, activation (exact GELU with erf, or the tanh
form written as x * sigmoid(2u)) and scale are applied in fp32 before the one rounding to a's dtype.

Interpreter (CPU tensors, TRITON_INTERPRET=1). Its bf16 dot is wrong, so tiles are upcast to fp32
before the dot there (equivalent: 16-bit products are exact in fp32), and its fp32 -> bf16 cast
truncates rather than rounds, so there the kernels round to nearest-even by hand first
(``_to_output``; on GPUs the cast itself rounds). Triton 3.6's interpreter cannot take a loop bound from a
runtime value, so the K loop has a compile-time trip count (K is fixed per layer) and the weight
gradient's row loop is a ``while`` loop there (a ``for`` on GPUs, where Triton pipelines it).
All row * stride products are int64.

Bad metadata (GPU tensors are not validated: a check would be a host sync; sm4.ops validates CPU
tensors). The kernels mask exactly as the CUDA grouped GEMM does and never touch memory outside
their tensors: expert e owns the rows [begin_e, end_e) of ``_row_bounds`` (offsets clamped into
[0, M), so negative, decreasing or too large offsets only change which rows an expert owns: for
decreasing offsets some rows go to no expert or to two, and the result is unspecified but
in-bounds); a gather / a_index / grad_index value outside [0, rows of its tensor) reads a zero
row; a destination outside [0, num_out_rows) (a bad scatter index, or without scatter a row at or
past num_out_rows) is dropped, so ``num_out_rows < rows`` keeps the first num_out_rows rows.
"""

import torch
import triton
import triton.language as tl

SQRT1_2 = tl.constexpr(0.7071067811865476)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_COEF = tl.constexpr(0.044715)

ACT_NONE, ACT_GELU, ACT_GELU_TANH = 0, 1, 2


@triton.jit
def _tile_dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _to_output(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 -> the output dtype, rounded to nearest-even (by hand for bf16 in the interpreter)."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # now exactly representable: the cast below is exact
    return x.to(dtype)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * SQRT1_2))
    elif ACTIVATION == 2:
        # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        u = SQRT_2_OVER_PI * (x + GELU_TANH_COEF * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    return x


@triton.jit
def _grouped_mm_kernel(
    a_ptr, w_ptr, bias_ptr, bounds_ptr, tile_start_ptr, gather_ptr, scatter_ptr, scale_ptr, out_ptr, preact_ptr,
    num_a_rows, num_rows, num_out_rows, num_experts, num_row_tiles, K, N,
    stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_pm,
    HAS_BIAS: tl.constexpr, HAS_GATHER: tl.constexpr, HAS_SCATTER: tl.constexpr, HAS_SCALE: tl.constexpr,
    ACTIVATION: tl.constexpr, SAVE_PREACT: tl.constexpr, SEARCH_STEPS: tl.constexpr, K_TILES: tl.constexpr,
    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # 1-D grid of num_row_tiles x cdiv(N, BLOCK_N) programs, in groups of GROUP_M row tiles that
    # walk all N tiles (the A rows and the expert's weight stay in L2 across the group).
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * col_tiles
    first_m = (pid // group_size) * GROUP_M
    group_m = tl.minimum(num_row_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_mask = cols < N
    total_tiles = tl.load(tile_start_ptr + num_experts)
    if pid_m >= total_tiles:
        # Past the last tile: zero the rows that no expert writes, [A, ...).
        if SAVE_PREACT or not HAS_SCATTER:
            active = tl.load(bounds_ptr + 2 * num_experts)
            rows = active + (pid_m - total_tiles).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
            zeros = tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty)
            if not HAS_SCATTER:
                tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], zeros,
                         mask=(rows < num_out_rows)[:, None] & col_mask[None, :])
            if SAVE_PREACT:
                tl.store(preact_ptr + rows[:, None] * stride_pm + cols[None, :], zeros,
                         mask=(rows < num_rows)[:, None] & col_mask[None, :])
        return

    # The expert of this tile: the last e with tile_start[e] <= pid_m (empty experts are skipped).
    lo = pid_m * 0
    hi = lo + num_experts
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        take = tl.load(tile_start_ptr + mid) <= pid_m
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    expert = lo
    tile = pid_m - tl.load(tile_start_ptr + expert)
    row_end = tl.load(bounds_ptr + num_experts + expert)
    rows = tl.load(bounds_ptr + expert) + tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < row_end
    if HAS_GATHER:
        # A gather index outside [0, rows of a) reads a zero row (as the CUDA kernel).
        src_rows = tl.load(gather_ptr + rows, mask=row_mask, other=0)
        src_mask = row_mask & (src_rows >= 0) & (src_rows < num_a_rows)
        src_rows = tl.where(src_mask, src_rows, 0)
    else:
        src_rows = rows
        src_mask = row_mask & (rows < num_a_rows)

    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + src_rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kt in range(K_TILES):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=src_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = ks < K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=src_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _tile_dot(a, w, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if SAVE_PREACT:
        tl.store(preact_ptr + rows[:, None] * stride_pm + cols[None, :], _to_output(acc, preact_ptr.dtype.element_ty, UPCAST), mask=mask)
    y = _activation(acc, ACTIVATION)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        y = y * scale.to(tl.float32)[:, None]
    # A destination outside [0, num_out_rows) drops the row (as the CUDA kernel): a scatter index
    # out of range, or, without scatter, a row past num_out_rows.
    if HAS_SCATTER:
        dst_rows = tl.load(scatter_ptr + rows, mask=row_mask, other=0)
    else:
        dst_rows = rows
    dst_mask = row_mask & (dst_rows >= 0) & (dst_rows < num_out_rows)
    dst_rows = tl.where(dst_mask, dst_rows, 0)
    tl.store(out_ptr + dst_rows[:, None] * stride_om + cols[None, :], _to_output(y, out_ptr.dtype.element_ty, UPCAST),
             mask=dst_mask[:, None] & col_mask[None, :])


@triton.jit
def _weight_grad_step(acc, bias_acc, row_start, row_end, a_ptr, g_ptr, a_index_ptr, g_index_ptr, num_a_rows, num_g_rows,
                      ks, k_mask, cols, col_mask, stride_am, stride_ak, stride_gm, stride_gn,
                      HAS_A_INDEX: tl.constexpr, HAS_G_INDEX: tl.constexpr, COMPUTE_BIAS: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < row_end
    # An index outside its tensor's rows reads a zero row (as the CUDA kernel).
    if HAS_A_INDEX:
        a_rows = tl.load(a_index_ptr + rows, mask=row_mask, other=0)
        a_mask = row_mask & (a_rows >= 0) & (a_rows < num_a_rows)
        a_rows = tl.where(a_mask, a_rows, 0)
    else:
        a_rows = rows
        a_mask = row_mask & (rows < num_a_rows)
    if HAS_G_INDEX:
        g_rows = tl.load(g_index_ptr + rows, mask=row_mask, other=0)
        g_mask = row_mask & (g_rows >= 0) & (g_rows < num_g_rows)
        g_rows = tl.where(g_mask, g_rows, 0)
    else:
        g_rows = rows
        g_mask = row_mask & (rows < num_g_rows)
    # a^T tile (BLOCK_K, BLOCK_M), loaded transposed; grad tile (BLOCK_M, BLOCK_N).
    a_t = tl.load(a_ptr + a_rows[None, :] * stride_am + ks[:, None] * stride_ak, mask=k_mask[:, None] & a_mask[None, :], other=0.0)
    g = tl.load(g_ptr + g_rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=g_mask[:, None] & col_mask[None, :], other=0.0)
    acc = _tile_dot(a_t, g, acc, UPCAST, PRECISION)
    if COMPUTE_BIAS:
        bias_acc += tl.sum(g.to(tl.float32), axis=0)
    return acc, bias_acc


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr, g_ptr, bounds_ptr, a_index_ptr, g_index_ptr, grad_weight_ptr, grad_bias_ptr,
    num_a_rows, num_g_rows, num_experts, K, N, stride_am, stride_ak, stride_gm, stride_gn,
    HAS_A_INDEX: tl.constexpr, HAS_G_INDEX: tl.constexpr, COMPUTE_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1-D grid, the expert slowest: the programs running together share the expert's rows in L2.
    pid = tl.program_id(0)
    k_tiles = tl.maximum(tl.cdiv(K, BLOCK_K), 1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    expert = (pid // (k_tiles * n_tiles)).to(tl.int64)
    pid_k = (pid % (k_tiles * n_tiles)) // n_tiles
    pid_n = pid % n_tiles
    ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    k_mask = ks < K
    col_mask = cols < N
    row_begin = tl.load(bounds_ptr + expert)
    row_end = tl.load(bounds_ptr + num_experts + expert)
    acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), tl.float32)
    if WHILE_LOOP:
        row_start = row_begin
        while row_start < row_end:
            acc, bias_acc = _weight_grad_step(acc, bias_acc, row_start, row_end, a_ptr, g_ptr, a_index_ptr, g_index_ptr,
                                              num_a_rows, num_g_rows, ks, k_mask, cols, col_mask, stride_am, stride_ak, stride_gm, stride_gn,
                                              HAS_A_INDEX, HAS_G_INDEX, COMPUTE_BIAS, UPCAST, PRECISION, BLOCK_M)
            row_start += BLOCK_M
    else:
        for row_start in range(row_begin, row_end, BLOCK_M):
            acc, bias_acc = _weight_grad_step(acc, bias_acc, row_start, row_end, a_ptr, g_ptr, a_index_ptr, g_index_ptr,
                                              num_a_rows, num_g_rows, ks, k_mask, cols, col_mask, stride_am, stride_ak, stride_gm, stride_gn,
                                              HAS_A_INDEX, HAS_G_INDEX, COMPUTE_BIAS, UPCAST, PRECISION, BLOCK_M)
    tl.store(grad_weight_ptr + expert * K * N + ks[:, None] * N + cols[None, :], _to_output(acc, grad_weight_ptr.dtype.element_ty, UPCAST),
             mask=k_mask[:, None] & col_mask[None, :])
    if COMPUTE_BIAS:
        if pid_k == 0:
            tl.store(grad_bias_ptr + expert * N + cols, _to_output(bias_acc, grad_bias_ptr.dtype.element_ty, UPCAST), mask=col_mask)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dot_precision(dtype: torch.dtype) -> str:
    """"tf32" for fp32 inputs when torch lets CUDA matmuls use TF32, else "ieee" (16-bit: unused)."""
    if dtype != torch.float32:
        return "tf32"  # Triton's default; the attribute only matters for fp32 operands
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision
    try:
        return "tf32" if matmul.allow_tf32 else "ieee"
    except RuntimeError:  # torch refuses to answer when the legacy and new TF32 APIs were mixed
        return "ieee"


def _pow2_block(size: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(size, 1))))


def _mm_config(num_rows: int, num_experts: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes: small in the interpreter (CPU tensors), tensor-core sized on GPUs."""
    if device.type == "cpu":
        block_m = 32 if num_rows >= 32 * max(num_experts, 1) else 16
        return dict(BLOCK_M=block_m, BLOCK_N=_pow2_block(n, 16, 64), BLOCK_K=_pow2_block(k, 16, 64), GROUP_M=4)
    block_m = 128 if num_rows >= 128 * max(num_experts, 1) else 64  # padding waste vs tile efficiency
    block_n = _pow2_block(n, 16, 128)
    # Rows that are not multiples of 16 elements are loaded element by element, one 64-bit pointer
    # per element: 64 x 128 tiles on 4 warps spilled 24-636 bytes per thread (K = 100, N = 200,
    # sm_80 and sm_90). 8 warps halve the per-thread share; fp32 (FMA dot) also needs 16-wide K
    # steps (still 4-16 bytes spilled on sm_80 at 32).
    # fp32 128 x 64 tiles on 4 warps spilled 16 bytes (sm_90), so fp32 128-row tiles take 8 warps;
    # 64 x 128 stays on 4 (on 8, ptxas kept 128 registers and spilled 8 bytes on sm_80).
    aligned = k % 16 == 0 and n % 16 == 0
    block_k = _pow2_block(k, 16, 64 if dtype != torch.float32 else (32 if aligned else 16))
    wide = block_m * block_n >= 128 * 128 or (dtype == torch.float32 and block_m == 128 and block_n >= 64)
    num_warps = 8 if wide or not aligned else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=num_warps,
                num_stages=4 if dtype != torch.float32 else 3)


def _weight_grad_config(num_experts: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type == "cpu":
        return dict(BLOCK_M=32, BLOCK_K=_pow2_block(k, 16, 64), BLOCK_N=_pow2_block(n, 16, 64))
    # 128 x 128 output tiles when they still give every SM (~132 on an H100) two of them.
    big = num_experts * triton.cdiv(k, 128) * triton.cdiv(n, 128) >= 264
    block_k = _pow2_block(k, 16, 128 if big else 64)
    block_n = _pow2_block(n, 16, 128 if big else 64)
    # fp32 (FMA dot, operands in registers): 32-row steps in 3 stages spilled 196-828 bytes per
    # thread on sm_80; 16-row steps in 2 stages do not.
    block_m, stages = (64, 3) if dtype != torch.float32 else (16, 2)
    num_warps = 8 if block_k * block_n >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=num_warps, num_stages=stages)


def _row_bounds(expert_offsets: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(2E + 1,) int64 on the device, no host sync: begin_e, end_e and the first unwritten row.

    The CUDA kernel's conventions (csrc/cuda/grouped_gemm.cu): begin_0 = 0, begin_e =
    clamp(offsets[e], 0, M), end_e = clamp(offsets[e + 1], begin_e, M), and the rows from
    clamp(offsets[E], 0, M) on are the ones no expert writes. For valid offsets this is the
    reference's rows; for negative, decreasing or too large ones every row index stays in [0, M).
    """
    offsets = expert_offsets.to(torch.int64)
    begin = offsets[:-1].clamp(0, num_rows)
    begin = torch.cat([torch.zeros_like(begin[:1]), begin[1:]])
    end = torch.maximum(offsets[1:].clamp(max=num_rows), begin)
    return torch.cat([begin, end, offsets[-1:].clamp(0, num_rows)]).contiguous()


def _check_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype):
    if tensor.dtype != dtype:
        raise TypeError(f"sm4 grouped GEMM: {name} is {tensor.dtype}, expected {dtype} (a's dtype)")


@torch.library.custom_op("sm4::triton_grouped_mm", mutates_args=(), device_types=("cuda", "cpu"))
def grouped_mm_op(
    a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, expert_offsets: torch.Tensor,
    gather_index: torch.Tensor | None, scatter_index: torch.Tensor | None, scatter_scale: torch.Tensor | None,
    num_out_rows: int, transpose_weight: bool, activation: int, save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.sm4.grouped_mm (csrc/sm4_ops.cpp): (out, preact) in a's dtype."""
    if a.dtype not in _DTYPES:
        raise TypeError(f"sm4 grouped GEMM: a is {a.dtype}, expected one of {_DTYPES}")
    if activation not in (ACT_NONE, ACT_GELU, ACT_GELU_TANH):
        raise ValueError(f"sm4 grouped GEMM: activation must be 0, 1 or 2, got {activation}")
    _check_dtype("weight", weight, a.dtype)
    if bias is not None:
        _check_dtype("bias", bias, a.dtype)
    num_experts = weight.shape[0]
    k, n = (weight.shape[2], weight.shape[1]) if transpose_weight else (weight.shape[1], weight.shape[2])
    stride_wk, stride_wn = (weight.stride(2), weight.stride(1)) if transpose_weight else (weight.stride(1), weight.stride(2))
    num_rows = gather_index.numel() if gather_index is not None else a.shape[0]
    keep_preact = save_preact and activation != ACT_NONE
    out = (torch.zeros if scatter_index is not None else torch.empty)(num_out_rows, n, dtype=a.dtype, device=a.device)
    preact = torch.empty(num_rows if keep_preact else 0, n, dtype=a.dtype, device=a.device)
    cfg = _mm_config(num_rows, num_experts, k, n, a.dtype, a.device)
    block_m = cfg["BLOCK_M"]
    # Programs: every row tile (sum_e cdiv(count_e, BLOCK_M) <= cdiv(num_rows, BLOCK_M) + E) plus the
    # zeroing of the unwritten rows (see the module docstring for the bound).
    covered_rows = num_rows if scatter_index is not None else max(num_rows, num_out_rows)
    row_tiles = triton.cdiv(covered_rows, block_m) + num_experts
    grid = (row_tiles * triton.cdiv(n, cfg["BLOCK_N"]),)
    if grid[0] == 0:
        return out, preact
    bounds = _row_bounds(expert_offsets, num_rows)
    counts = bounds[num_experts:2 * num_experts] - bounds[:num_experts]
    tiles = torch.div(counts + (block_m - 1), block_m, rounding_mode="floor")
    tile_start = torch.nn.functional.pad(torch.cumsum(tiles, 0), (1, 0)).to(torch.int32)
    dummy = bounds
    _grouped_mm_kernel[grid](
        a, weight, bias.contiguous() if bias is not None else dummy, bounds, tile_start,
        gather_index.contiguous() if gather_index is not None else dummy,
        scatter_index.contiguous() if scatter_index is not None else dummy,
        scatter_scale.contiguous() if scatter_scale is not None else dummy,
        out, preact if keep_preact else out,
        a.shape[0], num_rows, num_out_rows, num_experts, row_tiles, k, n,
        a.stride(0), a.stride(1), weight.stride(0), stride_wk, stride_wn, out.stride(0), preact.stride(0) if keep_preact else 0,
        HAS_BIAS=bias is not None, HAS_GATHER=gather_index is not None, HAS_SCATTER=scatter_index is not None,
        HAS_SCALE=scatter_scale is not None, ACTIVATION=activation, SAVE_PREACT=keep_preact,
        SEARCH_STEPS=num_experts.bit_length(), K_TILES=triton.cdiv(k, cfg["BLOCK_K"]), EVEN_K=k % cfg["BLOCK_K"] == 0,
        UPCAST=a.device.type == "cpu", PRECISION=_dot_precision(a.dtype), **cfg,
    )
    return out, preact


@grouped_mm_op.register_fake
def _(a, weight, bias, expert_offsets, gather_index, scatter_index, scatter_scale, num_out_rows, transpose_weight,
      activation, save_preact):
    n = weight.shape[1] if transpose_weight else weight.shape[2]
    num_rows = gather_index.shape[0] if gather_index is not None else a.shape[0]
    keep_preact = save_preact and activation != ACT_NONE
    return a.new_empty((num_out_rows, n)), a.new_empty((num_rows if keep_preact else 0, n))


@torch.library.custom_op("sm4::triton_grouped_weight_grad", mutates_args=(), device_types=("cuda", "cpu"))
def grouped_weight_grad_op(
    a: torch.Tensor, grad: torch.Tensor, expert_offsets: torch.Tensor, a_index: torch.Tensor | None,
    grad_index: torch.Tensor | None, compute_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.sm4.grouped_weight_grad: (grad_weight, grad_bias) in a's dtype."""
    if a.dtype not in _DTYPES:
        raise TypeError(f"sm4 grouped GEMM: a is {a.dtype}, expected one of {_DTYPES}")
    _check_dtype("grad", grad, a.dtype)
    num_experts = expert_offsets.numel() - 1
    k, n = a.shape[1], grad.shape[1]
    num_rows = a_index.numel() if a_index is not None else a.shape[0]
    grad_weight = torch.empty(num_experts, k, n, dtype=a.dtype, device=a.device)
    grad_bias = torch.empty(num_experts if compute_bias else 0, n, dtype=a.dtype, device=a.device)
    cfg = _weight_grad_config(num_experts, k, n, a.dtype, a.device)
    # With K = 0 one column of programs still sums the bias.
    k_programs = max(triton.cdiv(k, cfg["BLOCK_K"]), 1 if compute_bias else 0)
    grid = (num_experts * k_programs * triton.cdiv(n, cfg["BLOCK_N"]),)
    if grid[0] == 0:
        return grad_weight, grad_bias
    bounds = _row_bounds(expert_offsets, num_rows)
    _grouped_weight_grad_kernel[grid](
        a, grad, bounds, a_index.contiguous() if a_index is not None else bounds,
        grad_index.contiguous() if grad_index is not None else bounds,
        grad_weight, grad_bias if compute_bias else grad_weight,
        a.shape[0], grad.shape[0], num_experts, k, n, a.stride(0), a.stride(1), grad.stride(0), grad.stride(1),
        HAS_A_INDEX=a_index is not None, HAS_G_INDEX=grad_index is not None, COMPUTE_BIAS=compute_bias,
        UPCAST=a.device.type == "cpu", PRECISION=_dot_precision(a.dtype), WHILE_LOOP=a.device.type == "cpu", **cfg,
    )
    return grad_weight, grad_bias


@grouped_weight_grad_op.register_fake
def _(a, grad, expert_offsets, a_index, grad_index, compute_bias):
    num_experts = expert_offsets.shape[0] - 1
    n = grad.shape[1]
    return a.new_empty((num_experts, a.shape[1], n)), a.new_empty((num_experts if compute_bias else 0, n))


def grouped_mm(a, weight, bias, expert_offsets, gather_index=None, scatter_index=None, scatter_scale=None,
               num_out_rows=None, transpose_weight=False, activation=0, save_preact=False):
    """out[scatter(i)] = act(a[gather(i)] @ W_e + b_e) * scale_i; same signature as sm4.reference.grouped_mm."""
    if num_out_rows is None:
        num_out_rows = gather_index.shape[0] if gather_index is not None else a.shape[0]
    return grouped_mm_op(a, weight, bias, expert_offsets, gather_index, scatter_index, scatter_scale, num_out_rows,
                         transpose_weight, activation, save_preact)


def grouped_weight_grad(a, grad, expert_offsets, a_index=None, grad_index=None, compute_bias=True):
    """Per-expert a_rows^T @ grad_rows and sum(grad_rows); same signature as sm4.reference.grouped_weight_grad."""
    return grouped_weight_grad_op(a, grad, expert_offsets, a_index, grad_index, compute_bias)

