"""Triton kernels of fused noisy top-k gating (SM4_SPEC §2), forward and backward.

Pipeline position: the first step of every MoE layer.

    x (T, d), router_weight (d, E), noise (T, E) or None, token_k (T,) or None
      -> gates (T, k) fp32, expert_ids (T, k) int64, entropy (T,) fp32, importance (E,) fp32,
         load (E,) fp32, expert_counts (E,) int64, runner_up (T,) int64

One program routes BLOCK_T tokens: it computes their logits with tl.dot over d in BLOCK_D chunks
(the d x E product stays in registers; the logits are written once, for the backward), then, the noise,
softmax, top-k selection (k_max + 1 rounds of argmax; argmax breaks ties to the lower index), the
per-token k mask, gates, entropy, and the program's partial sums of importance, load and counts,
written to a (programs, E) buffer that PyTorch sums in a fixed order (deterministic, no float
atomics). The backward program reads those logits (no GEMM, no second read of x) and writes
d loss / d logits.

Experts are padded to BLOCK_E = next_pow2(max(E, 16)) lanes; padded lanes hold -inf logits and are
masked out of every sum. The interpreter computes bf16 wrongly, so x is upcast on load; on a GPU,
bf16/fp16 x with a router weight of the same dtype uses tensor-core dots with fp32 accumulation.
"""

import torch
import triton
import triton.language as tl

from sm4 import routing

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _router_logits(x_ptr, w_ptr, tokens, token_mask, dim, num_experts, experts, expert_mask,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, D_BLOCKS: tl.constexpr,
                   LOW_PRECISION_DOT: tl.constexpr):
    """(BLOCK_T, BLOCK_E) fp32 logits and a (BLOCK_T,) flag: the token's input is all finite.

    D_BLOCKS = cdiv(d, BLOCK_D) is a compile-time constant (d is fixed per layer): Triton 3.6's
    interpreter cannot take a loop bound from a runtime scalar.
    """
    acc = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    finite = tl.full((BLOCK_T,), 1, tl.int1)
    for block in range(D_BLOCKS):
        cols = block * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
        x = tl.load(x_ptr + tokens[:, None] * dim + cols[None, :], mask=token_mask[:, None] & (cols[None, :] < dim), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * num_experts + experts[None, :], mask=(cols[:, None] < dim) & expert_mask[None, :], other=0.0)
        ok = (x == x) & (tl.abs(x.to(tl.float32)) < float("inf"))
        finite = finite & (tl.min(ok.to(tl.int32), axis=1) > 0)
        x = tl.where(ok, x, 0.0)  # a bad element must not turn the dot into NaN for tl.dot tiles
        if LOW_PRECISION_DOT:
            acc = tl.dot(x, w, acc)
        else:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return acc, finite


@triton.jit
def _prepare_logits(clean, finite, noise_ptr, tokens, token_mask, num_experts, experts, expert_mask, sigma,
                    HAS_NOISE: tl.constexpr):
    """Clean and noisy logits (padded experts -inf) and the tokens to route (in batch, finite).

    A token is finite when its input, clean logits and noisy logits all are (a NaN/inf noise row
    makes it non-finite, as in the reference). A non-finite token's logits are replaced by zeros
    (as if all equal), as the reference does.
    """
    finite = finite & (tl.min(tl.where(expert_mask[None, :], tl.abs(clean) < float("inf"), 1).to(tl.int32), axis=1) > 0)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + tokens[:, None] * num_experts + experts[None, :], mask=token_mask[:, None] & expert_mask[None, :], other=0.0)
        noisy = clean + sigma * eps.to(tl.float32)
        finite = finite & (tl.min(tl.where(expert_mask[None, :], tl.abs(noisy) < float("inf"), 1).to(tl.int32), axis=1) > 0)
    else:
        noisy = clean
    good = token_mask & finite
    clean = tl.where(expert_mask[None, :] & good[:, None], clean, 0.0)
    noisy = tl.where(expert_mask[None, :] & good[:, None], noisy, 0.0)
    clean = tl.where(expert_mask[None, :], clean, float("-inf"))
    noisy = tl.where(expert_mask[None, :], noisy, float("-inf"))
    return clean, noisy, finite, good


@triton.jit
def _softmax_rows(logits):
    """Row softmax of (BLOCK_T, BLOCK_E) logits; also the row max and partition function."""
    row_max = tl.max(logits, axis=1)
    numerators = tl.exp(logits - row_max[:, None])
    partition = tl.sum(numerators, axis=1)
    return numerators / partition[:, None], row_max, partition


@triton.jit
def _gating_forward_kernel(
    x_ptr, w_ptr, noise_ptr, token_k_ptr,
    ids_ptr, gates_ptr, entropy_ptr, runner_ptr, logits_ptr,
    block_importance_ptr, block_load_ptr, block_counts_ptr,
    num_tokens, dim, num_experts, sigma,
    K: tl.constexpr, K_PAD: tl.constexpr, NUM_RANKED: tl.constexpr,
    HAS_NOISE: tl.constexpr, HAS_TOKEN_K: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, D_BLOCKS: tl.constexpr,
    LOW_PRECISION_DOT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    token_mask = tokens < num_tokens
    # Expert and rank indices are int32 (E < 2^31); addresses are int64 through tokens and pid.
    # A (BLOCK_T, BLOCK_E) int64 tile would take two registers per element.
    experts = tl.arange(0, BLOCK_E)
    expert_mask = experts < num_experts
    ranks = tl.arange(0, K_PAD)

    raw, finite = _router_logits(x_ptr, w_ptr, tokens, token_mask, dim, num_experts, experts, expert_mask,
                                 BLOCK_T, BLOCK_E, BLOCK_D, D_BLOCKS, LOW_PRECISION_DOT)
    clean, noisy, finite, good = _prepare_logits(raw, finite, noise_ptr, tokens, token_mask, num_experts, experts,
                                                 expert_mask, sigma, HAS_NOISE)
    # Saved for the backward: the clean logits, a NaN row for a non-finite token.
    tl.store(logits_ptr + tokens[:, None] * num_experts + experts[None, :], tl.where(good[:, None], clean, float("nan")),
             mask=token_mask[:, None] & expert_mask[None, :])
    if HAS_TOKEN_K:
        kt = tl.load(token_k_ptr + tokens, mask=token_mask, other=1).to(tl.int32)
        kt = tl.minimum(tl.maximum(kt, 1), K)
    else:
        kt = tl.full((BLOCK_T,), K, tl.int32)

    probs, noisy_max, partition = _softmax_rows(noisy)

    # Top-k by rounds of argmax (ties to the lower index); one more round finds the runner-up.
    remaining = noisy
    ids_tile = tl.full((BLOCK_T, K_PAD), -1, tl.int32)
    gates_tile = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    selected = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    runner = tl.full((BLOCK_T,), -1, tl.int32)
    threshold_selected = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    threshold_unselected = tl.zeros((BLOCK_T,), tl.float32)
    for r in tl.static_range(NUM_RANKED):
        best = tl.argmax(remaining, axis=1).to(tl.int32)
        best_value = tl.max(remaining, axis=1)
        is_best = experts[None, :] == best[:, None]
        active = r < kt
        gate = tl.sum(tl.where(is_best, probs, 0.0), axis=1)
        if r < K:
            ids_tile = tl.where((ranks[None, :] == r) & active[:, None], best[:, None], ids_tile)
            gates_tile = tl.where((ranks[None, :] == r) & active[:, None], gate[:, None], gates_tile)
        selected = selected | (is_best & active[:, None])
        threshold_unselected = tl.where(kt == r + 1, best_value, threshold_unselected)
        runner = tl.where(kt == r, best, runner)
        threshold_selected = tl.where(kt == r, best_value, threshold_selected)
        remaining = tl.where(is_best, float("-inf"), remaining)
    if RENORMALIZE:
        gates_tile = gates_tile / tl.sum(gates_tile, axis=1)[:, None]

    # Clean softmax: importance and entropy.
    if HAS_NOISE:
        q, clean_max, clean_partition = _softmax_rows(clean)
    else:
        clean_max, clean_partition, q = noisy_max, partition, probs
    spread = tl.where(expert_mask[None, :], q * (clean - clean_max[:, None]), 0.0)
    entropy = tl.log(clean_partition) - tl.sum(spread, axis=1)
    if HAS_NOISE:
        threshold = tl.where(selected, threshold_selected[:, None], threshold_unselected[:, None])
        load = 0.5 * (1.0 + tl.math.erf((clean - threshold) / sigma * SQRT1_2))
    else:
        load = selected.to(tl.float32)

    # A non-finite token: routed to the lowest experts, NaN gates/entropy, out of importance/load.
    bad = token_mask & ~finite
    rank_active = ranks[None, :] < kt[:, None]
    ids_tile = tl.where(bad[:, None], tl.where(rank_active, ranks[None, :], -1), ids_tile)
    gates_tile = tl.where(bad[:, None] & rank_active, float("nan"), gates_tile)
    entropy = tl.where(bad, float("nan"), entropy)
    runner = tl.where(bad, -1, runner)
    selected = tl.where(bad[:, None], experts[None, :] < kt[:, None], selected)

    rank_mask = token_mask[:, None] & (ranks[None, :] < K)
    tl.store(ids_ptr + tokens[:, None] * K + ranks[None, :], ids_tile.to(tl.int64), mask=rank_mask)
    tl.store(gates_ptr + tokens[:, None] * K + ranks[None, :], gates_tile, mask=rank_mask)
    tl.store(entropy_ptr + tokens, entropy, mask=token_mask)
    tl.store(runner_ptr + tokens, runner.to(tl.int64), mask=token_mask)
    counted = good[:, None] & expert_mask[None, :]
    out = pid * num_experts + experts
    tl.store(block_importance_ptr + out, tl.sum(tl.where(counted, q, 0.0), axis=0), mask=expert_mask)
    tl.store(block_load_ptr + out, tl.sum(tl.where(counted, load, 0.0), axis=0), mask=expert_mask)
    in_batch = token_mask[:, None] & expert_mask[None, :] & selected
    tl.store(block_counts_ptr + out, tl.sum(in_batch.to(tl.int64), axis=0), mask=expert_mask)


@triton.jit
def _lane_index(index, BLOCK_E: tl.constexpr):
    """An int64 expert index as int32 with the same matches and signs: below 0 -> -1 (no lane),
    at or past BLOCK_E -> BLOCK_E (no lane, still >= 0), so even a bad saved index behaves as before."""
    return tl.where(index < 0, -1, tl.minimum(index, BLOCK_E)).to(tl.int32)


@triton.jit
def _gating_backward_kernel(
    logits_ptr, noise_ptr, ids_ptr, runner_ptr,
    d_gates_ptr, d_importance_ptr, d_load_ptr, d_logits_ptr,
    num_tokens, num_experts, sigma,
    K: tl.constexpr, HAS_NOISE: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tokens = pid * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    token_mask = tokens < num_tokens
    experts = tl.arange(0, BLOCK_E)  # int32, as in the forward
    expert_mask = experts < num_experts

    saved = tl.load(logits_ptr + tokens[:, None] * num_experts + experts[None, :],
                    mask=token_mask[:, None] & expert_mask[None, :], other=0.0)
    # A NaN row (a non-finite token) fails the finiteness test inside and gets no gradient.
    clean, noisy, finite, good = _prepare_logits(saved, tl.full((BLOCK_T,), 1, tl.int1), noise_ptr, tokens, token_mask,
                                                 num_experts, experts, expert_mask, sigma, HAS_NOISE)
    probs, _, _ = _softmax_rows(noisy)

    # Gates -> probabilities (through the optional renormalisation).
    d_probs = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    selected = tl.zeros((BLOCK_T, BLOCK_E), tl.int1)
    active_sum = tl.zeros((BLOCK_T,), tl.float32)
    weighted = tl.zeros((BLOCK_T,), tl.float32)
    last_selected = tl.full((BLOCK_T,), -1, tl.int32)
    for r in tl.static_range(K):
        expert = _lane_index(tl.load(ids_ptr + tokens * K + r, mask=token_mask, other=-1), BLOCK_E)
        d_gate = tl.load(d_gates_ptr + tokens * K + r, mask=token_mask, other=0.0).to(tl.float32)
        is_expert = experts[None, :] == expert[:, None]
        p = tl.sum(tl.where(is_expert, probs, 0.0), axis=1)
        active_sum += p
        weighted += d_gate * p
        d_probs += tl.where(is_expert, d_gate[:, None], 0.0)
        selected = selected | is_expert
        last_selected = tl.where(expert >= 0, expert, last_selected)
    if RENORMALIZE:
        # g_r = p_r / S: d p_r = (d g_r - sum_s d g_s g_s) / S
        correction = weighted / active_sum
        d_probs = tl.where(selected, (d_probs - correction[:, None]) / active_sum[:, None], 0.0)
    d_probs = tl.where(expert_mask[None, :], d_probs, 0.0)
    d_logits = probs * (d_probs - tl.sum(probs * d_probs, axis=1)[:, None])

    # Importance: the clean softmax.
    d_importance = tl.load(d_importance_ptr + experts, mask=expert_mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        q, _, _ = _softmax_rows(clean)
    else:
        q = probs
    d_logits += q * (d_importance[None, :] - tl.sum(q * d_importance[None, :], axis=1)[:, None])

    # Smooth load: Phi((l_e - n_j) / sigma), j = runner-up for selected e, last selected otherwise.
    if HAS_NOISE:
        d_load = tl.load(d_load_ptr + experts, mask=expert_mask, other=0.0).to(tl.float32)
        runner = _lane_index(tl.load(runner_ptr + tokens, mask=token_mask, other=-1), BLOCK_E)
        is_runner = experts[None, :] == runner[:, None]
        is_last = experts[None, :] == last_selected[:, None]
        runner_value = tl.sum(tl.where(is_runner, noisy, 0.0), axis=1)
        last_value = tl.sum(tl.where(is_last, noisy, 0.0), axis=1)
        threshold = tl.where(selected, runner_value[:, None], last_value[:, None])
        z = (clean - threshold) / sigma
        a = INV_SQRT_2PI * tl.exp(-0.5 * z * z) / sigma * d_load[None, :]
        a = tl.where(expert_mask[None, :] & (~selected | (runner >= 0)[:, None]), a, 0.0)
        a_selected = tl.sum(tl.where(selected, a, 0.0), axis=1)
        a_unselected = tl.sum(tl.where(selected, 0.0, a), axis=1)
        d_logits += a - tl.where(is_runner, a_selected[:, None], 0.0) - tl.where(is_last, a_unselected[:, None], 0.0)

    d_logits = tl.where(good[:, None], d_logits, 0.0)
    tl.store(d_logits_ptr + tokens[:, None] * num_experts + experts[None, :], d_logits,
             mask=token_mask[:, None] & expert_mask[None, :])


def _tiles(num_experts: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_E, num_warps) of the forward and backward programs.

    The routing holds about eight (BLOCK_T, BLOCK_E) fp32 tiles at once (logits, probabilities,
    the top-k state, the load terms): with 64 tokens at E = 64 or 32 at E = 256 on 4 warps (32-64
    values per thread per tile) sm_90 spilled 0.1-38 KB per thread, and 16 values per thread still
    left 8-byte stack frames (sm_90, E = 256) and a 5 KB spill (sm_80, fp32 FMA dot at E = 64).
    So BLOCK_T shrinks as E grows (64 tokens up to E = 32, 32 at E = 64, 16 from E = 128) and the
    warps grow to keep 8 values per thread (8 warps at E = 64, 16 at E = 256; beyond E = 256, 16
    warps and more per thread). The interpreter (CPU tensors) keeps 16-token programs.
    """
    block_e = max(16, triton.next_power_of_2(num_experts))
    if device.type == "cpu":
        return 16, block_e, 4
    block_t = max(16, min(64, 2048 // block_e))
    num_warps = max(4, min(16, block_t * block_e // (8 * 32)))
    return block_t, block_e, num_warps


def _blocks(x: torch.Tensor, router_weight: torch.Tensor, num_experts: int):
    """Tile sizes, warps and the dot precision of a forward call (see the module docstring)."""
    block_t, block_e, num_warps = _tiles(num_experts, x.device)
    # The (BLOCK_D, BLOCK_E) weight tile is staged in shared memory per pipeline stage: 32 rows
    # from BLOCK_E = 128 on keep 3 fp32 stages at E = 256 to 96 KiB.
    block_d = max(16, min(64 if block_e <= 64 or x.device.type == "cpu" else 32, triton.next_power_of_2(max(x.shape[1], 1))))
    low_precision = x.device.type != "cpu" and x.dtype in (torch.float16, torch.bfloat16) and router_weight.dtype == x.dtype
    return block_t, block_e, block_d, num_warps, low_precision


@torch.library.custom_op("sm4::triton_topk_gating_forward", mutates_args=(), device_types=("cuda", "cpu"))
def gating_forward(
    x: torch.Tensor, router_weight: torch.Tensor, noise: torch.Tensor | None, token_k: torch.Tensor | None,
    k: int, sigma: float, renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.sm4.topk_gating_forward (csrc/sm4_ops.cpp); fp32 routing values."""
    x = x.contiguous()
    weight = router_weight.contiguous()
    tokens, dim = x.shape
    experts = weight.shape[1]
    block_t, block_e, block_d, num_warps, low_precision = _blocks(x, weight, experts)
    programs = triton.cdiv(tokens, block_t)
    ids = torch.empty(tokens, k, dtype=torch.int64, device=x.device)
    gates = torch.empty(tokens, k, dtype=torch.float32, device=x.device)
    entropy = torch.empty(tokens, dtype=torch.float32, device=x.device)
    runner = torch.empty(tokens, dtype=torch.int64, device=x.device)
    logits = torch.empty(tokens, experts, dtype=torch.float32, device=x.device)
    block_importance = torch.zeros(max(programs, 1), experts, dtype=torch.float32, device=x.device)
    block_load = torch.zeros_like(block_importance)
    block_counts = torch.zeros(max(programs, 1), experts, dtype=torch.int64, device=x.device)
    has_noise = sigma > 0
    if programs:
        _gating_forward_kernel[(programs,)](
            x, weight, noise.contiguous() if has_noise else x, token_k.contiguous() if token_k is not None else x,
            ids, gates, entropy, runner, logits, block_importance, block_load, block_counts,
            tokens, dim, experts, float(sigma),
            K=k, K_PAD=triton.next_power_of_2(k), NUM_RANKED=min(k + 1, experts),
            HAS_NOISE=has_noise, HAS_TOKEN_K=token_k is not None, RENORMALIZE=renormalize,
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_D=block_d, D_BLOCKS=triton.cdiv(dim, block_d),
            LOW_PRECISION_DOT=low_precision, num_warps=num_warps,
        )
    # Per-program partial sums, added in program order: deterministic.
    return (gates, ids, entropy, block_importance.sum(0), block_load.sum(0), block_counts.sum(0), runner, logits)


@torch.library.custom_op("sm4::triton_topk_gating_backward", mutates_args=(), device_types=("cuda", "cpu"))
def gating_backward(
    grad_gates: torch.Tensor, grad_importance: torch.Tensor, grad_load: torch.Tensor, logits: torch.Tensor,
    noise: torch.Tensor | None, expert_ids: torch.Tensor, runner_up: torch.Tensor, sigma: float, renormalize: bool,
) -> torch.Tensor:
    """Same contract as torch.ops.sm4.topk_gating_backward: d loss / d logits, (T, E) fp32."""
    tokens, experts = logits.shape
    k = expert_ids.shape[1]
    block_t, block_e, num_warps = _tiles(experts, logits.device)
    d_logits = torch.empty(tokens, experts, dtype=torch.float32, device=logits.device)
    programs = triton.cdiv(tokens, block_t)
    has_noise = sigma > 0
    if programs:
        _gating_backward_kernel[(programs,)](
            logits.contiguous(), noise.contiguous() if has_noise else logits, expert_ids.contiguous(), runner_up.contiguous(),
            grad_gates.float().contiguous(), grad_importance.float().contiguous(), grad_load.float().contiguous(), d_logits,
            tokens, experts, float(sigma),
            K=k, HAS_NOISE=has_noise, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )
    return d_logits


routing.register_gating("sm4::triton_topk_gating_forward", "sm4::triton_topk_gating_backward", gating_backward)
topk_gating = routing.make_topk_gating(gating_forward)

