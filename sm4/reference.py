"""The reference path: every sm4 op in plain PyTorch, written for clarity, exactly per SM4_SPEC §2.

This module is the ground truth. Tests compare every kernel against it (in float64 when they
can), benchmarks time it as the baseline, and nothing else in the package re-implements it.

Precision: each op computes in ``promote_types(input dtype, float32)`` - float32 for fp16/bf16/
fp32 inputs, float64 for float64 inputs (so ``gradcheck`` runs on it) - and returns activations
in the input's dtype, routing values (gates, entropy, loss terms) in the compute dtype.

The functions here assume inputs that ``sm4.ops`` has already validated; call them through
``sm4.ops.<op>(..., backend="reference")`` unless you are writing a test. The composites
(``moe_linear``, ``moe_ffn``, ``moe_attention``) are written once, in ``sm4.ops``, as pipelines of
the steps below: with ``backend="reference"`` every step runs here, and that is the reference MoE
linear, MoE FFN and MoE attention.

Not a hot path: ``grouped_linear`` reads ``expert_offsets`` on the host to slice each expert's
rows, which is the clearest statement of the op. The kernels never do this.
"""

import math

import torch
import torch.nn.functional as F

from .types import RoutingMetadata, RoutingResult

# Added to mean^2 in CV^2 so that an all-zero vector (no tokens) has CV^2 = 0, not NaN.
CV_EPS = 1e-10


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half and single inputs, float64 for double."""
    return torch.promote_types(dtype, torch.float32)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)^2 + 1e-10)``, unbiased variance.

    values: (E,) float. A single expert is trivially balanced: E = 1 gives 0 (the unbiased
    variance of one value is undefined).
    """
    if values.numel() < 2:
        return values.sum() * 0.0
    return values.var(correction=1) / (values.mean() ** 2 + CV_EPS)


# Set by sm4.modules.batch_share while a training forward runs inside a share: draws each
# sample's noise from the share's stream (data-parallel processes then draw what one process
# draws for their rows). None: draw from the generator.
sample_noise = None


def router_noise(num_tokens: int, num_experts: int, device, generator=None) -> torch.Tensor:
    """The standard-normal draws of the router noise, (T, E) float32 from ``generator``.

    Every backend draws its noise here, so a generator in the same state gives every backend the
    same noise and training-mode results compare exactly. Without a generator, inside a
    ``sm4.modules.batch_share`` share, the share's per-sample draws.
    """
    if generator is None and sample_noise is not None:
        return sample_noise(num_tokens, num_experts, device)
    return torch.randn((num_tokens, num_experts), generator=generator, device=device, dtype=torch.float32)


def expert_histogram(expert_ids: torch.Tensor, num_experts: int):
    """Active assignments per expert and their exclusive prefix sum.

    expert_ids: (T, k_max) int32/int64 in [-1, E), -1 = no assignment.
    Returns counts (E,) int64 and offsets (E + 1,) int64, offsets[E] = number of assignments.
    """
    ids = expert_ids.reshape(-1).long()
    active = ids >= 0
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.index_add_(0, ids.clamp_min(0), active.long())
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return counts, offsets


def topk_gating(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    k: int,
    token_k: torch.Tensor | None = None,
    noise_std: float = 1.0,
    training: bool = False,
    renormalize: bool = False,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> RoutingResult:
    """Noisy top-k gating with per-token k and the load & importance balancing terms.

    x: (T, d) float. router_weight: (d, E) float. k: k_max, 1 <= k <= E.
    token_k: optional (T,) int, 1 <= k_t <= k. noise: optional (T, E) standard-normal draws, used
    instead of drawing from ``generator`` (it is scaled by ``noise_std / E`` here).
    """
    cdt = compute_dtype(x.dtype)
    num_tokens, num_experts = x.shape[0], router_weight.shape[1]
    # A token whose input or logits are not all finite must not disturb the others. Its row is
    # zeroed before the router matmul (else NaN * 0 in the backward would reach every router
    # weight); it is routed as if all its logits were equal (lowest expert indices); its gates and
    # entropy are NaN, so its own output is visibly NaN; it is left out of importance and load.
    x = x.to(cdt)
    finite_input = torch.isfinite(x).all(dim=-1)  # (T,)
    logits = torch.where(finite_input[:, None], x, 0.0) @ router_weight.to(cdt)  # (T, E) clean

    # V-MoE noise: std noise_std / E, only while training. sigma = 0 means "no noise".
    sigma = noise_std / num_experts if training else 0.0
    if sigma > 0:
        if noise is None:
            noise = router_noise(num_tokens, num_experts, logits.device, generator)
        noisy = logits + sigma * noise.to(cdt)
    else:
        noisy = logits

    finite = finite_input & torch.isfinite(noisy).all(dim=-1)  # (T,)
    noisy = torch.where(finite[:, None], noisy, 0.0)
    clean = torch.where(finite[:, None], logits, 0.0)

    probs = torch.softmax(noisy, dim=-1)  # gating probabilities
    # A stable descending sort keeps equal logits in index order: ties go to the lower index.
    sorted_logits, order = torch.sort(noisy, dim=-1, descending=True, stable=True)
    top_ids = order[:, :k]  # (T, k)

    if token_k is None:
        token_k = torch.full((num_tokens,), k, dtype=torch.int64, device=x.device)
    token_k = token_k.long()
    active = torch.arange(k, device=x.device)[None, :] < token_k[:, None]  # (T, k)

    top_probs = probs.gather(1, top_ids)
    if renormalize:
        top_probs = top_probs / (top_probs * active).sum(dim=-1, keepdim=True)
    gates = torch.where(active, top_probs, 0.0)
    gates = torch.where(finite[:, None] | ~active, gates, math.nan)
    expert_ids = torch.where(active, top_ids, -1)

    # Entropy and importance use the clean softmax (no noise), per SM4_SPEC §2.
    clean_probs = torch.softmax(clean, dim=-1)
    entropy = -torch.special.xlogy(clean_probs, clean_probs).sum(dim=-1).detach()
    entropy = torch.where(finite, entropy, math.nan)
    counted = finite[:, None].to(cdt)  # (T, 1): 1 for the tokens that enter the loss terms
    importance = (clean_probs * counted).sum(dim=0)

    selected = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x.device)
    selected.scatter_(1, top_ids, active)  # (T, E): expert is among the token's top-k_t
    if sigma > 0:
        # Smooth load (Shazeer et al. 2017): P(token routed to e) = Phi((clean_e - thr_e) / sigma),
        # thr_e = k_t-th largest noisy logit, or the (k_t+1)-th when e itself is selected
        # (-inf when k_t = E: a selected expert then stays selected whatever the noise).
        padded = torch.cat([sorted_logits, sorted_logits.new_full((num_tokens, 1), -math.inf)], 1)
        kth = padded.gather(1, (token_k - 1)[:, None])
        kth_plus_one = padded.gather(1, token_k[:, None])
        threshold = torch.where(selected, kth_plus_one, kth)
        load = (torch.special.ndtr((clean - threshold) / sigma) * counted).sum(dim=0)
    else:
        load = (selected.to(cdt) * counted).sum(dim=0)

    expert_counts, _ = expert_histogram(expert_ids, num_experts)
    return RoutingResult(
        expert_ids=expert_ids,
        gates=gates,
        entropy=entropy,
        expert_counts=expert_counts,
        importance=importance,
        load=load,
        importance_loss=cv_squared(importance),
        load_loss=cv_squared(load),
    )


def routing_metadata(expert_ids: torch.Tensor, num_experts: int) -> RoutingMetadata:
    """Stable expert order of the assignments, its inverse and the expert offsets.

    expert_ids: (T, k_max) int, -1 = no assignment. See RoutingMetadata for the outputs.
    """
    num_tokens, k_max = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    active = flat >= 0
    # Inactive assignments sort after every expert; the stable sort keeps (token, rank) order.
    sort_key = torch.where(active, flat, num_experts)
    sorted_assignment = torch.argsort(sort_key, stable=True)
    sorted_token = torch.div(sorted_assignment, max(k_max, 1), rounding_mode="floor")
    rows = torch.arange(flat.numel(), device=flat.device)
    assignment_row = torch.empty_like(rows).scatter_(0, sorted_assignment, rows)
    assignment_row = torch.where(active, assignment_row, -1).view(num_tokens, k_max)
    counts, offsets = expert_histogram(expert_ids, num_experts)
    return RoutingMetadata(counts, offsets, sorted_assignment, sorted_token, assignment_row)


def _zero_padding_rows(rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """Zero the rows at or past expert_offsets[-1] (where, not multiply: NaN * 0 is NaN)."""
    in_use = torch.arange(rows.shape[0], device=rows.device) < expert_offsets[-1]
    return torch.where(in_use[:, None], rows, 0.0)


def permute(x: torch.Tensor, metadata: RoutingMetadata) -> torch.Tensor:
    """Gather token rows into expert order. x: (T, d) -> (N, d), padding rows zero."""
    return _zero_padding_rows(x.index_select(0, metadata.sorted_token), metadata.expert_offsets)


def unpermute(y_sorted: torch.Tensor, gates: torch.Tensor, metadata: RoutingMetadata) -> torch.Tensor:
    """Weighted combine back to token order: ``y[t] = sum_r gates[t, r] * y_sorted[row(t, r)]``.

    y_sorted: (N, d). gates: (T, k_max) float. Returns (T, d) in y_sorted's dtype. Inactive
    ranks contribute exactly nothing (not 0 * value, which would spread a NaN).
    """
    cdt = compute_dtype(y_sorted.dtype)
    row = metadata.assignment_row  # (T, k)
    active = row >= 0
    gathered = y_sorted.to(cdt)[row.clamp_min(0)]  # (T, k, d)
    weighted = torch.where(active[..., None], gates.to(cdt)[..., None] * gathered, 0.0)
    return weighted.sum(dim=1).to(y_sorted.dtype)


def grouped_linear(
    x_sorted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    expert_offsets: torch.Tensor,
) -> torch.Tensor:
    """Per-expert ``x[rows of e] @ weight[e] + bias[e]``.

    x_sorted: (N, in). weight: (E, in, out). bias: (E, out) or None. expert_offsets: (E + 1,)
    int64. Returns (N, out) in x's dtype; rows past expert_offsets[-1] are zero.
    """
    cdt = compute_dtype(x_sorted.dtype)
    num_rows, num_experts, out_features = x_sorted.shape[0], weight.shape[0], weight.shape[2]
    bounds = expert_offsets.tolist()  # host read: the reference slices, the kernels do not
    pieces = []
    for e in range(num_experts):
        rows = x_sorted[bounds[e] : bounds[e + 1]].to(cdt)
        y = rows @ weight[e].to(cdt)
        pieces.append(y if bias is None else y + bias[e].to(cdt))
    pieces.append(x_sorted.new_zeros(num_rows - bounds[-1], out_features, dtype=cdt))
    return torch.cat(pieces).to(x_sorted.dtype)


ACTIVATIONS = {
    "gelu": lambda h: F.gelu(h),  # exact, with erf
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


def grouped_ffn(
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    expert_offsets: torch.Tensor,
    activation: str = "gelu",
    recompute_hidden: bool = False,
) -> torch.Tensor:
    """Per-expert ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]``.

    x_sorted: (N, d). w1: (E, d, h). b1: (E, h) or None. w2: (E, h, d_out). b2: (E, d_out) or
    None. Returns (N, d_out) in x's dtype; padding rows zero (GELU(0) = 0). The hidden layer is
    kept in the compute dtype, as a fused kernel keeps it in registers.
    """
    cdt = compute_dtype(x_sorted.dtype)
    hidden = ACTIVATIONS[activation](grouped_linear(x_sorted.to(cdt), w1, b1, expert_offsets))
    return grouped_linear(hidden, w2, b2, expert_offsets).to(x_sorted.dtype)


def expert_linear(x, weight, bias, gates, metadata: RoutingMetadata):
    """The expert half of moe_linear: permute -> grouped_linear -> unpermute (weighted combine).

    x: (T, in). gates: (T, k), or (T, G, k) when the metadata routes G groups of k ranks per token
    (then expert ids of group g are offset by g * E, the fused Q/K/V layout); returns (T, out), or
    (T, G, out) combined group by group.
    """
    y_sorted = grouped_linear(permute(x, metadata), weight, bias, metadata.expert_offsets)
    return _combine_groups(y_sorted, gates, metadata)


def expert_ffn(x, w1, b1, w2, b2, gates, metadata: RoutingMetadata, activation="gelu", recompute_hidden=False):
    """The expert half of moe_ffn: permute -> grouped_ffn -> unpermute. gates: (T, k)."""
    y_sorted = grouped_ffn(permute(x, metadata), w1, b1, w2, b2, metadata.expert_offsets, activation)
    return _combine_groups(y_sorted, gates, metadata)


def _combine_groups(y_sorted, gates, metadata: RoutingMetadata):
    k = gates.shape[-1]
    grouped = metadata._replace(assignment_row=metadata.assignment_row.reshape(-1, k))
    return unpermute(y_sorted, gates.reshape(-1, k), grouped).view(*gates.shape[:-1], y_sorted.shape[1])



# ---- The two primitives of the grouped-GEMM kernels -----------------------------------------
# Every kernel backend builds grouped_linear, grouped_ffn and the fused expert layers of
# sm4/grouped.py from these two; here they are in plain PyTorch, for the kernel tests. The
# contract is in csrc/sm4_ops.cpp (grouped_mm, grouped_weight_grad).

ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2}


def _expert_of_rows(expert_offsets: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert index (M,), active (M,)) of each sorted row."""
    rows = torch.arange(num_rows, device=expert_offsets.device)
    expert = torch.searchsorted(expert_offsets[1:], rows, right=True)
    return expert.clamp_max(expert_offsets.numel() - 2), rows < expert_offsets[-1]


def grouped_mm(a, weight, bias, expert_offsets, gather_index=None, scatter_index=None, scatter_scale=None,
               num_out_rows=None, transpose_weight=False, activation=0, save_preact=False):
    """The grouped_mm primitive (csrc/sm4_ops.cpp): out[scatter(i)] = act(a[gather(i)] @ W_e + b_e) * scale_i.

    a: (R, K). weight: (E, K, N), or (E, N, K) with transpose_weight. Returns (out, preact) in
    a's dtype, computed in promote(a.dtype, float32) row by row (no per-expert loop needed here).
    """
    cdt = compute_dtype(a.dtype)
    rows = a if gather_index is None else a[gather_index]
    num_rows = rows.shape[0]
    w = weight.transpose(1, 2) if transpose_weight else weight
    expert, active = _expert_of_rows(expert_offsets, num_rows)
    pre = torch.einsum("mk,mkn->mn", rows.to(cdt), w.to(cdt)[expert]) if num_rows else rows.new_zeros(0, w.shape[2], dtype=cdt)
    if bias is not None:
        pre = pre + bias.to(cdt)[expert]
    pre = torch.where(active[:, None], pre, 0.0)
    y = pre if activation == 0 else ACTIVATIONS[("gelu", "gelu_tanh")[activation - 1]](pre)
    if scatter_scale is not None:
        y = y * scatter_scale.to(cdt)[:, None]
    y = torch.where(active[:, None], y, 0.0)
    out_rows = num_rows if num_out_rows is None else num_out_rows
    out = y.new_zeros(out_rows, y.shape[1])
    if scatter_index is None:
        out[:num_rows] = y
    else:
        target = torch.where(active, scatter_index, out_rows)  # inactive rows go to a dropped row
        out = torch.cat([out, out.new_zeros(1, y.shape[1])]).index_copy(0, target[active], y[active])[:out_rows]
    preact = pre.to(a.dtype) if save_preact and activation != 0 else a.new_zeros(0, y.shape[1])
    return out.to(a.dtype), preact


def grouped_weight_grad(a, grad, expert_offsets, a_index=None, grad_index=None, compute_bias=True):
    """The grouped_weight_grad primitive: per-expert ``a_rows^T @ grad_rows`` and ``sum(grad_rows)``.

    a: (R, K). grad: (R', N). Returns grad_weight (E, K, N) and grad_bias (E, N) (or (0, N)) in
    a's dtype.
    """
    cdt = compute_dtype(a.dtype)
    a_rows = (a if a_index is None else a[a_index]).to(cdt)
    g_rows = (grad if grad_index is None else grad[grad_index]).to(cdt)
    num_experts = expert_offsets.numel() - 1
    expert, active = _expert_of_rows(expert_offsets, a_rows.shape[0])
    g_rows = torch.where(active[:, None], g_rows, 0.0)
    a_rows = torch.where(active[:, None], a_rows, 0.0)
    grad_weight = a_rows.new_zeros(num_experts, a_rows.shape[1], g_rows.shape[1])
    grad_weight.index_add_(0, expert, a_rows[:, :, None] * g_rows[:, None, :])
    grad_bias = g_rows.new_zeros(num_experts, g_rows.shape[1]).index_add_(0, expert, g_rows) if compute_bias else g_rows.new_zeros(0, g_rows.shape[1])
    return grad_weight.to(a.dtype), grad_bias.to(a.dtype)
