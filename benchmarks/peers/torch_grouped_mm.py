"""The peer sm4 must beat: a torch-native MoE written the way ``transformers`` 5.x writes its
``grouped_mm`` experts (``transformers.integrations.moe``), for sm4's three expert layers.

Per layer: softmax + top-k gating (the router GEMM and the softmax in fp32, as sm4 routes; gates
not renormalised, as SM4_SPEC §2 and ``sm4.ops.moe_*`` by default), ``torch.sort`` of the
flattened expert ids, a gather of the token rows into expert order, one
``torch.nn.functional.grouped_mm`` per expert layer (int32 end offsets: ``offs[e]`` is where expert
e's rows end), the expert bias gathered per row, GELU, the gate scale, the inverse permutation
and a reshape-sum over the k ranks. Nothing here is sm4 code: it is what a user has without sm4.

    moe_linear(x, router, w, b, k)                 -> (T, out)     linear experts
    moe_ffn(x, router, w1, b1, w2, b2, k)          -> (T, out)     FFN experts Linear -> GELU -> Linear
    moe_qkv(x, routers, weights, biases, k)        -> (T, 3, C)    three linear groups, own routers

Shapes as sm4.ops: x (T, d); router (d, E); w (E, d, out) in (in, out) layout; b (E, out) or None.
``F.grouped_mm`` takes (E, d, out) directly (it multiplies ``x_e @ w[e]``); on the CPU it needs
row strides that are multiples of 16 bytes (d, out multiples of 4 in fp32, of 8 in bf16), and it
leaves the rows past ``offs[-1]`` unwritten in the output and in the input's gradient (garbage,
not zeros), so inactive ranks (a per-token k below k_max) are sorted last under a sentinel id E
and their rows are zeroed before and after each grouped GEMM (transformers zeroes them once).

``routing(...)`` also returns the statistics sm4's modules record (importance, a hard load,
entropy), so that a module can run on these experts (see ``benchmarks/peers/swap.py``).
"""

import torch
import torch.nn.functional as F

from sm4.types import RoutingResult


def _cv_squared(values: torch.Tensor) -> torch.Tensor:
    return values.var() / (values.mean() ** 2 + 1e-10) if values.numel() > 1 else values.new_zeros(())


def gate(x, router, k, *, token_k=None, training=False, noise_std=1.0, noise=None, router_input=None):
    """Softmax top-k gating. Returns (gates (T, k) fp32, ids (T, k) int64 with E for inactive
    ranks, clean probabilities (T, E) fp32).

    Training adds V-MoE noise (std noise_std / E) to the logits before the softmax, as sm4 does;
    ``noise`` (T, E) standard-normal draws replace torch.randn (tests pass sm4's own draws).
    """
    source = x if router_input is None else router_input
    logits = source.float() @ router.float()
    experts = router.shape[1]
    noisy = logits
    if training and noise_std > 0:
        noise = torch.randn_like(logits) if noise is None else noise.float()
        noisy = logits + noise * (noise_std / experts)
    probs = torch.softmax(noisy, dim=-1)
    gates, ids = probs.topk(k, dim=-1)
    if token_k is not None:
        active = torch.arange(k, device=x.device) < token_k[:, None]
        gates = gates * active
        ids = torch.where(active, ids, experts)
    clean = probs if noisy is logits else torch.softmax(logits, dim=-1)
    return gates, ids, clean


def routing(x, router, k, **gating):
    """gate(...) plus what sm4's modules keep: a RoutingResult (ids -1 for inactive ranks) whose
    balance loss is CV^2(importance) + CV^2(hard load) (sm4 uses a smooth load in training)."""
    gates, ids, probs = gate(x, router, k, **gating)
    experts = router.shape[1]
    counts = torch.histc(ids.float(), bins=experts, min=0, max=experts - 1).long()
    importance, load = probs.sum(0), counts.to(probs.dtype)
    entropy = -torch.special.xlogy(probs, probs).sum(-1).detach()
    result = RoutingResult(torch.where(ids < experts, ids, -1), gates, entropy, counts, importance, load,
                           _cv_squared(importance), _cv_squared(load))
    return gates, ids, result


def _expert_order(ids: torch.Tensor, experts: int):
    """ids (T, k) -> (perm (T*k,) the assignments in expert order, sorted ids, int32 end offsets (E,))."""
    sorted_ids, perm = torch.sort(ids.reshape(-1), stable=True)
    # histc: a fixed-size histogram (bincount's size depends on the data, a graph break in
    # torch.compile); its CPU kernel wants floats. The sentinel id E falls outside [0, E-1].
    counts = torch.histc(sorted_ids.float(), bins=experts, min=0, max=experts - 1)
    return perm, sorted_ids, torch.cumsum(counts, 0, dtype=torch.int32)


def _grouped_linear(rows, weight, bias, offs, expert_of_row):
    out = F.grouped_mm(rows, weight, offs=offs)
    return out if bias is None else out + bias[expert_of_row]


def experts_forward(x, gates, ids, layers, activation=F.gelu, any_inactive=False):
    """The grouped-mm experts over gated assignments.

    x (T, d); gates (T, k); ids (T, k) int64 (E = inactive); layers: [(w (E, d_in, d_out),
    b (E, d_out) or None), ...] with ``activation`` between consecutive layers. any_inactive:
    ids may hold the sentinel (a per-token k was given). Returns (T, d_out).
    """
    tokens, k = ids.shape
    experts = layers[0][0].shape[0]
    perm, sorted_ids, offs = _expert_order(ids, experts)
    inactive = (sorted_ids >= experts)[:, None]
    expert_of_row = sorted_ids.clamp(max=experts - 1)
    mask = (lambda rows: rows.masked_fill(inactive, 0.0)) if any_inactive else (lambda rows: rows)
    hidden = mask(x[perm // k])  # zero rows: their garbage input gradient is cut here
    for i, (weight, bias) in enumerate(layers):
        if i:
            hidden = activation(hidden)
        hidden = mask(_grouped_linear(hidden, weight, bias, offs, expert_of_row))
    weighted = hidden * gates.reshape(-1)[perm, None].to(hidden.dtype)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return weighted[inverse].view(tokens, k, -1).sum(1)


def moe_linear(x, router, weight, bias, k, **gating):
    """x (T, d) -> (T, out): sum over t's top-k experts e of gate * (x[t] @ weight[e] + bias[e])."""
    gates, ids, _ = gate(x, router, k, **gating)
    return experts_forward(x, gates, ids, [(weight, bias)], any_inactive=gating.get("token_k") is not None)


def moe_ffn(x, router, w1, b1, w2, b2, k, **gating):
    """x (T, d) -> (T, out): the FFN experts gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e], gated."""
    gates, ids, _ = gate(x, router, k, **gating)
    return experts_forward(x, gates, ids, [(w1, b1), (w2, b2)], any_inactive=gating.get("token_k") is not None)


def moe_qkv(x, routers, weights, biases, k, **gating):
    """x (T, d) -> (T, 3, C): Q, K, V, each a linear expert group (weights[g] (E, d, C)) with its own router."""
    return torch.stack([moe_linear(x, routers[g], weights[g], None if biases is None else biases[g], k, **gating)
                        for g in range(3)], 1)


LAYERS = {"moe_linear": moe_linear, "moe_ffn": moe_ffn, "moe_qkv": moe_qkv}
