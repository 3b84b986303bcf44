"""The op contract: the functional API every backend implements.

Each function checks its arguments (a ``TypeError``/``ValueError`` naming the argument, before any
kernel runs), then runs on the backend that ``sm4.dispatch`` selects (``backend=`` forces one).

    op                 inputs -> outputs (T tokens, E experts, N = T * k_max rows in expert order)
    topk_gating        x (T, d), router_weight (d, E)          -> RoutingResult
    expert_histogram   expert_ids (T, k_max)                     -> counts (E,), offsets (E + 1,)
    routing_metadata   expert_ids (T, k_max)                     -> RoutingMetadata
    permute            x (T, d), metadata                        -> x_sorted (N, d)
    unpermute          y_sorted (N, d), gates (T, k_max), meta   -> y (T, d)
    grouped_linear     x_sorted (N, in), weight (E, in, out)     -> (N, out)
    grouped_ffn        x_sorted (N, d), w1 (E, d, h), w2 (E, h, d_out) -> (N, d_out)
    expert_linear      x (T, in), weight, gates (T, k), metadata     -> (T, out)   fused gather/GEMM/combine
    expert_ffn         x (T, d), w1, w2, gates (T, k), metadata      -> (T, d_out) fused gather/FFN/combine
    moe_linear         gating -> metadata -> expert_linear  (fused=False: permute -> grouped_linear -> unpermute)
    moe_ffn            gating -> metadata -> expert_ffn     (fused=False: permute -> grouped_ffn -> unpermute)
    moe_qkv            three routings of one x -> one grouped GEMM over the 3E Q/K/V experts
    moe_attention      Q, K, V from mixtures of linear experts (own routers) -> SDPA -> output projection

k is the maximum number of experts per token (a Python int, 1 <= k <= E); a per-token k is
``token_k``, a (T,) int tensor with 1 <= k_t <= k, accepted by every op that takes k. Routing
semantics are SM4_SPEC §2 (see ``sm4.reference`` for the exact definitions).

Float dtypes: fp16, bf16, fp32 on every backend, fp64 on the reference and cpu backends; mixed
router/x and rows/weight dtypes are accepted (README, "Dtypes accepted").
Accumulation is in float32 (float64 for float64 inputs).
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import dispatch
from ._checks import (FLOAT_DTYPES, INDEX_DTYPES, Checker, check_metadata_values, check_offsets_values, reads_values, received,
                      trust_metadata)
from .types import MoEOutput, RoutingMetadata, RoutingResult

__all__ = [
    "topk_gating",
    "expert_histogram",
    "routing_metadata",
    "permute",
    "unpermute",
    "grouped_linear",
    "grouped_ffn",
    "expert_linear",
    "expert_ffn",
    "moe_linear",
    "moe_qkv",
    "router_input_for",
    "moe_ffn",
    "moe_attention",
]

ACTIVATIONS = ("gelu", "gelu_tanh")


def _check_gating(c: Checker, x, router_weight, k, token_k, noise_std, training, renormalize, generator, noise,
                  x_name="x"):
    dim = "d" if x_name == "x" else "d_r"
    c.tensor(x_name, x, f"(T, {dim})", FLOAT_DTYPES)
    c.tensor("router_weight", router_weight, f"({dim}, E)", FLOAT_DTYPES)
    _check_gating_options(c, router_weight.shape[1], k, token_k, noise_std, training, renormalize, generator, x.device)
    c.tensor("noise", noise, "(T, E)", FLOAT_DTYPES, optional=True)


def _check_gating_options(c: Checker, num_experts, k, token_k, noise_std, training, renormalize, generator, device):
    """The gating arguments other than the tensors x, router_weight and noise."""
    if num_experts < 1:
        c.fail(ValueError, "router_weight must have at least one expert (E >= 1), got E = 0")
    c.integer("k", k, 1, num_experts, "E")
    c.per_token_k(token_k, k)
    c.number("noise_std", noise_std)
    for name, flag in (("training", training), ("renormalize", renormalize)):
        if not isinstance(flag, bool):
            c.fail(TypeError, f"{name} must be a bool, got {received(flag)}")
    c.generator(generator, device)


def topk_gating(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    k: int,
    *,
    token_k: torch.Tensor | None = None,
    noise_std: float = 1.0,
    training: bool = False,
    renormalize: bool = False,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    backend: str | None = None,
) -> RoutingResult:
    """Noisy top-k routing of T tokens over E experts, with the balancing-loss terms.

    Args:
        x: (T, d) fp16/bf16/fp32/fp64 token features.
        router_weight: (d, E) float, the router ``W_g`` (no bias); fp32 or x's dtype.
        k: k_max, the number of experts kept per token (1 <= k <= E).
        token_k: optional (T,) int32/int64 per-token k, 1 <= k_t <= k; ranks >= k_t are inactive.
        noise_std: V-MoE noise scale; the noise std is ``noise_std / E``, added only in training.
        training: add noise (and use the smooth load estimate) when True.
        renormalize: rescale each token's active gates to sum to 1 (off in the papers).
        generator: torch.Generator on x's device for the noise, for reproducible runs.
        noise: optional (T, E) standard-normal draws to use instead of drawing (scaled inside).
        backend: force a backend ("reference", "cpu", "cuda", "triton"), or None/"auto".

    Returns: RoutingResult (see sm4.types): expert_ids (T, k) int64 (-1 = inactive rank), gates
    (T, k), entropy (T,), expert_counts (E,) int64, importance (E,), load (E,), and the two CV^2
    loss terms; float outputs are fp32 (fp64 for fp64 x). Gradients reach x and router_weight
    through the gates and both loss terms; entropy is a statistic and is not differentiated.

    Non-finite input: a token whose features or logits contain NaN/inf is routed to the lowest
    expert indices with NaN gates and entropy (its own output is NaN), and is left out of
    importance and load, so the other tokens' results and the balancing loss stay finite.
    """
    c = Checker("sm4.ops.topk_gating")
    _check_gating(c, x, router_weight, k, token_k, noise_std, training, renormalize, generator, noise)
    return _run_gating(x, router_weight, k, token_k, noise_std, training, renormalize, generator, noise, backend)


# ---- The unchecked halves of the ops ---------------------------------------------------------
# Each public op is "check the arguments, then _run_<op>". The composites (moe_linear, moe_ffn,
# moe_qkv, moe_attention) check everything once at entry and then call these directly: on a CPU
# the sub-ops' checks (a Checker per op, the expert ids' min/max) cost tens of microseconds each,
# and they could only re-prove what the composite's checks and the gating's output already imply.


def _run_gating(x, router_weight, k, token_k, noise_std, training, renormalize, generator, noise, backend):
    """topk_gating on checked arguments."""
    sizes = {"T": x.shape[0], "d": x.shape[1], "E": router_weight.shape[1], "k": k}
    _, impl = dispatch.select("topk_gating", {"x": x, "router_weight": router_weight, "noise": noise}, backend, sizes)
    return impl(
        x, router_weight, k, token_k=token_k, noise_std=noise_std, training=training,
        renormalize=renormalize, generator=generator, noise=noise,
    )


def _run_metadata(expert_ids, num_experts, token_k, backend):
    """routing_metadata on checked expert ids (e.g. topk_gating's, in [-1, E) by construction)."""
    _, impl = dispatch.select("routing_metadata", (expert_ids,), backend, {"E": num_experts})
    metadata = impl(_mask_ranks(expert_ids, token_k), num_experts)
    trust_metadata(metadata)  # right by construction: the ops that take it need not check it again
    return metadata


def _run_expert_linear(x, weight, bias, gates, metadata, backend):
    """expert_linear on checked arguments (gates may also be (T, G, k): G routings, see moe_qkv)."""
    _, impl = dispatch.select("expert_linear", (x, weight, bias, gates, metadata.sorted_token), backend)
    return impl(x, weight, bias, gates, metadata)


def _run_expert_ffn(x, w1, b1, w2, b2, gates, metadata, activation, recompute_hidden, backend):
    """expert_ffn on checked arguments."""
    _, impl = dispatch.select("expert_ffn", (x, w1, b1, w2, b2, gates, metadata.sorted_token), backend)
    return impl(x, w1, b1, w2, b2, gates, metadata, activation, recompute_hidden)


def _check_expert_ids(c: Checker, expert_ids, num_experts):
    c.tensor("expert_ids", expert_ids, "(T, k_max)", INDEX_DTYPES)
    c.integer("num_experts", num_experts, 1)
    if reads_values(expert_ids) and expert_ids.numel():
        low, high = int(expert_ids.min()), int(expert_ids.max())
        if low < -1 or high >= num_experts:
            c.fail(ValueError, f"expert_ids must lie in [-1, num_experts={num_experts}), got values in [{low}, {high}]")


def expert_histogram(expert_ids: torch.Tensor, num_experts: int, *, backend: str | None = None):
    """Active assignments per expert and their exclusive prefix sum.

    Args:
        expert_ids: (T, k_max) int32/int64 in [-1, E); -1 = no assignment.
        num_experts: E.
    Returns: counts (E,) int64 and offsets (E + 1,) int64 with offsets[E] = number of assignments.
    """
    c = Checker("sm4.ops.expert_histogram")
    _check_expert_ids(c, expert_ids, num_experts)
    _, impl = dispatch.select("expert_histogram", (expert_ids,), backend)
    return impl(expert_ids, num_experts)


def _mask_ranks(expert_ids: torch.Tensor, token_k: torch.Tensor | None) -> torch.Tensor:
    """Set ranks >= token_k[t] of each token to -1 (no assignment)."""
    if token_k is None:
        return expert_ids
    ranks = torch.arange(expert_ids.shape[1], device=expert_ids.device)
    return torch.where(ranks[None, :] < token_k[:, None], expert_ids, -1)


def routing_metadata(
    expert_ids: torch.Tensor,
    num_experts: int,
    *,
    token_k: torch.Tensor | None = None,
    backend: str | None = None,
) -> RoutingMetadata:
    """Stable expert order of the assignments, its inverse, and int64 expert offsets.

    Args:
        expert_ids: (T, k_max) int32/int64 in [-1, E); -1 = no assignment.
        num_experts: E.
        token_k: optional (T,) int per-token k; ranks >= k_t are treated as -1.
    Returns: RoutingMetadata (see sm4.types); buffers sized T * k_max, no host sync.
    """
    c = Checker("sm4.ops.routing_metadata")
    _check_expert_ids(c, expert_ids, num_experts)
    c.per_token_k(token_k, expert_ids.shape[1])
    return _run_metadata(expert_ids, num_experts, token_k, backend)


def _check_expert_offsets(c: Checker, name: str, offsets):
    """(E + 1,) int64 with E >= 1 (shape and dtype; the values are checked by the caller)."""
    c.tensor(name, offsets, "(E + 1,)", (torch.int64,))
    if offsets.shape[0] < 2:
        c.fail(ValueError, f"{name} must have E + 1 >= 2 entries (at least one expert), got shape {tuple(offsets.shape)}")


def _check_metadata(c: Checker, metadata):
    """Every field's shape and dtype (the values are checked last, by _check_metadata_values)."""
    if not isinstance(metadata, RoutingMetadata):
        c.fail(TypeError, f"metadata must be the RoutingMetadata of sm4.ops.routing_metadata, got {received(metadata)}")
    _check_expert_offsets(c, "metadata.expert_offsets", metadata.expert_offsets)
    c.tensor("metadata.expert_counts", metadata.expert_counts, "(E,)", (torch.int64,))
    c.tensor("metadata.sorted_assignment", metadata.sorted_assignment, "(N,)", (torch.int64,))
    c.tensor("metadata.sorted_token", metadata.sorted_token, "(N,)", (torch.int64,))
    c.tensor("metadata.assignment_row", metadata.assignment_row, "(T, k_max)", (torch.int64,))
    rows, (tokens, k_max) = metadata.sorted_token.shape[0], metadata.assignment_row.shape
    if rows != tokens * k_max:
        c.fail(ValueError, f"metadata has N = {rows} rows (metadata.sorted_token) but metadata.assignment_row is "
                           f"{tokens} x {k_max}: expected N = T * k_max = {tokens * k_max} (not from one routing_metadata call)")


def permute(x: torch.Tensor, metadata: RoutingMetadata, *, backend: str | None = None) -> torch.Tensor:
    """Gather token rows into expert order.

    x: (T, d) float. metadata: from routing_metadata. Returns x_sorted (N, d), N = T * k_max, in
    x's dtype; row i holds x[metadata.sorted_token[i]], rows past expert_offsets[-1] are zero.
    """
    c = Checker("sm4.ops.permute")
    _check_metadata(c, metadata)
    c.tensor("x", x, "(T, d)", FLOAT_DTYPES)
    check_metadata_values(c, metadata)
    _, impl = dispatch.select("permute", (x, metadata.sorted_token), backend)
    return impl(x, metadata)


def unpermute(
    y_sorted: torch.Tensor, gates: torch.Tensor, metadata: RoutingMetadata, *, backend: str | None = None
) -> torch.Tensor:
    """Weighted combine back to token order: y[t] = sum over active ranks r of gates[t, r] * row.

    y_sorted: (N, d) float. gates: (T, k_max) float. Returns y (T, d) in y_sorted's dtype,
    accumulated in fp32 in a fixed order (deterministic). Gradients reach y_sorted and gates.
    """
    c = Checker("sm4.ops.unpermute")
    _check_metadata(c, metadata)
    c.tensor("y_sorted", y_sorted, "(N, d)", FLOAT_DTYPES)
    c.tensor("gates", gates, "(T, k_max)", FLOAT_DTYPES)
    check_metadata_values(c, metadata)
    _, impl = dispatch.select("unpermute", (y_sorted, gates), backend)
    return impl(y_sorted, gates, metadata)


def _check_grouped(c: Checker, x_sorted, expert_offsets, layers):
    c.tensor("x_sorted", x_sorted, "(N, in)", FLOAT_DTYPES)
    _check_expert_offsets(c, "expert_offsets", expert_offsets)
    for weight_name, weight, weight_shape, bias_name, bias, bias_shape in layers:
        c.tensor(weight_name, weight, weight_shape, FLOAT_DTYPES)
        c.tensor(bias_name, bias, bias_shape, FLOAT_DTYPES, optional=True)


def grouped_linear(
    x_sorted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    expert_offsets: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-expert linear over rows in expert order: rows offsets[e]:offsets[e+1] @ weight[e] + bias[e].

    x_sorted: (N, in) float. weight: (E, in, out). bias: (E, out) or None. expert_offsets:
    (E + 1,) int64. Returns (N, out) in x_sorted's dtype; rows past offsets[E] are zero.
    """
    c = Checker("sm4.ops.grouped_linear")
    _check_grouped(c, x_sorted, expert_offsets, [("weight", weight, "(E, in, out)", "bias", bias, "(E, out)")])
    check_offsets_values(c, "expert_offsets", expert_offsets, x_sorted.shape[0], "N (the rows of x_sorted)")
    _, impl = dispatch.select("grouped_linear", (x_sorted, weight, bias, expert_offsets), backend)
    return impl(x_sorted, weight, bias, expert_offsets)


def grouped_ffn(
    x_sorted: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    expert_offsets: torch.Tensor,
    activation: str = "gelu",
    *,
    recompute_hidden: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-expert FFN ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` over rows in expert order.

    x_sorted: (N, in) float. w1: (E, in, h). b1: (E, h) or None. w2: (E, h, out). b2: (E, out)
    or None. activation: "gelu" (exact, erf) or "gelu_tanh". Returns (N, out) in x's dtype.
    recompute_hidden: the backward recomputes the hidden layer (one more GEMM) instead of the
    forward saving it (N * h elements); see sm4.grouped for the trade-off.
    """
    c = Checker("sm4.ops.grouped_ffn")
    _check_grouped(
        c, x_sorted, expert_offsets,
        [("w1", w1, "(E, in, h)", "b1", b1, "(E, h)"), ("w2", w2, "(E, h, out)", "b2", b2, "(E, out)")],
    )
    c.choice("activation", activation, ACTIVATIONS)
    c.flag("recompute_hidden", recompute_hidden)
    check_offsets_values(c, "expert_offsets", expert_offsets, x_sorted.shape[0], "N (the rows of x_sorted)")
    _, impl = dispatch.select("grouped_ffn", (x_sorted, w1, b1, w2, b2, expert_offsets), backend)
    return impl(x_sorted, w1, b1, w2, b2, expert_offsets, activation, recompute_hidden)


def _check_expert_inputs(c: Checker, x, gates, metadata, layers):
    c.tensor("x", x, "(T, in)", FLOAT_DTYPES)
    c.tensor("gates", gates, "(T, k)", FLOAT_DTYPES)
    _check_metadata(c, metadata)
    if metadata.assignment_row.shape != gates.shape:
        c.fail(ValueError, f"metadata is for (T, k) = {tuple(metadata.assignment_row.shape)} assignments, gates are {tuple(gates.shape)}")
    for weight_name, weight, weight_shape, bias_name, bias, bias_shape in layers:
        c.tensor(weight_name, weight, weight_shape, FLOAT_DTYPES)
        c.tensor(bias_name, bias, bias_shape, FLOAT_DTYPES, optional=True)
    if x.shape[0] != gates.shape[0]:
        c.fail(ValueError, f"x has {x.shape[0]} tokens but gates has {gates.shape[0]}")


def expert_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gates: torch.Tensor,
    metadata: RoutingMetadata,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The expert half of moe_linear, fused: y[t] = sum over t's active ranks of gate * (x[t] @ W_e + b_e).

    x: (T, in) float. weight: (E, in, out). bias: (E, out) or None. gates: (T, k) float (from
    topk_gating). metadata: routing_metadata of the same expert ids. Returns (T, out) in x's
    dtype. The kernel backends read x's rows through the sorted index inside the GEMM and write
    each output row to its token's place (no x_sorted copy); gradients reach x, weight, bias and
    gates.
    """
    c = Checker("sm4.ops.expert_linear")
    _check_expert_inputs(c, x, gates, metadata, [("weight", weight, "(E, in, out)", "bias", bias, "(E, out)")])
    check_metadata_values(c, metadata)
    return _run_expert_linear(x, weight, bias, gates, metadata, backend)


def expert_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    gates: torch.Tensor,
    metadata: RoutingMetadata,
    activation: str = "gelu",
    *,
    recompute_hidden: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The expert half of moe_ffn, fused: y[t] = sum over t's active ranks of gate * FFN_e(x[t]).

    x: (T, d). w1: (E, d, h). b1: (E, h) or None. w2: (E, h, out). b2: (E, out) or None. gates:
    (T, k). metadata: routing_metadata of the same ids. Returns (T, out) in x's dtype.
    """
    c = Checker("sm4.ops.expert_ffn")
    _check_expert_inputs(
        c, x, gates, metadata,
        [("w1", w1, "(E, in, h)", "b1", b1, "(E, h)"), ("w2", w2, "(E, h, out)", "b2", b2, "(E, out)")],
    )
    c.choice("activation", activation, ACTIVATIONS)
    c.flag("recompute_hidden", recompute_hidden)
    check_metadata_values(c, metadata)
    return _run_expert_ffn(x, w1, b1, w2, b2, gates, metadata, activation, recompute_hidden, backend)


def _check_router_input(c: Checker, x, router_input):
    if router_input is None:
        return
    c.tensor("router_input", router_input, "(T, d_r)", FLOAT_DTYPES)
    if router_input.shape[0] != x.shape[0]:
        c.fail(ValueError, f"router_input must have x's T = {x.shape[0]} rows, got shape {tuple(router_input.shape)}")


def _checked_gating_input(c: Checker, x, router_input, router_weight, *gating_args):
    """Check the routing arguments of a composite; returns what its router reads (x or router_input)."""
    _check_router_input(c, x, router_input)
    if router_input is None:
        _check_gating(c, x, router_weight, *gating_args)
        return x
    _check_gating(c, router_input, router_weight, *gating_args, x_name="router_input")
    return router_input


def router_input_for(x: torch.Tensor, router_index: torch.Tensor, num_routers: int) -> torch.Tensor:
    """The router input that gives each token its own router among ``num_routers``.

    x: (T, d); router_index: (T,) int in [0, num_routers). Returns (T, num_routers * d) with x[t]
    in block router_index[t] and zeros elsewhere, so that with router weights stacked as
    (num_routers * d, E), token t's logits are x[t] @ W[router_index[t]]: per-modality or
    per-task routers over one shared set of experts, in one gating call. Differentiable in x.
    """
    c = Checker("sm4.ops.router_input_for")
    c.tensor("x", x, "(T, d)", FLOAT_DTYPES)
    c.tensor("router_index", router_index, "(T,)", INDEX_DTYPES)
    c.integer("num_routers", num_routers, 1)
    if reads_values(router_index) and router_index.numel():
        low, high = int(router_index.min()), int(router_index.max())
        if low < 0 or high >= num_routers:
            c.fail(ValueError, f"router_index values must lie in [0, num_routers={num_routers}), got values in [{low}, {high}]")
    tokens, dim = x.shape
    index = router_index.reshape(tokens, 1, 1).expand(tokens, 1, dim).long()
    return x.new_zeros(tokens, num_routers, dim).scatter(1, index, x.unsqueeze(1)).view(tokens, num_routers * dim)


def moe_linear(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    *,
    token_k: torch.Tensor | None = None,
    noise_std: float = 1.0,
    training: bool = False,
    renormalize: bool = False,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    router_input: torch.Tensor | None = None,
    fused: bool = True,
    backend: str | None = None,
) -> MoEOutput:
    """A mixture of single-linear experts (the Q/K/V experts of sparse MoE attention).

    x: (T, in). router_weight: (in, E). weight: (E, in, out). bias: (E, out) or None. The gating
    keywords are those of topk_gating. Returns MoEOutput(output (T, out) in x's dtype, routing):
    output[t] = sum over t's active experts e of gate * (x[t] @ weight[e] + bias[e]).
    fused: gating -> metadata -> expert_linear (one grouped GEMM reading x through the index);
    False runs the unfused steps permute -> grouped_linear -> unpermute (same result).
    router_input: optional (T, d_r) input of the router instead of x (router_weight is then
    (d_r, E)); see ``router_input_for`` for per-modality or per-task routers.
    """
    c = Checker("sm4.ops.moe_linear")
    gating_x = _checked_gating_input(c, x, router_input, router_weight, k, token_k, noise_std, training, renormalize,
                                     generator, noise)
    c.tensor("weight", weight, "(E, d, out)", FLOAT_DTYPES)
    c.tensor("bias", bias, "(E, out)", FLOAT_DTYPES, optional=True)
    c.flag("fused", fused)
    return _run_moe_linear(x, gating_x, router_weight, weight, bias, k, token_k, noise_std, training, renormalize,
                           generator, noise, fused, backend)


def _run_moe_linear(x, gating_x, router_weight, weight, bias, k, token_k, noise_std, training, renormalize, generator,
                    noise, fused, backend) -> MoEOutput:
    """moe_linear on checked arguments (gating_x: what the router reads, x or router_input)."""
    routing = _run_gating(gating_x, router_weight, k, token_k, noise_std, training, renormalize, generator, noise, backend)
    # The gating's ids already have the ranks past token_k set to -1.
    metadata = _run_metadata(routing.expert_ids, router_weight.shape[1], None, backend)
    if fused:
        return MoEOutput(_run_expert_linear(x, weight, bias, routing.gates, metadata, backend), routing)
    y_sorted = grouped_linear(permute(x, metadata, backend=backend), weight, bias, metadata.expert_offsets, backend=backend)
    return MoEOutput(unpermute(y_sorted, routing.gates, metadata, backend=backend), routing)


def moe_ffn(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    k: int,
    *,
    activation: str = "gelu",
    token_k: torch.Tensor | None = None,
    noise_std: float = 1.0,
    training: bool = False,
    renormalize: bool = False,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    recompute_hidden: bool = False,
    router_input: torch.Tensor | None = None,
    fused: bool = True,
    backend: str | None = None,
) -> MoEOutput:
    """A mixture of FFN experts ``Linear(d, h) -> GELU -> Linear(h, d_out)`` (the SMoE layer).

    x: (T, d). router_weight: (d, E). w1: (E, d, h). b1: (E, h) or None. w2: (E, h, d_out).
    b2: (E, d_out) or None. Returns MoEOutput(output (T, d_out) in x's dtype, routing).
    fused: gating -> metadata -> expert_ffn (gather and combine fused into the GEMMs); False runs
    permute -> grouped_ffn -> unpermute. recompute_hidden: see grouped_ffn. router_input: as in
    moe_linear.
    """
    c = Checker("sm4.ops.moe_ffn")
    gating_x = _checked_gating_input(c, x, router_input, router_weight, k, token_k, noise_std, training, renormalize,
                                     generator, noise)
    c.tensor("w1", w1, "(E, d, h)", FLOAT_DTYPES)
    c.tensor("b1", b1, "(E, h)", FLOAT_DTYPES, optional=True)
    c.tensor("w2", w2, "(E, h, out)", FLOAT_DTYPES)
    c.tensor("b2", b2, "(E, out)", FLOAT_DTYPES, optional=True)
    c.choice("activation", activation, ACTIVATIONS)
    c.flag("recompute_hidden", recompute_hidden)
    c.flag("fused", fused)
    routing = _run_gating(gating_x, router_weight, k, token_k, noise_std, training, renormalize, generator, noise, backend)
    metadata = _run_metadata(routing.expert_ids, router_weight.shape[1], None, backend)
    if fused:
        y = _run_expert_ffn(x, w1, b1, w2, b2, routing.gates, metadata, activation, recompute_hidden, backend)
        return MoEOutput(y, routing)
    x_sorted = permute(x, metadata, backend=backend)
    y_sorted = grouped_ffn(x_sorted, w1, b1, w2, b2, metadata.expert_offsets, activation,
                           recompute_hidden=recompute_hidden, backend=backend)
    return MoEOutput(unpermute(y_sorted, routing.gates, metadata, backend=backend), routing)


def moe_qkv(
    x: torch.Tensor,
    routers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    biases: torch.Tensor | None,
    k: int,
    *,
    token_k: torch.Tensor | None = None,
    noise_std: float = 1.0,
    training: bool = False,
    renormalize: bool = False,
    generator: torch.Generator | None = None,
    router_input: torch.Tensor | None = None,
    fused: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, tuple[RoutingResult, RoutingResult, RoutingResult]]:
    """Q, K and V of sparse MoE self-attention: three routings of one x, each over its own E experts.

    x: (T, d). routers: three (d, E) router weights (q, k, v). weights: (3, E, d, C), the q, k and
    v experts stacked (keep them stacked in the module: no copy per call). biases: (3, E, C) or
    None. token_k: one (T,) per-token k for all three, or None. Returns (qkv (T, 3, C), the three
    RoutingResults). fused: the three routings become one metadata over 3E experts (ids of the k
    group offset by E, of the v group by 2E) and one grouped GEMM computes Q, K and V in a single
    launch; False runs three moe_linear (same result). router_input: optional (T, d_r) input of
    the three routers instead of x (each router then (d_r, E)), as in moe_linear.
    """
    c = Checker("sm4.ops.moe_qkv")
    c.tensor("x", x, "(T, d)", FLOAT_DTYPES)
    _check_router_input(c, x, router_input)
    if not isinstance(routers, (tuple, list)) or len(routers) != 3:
        c.fail(TypeError, f"routers must be a triple (q, k, v) of (d, E) router weights, got {received(routers)}")
    router_dim = "d" if router_input is None else "d_r"
    for name, router in zip("qkv", routers):
        c.tensor(f"routers ({name})", router, f"({router_dim}, E)", FLOAT_DTYPES)
    c.tensor("weights", weights, "(3, E, d, C)", FLOAT_DTYPES)
    c.tensor("biases", biases, "(3, E, C)", FLOAT_DTYPES, optional=True)
    c.flag("fused", fused)
    if weights.shape[0] != 3:
        c.fail(ValueError, f"weights must stack the q, k, v experts on dim 0 (3, E, d, C), got {tuple(weights.shape)}")
    num_experts = weights.shape[1]
    _check_gating_options(c, num_experts, k, token_k, noise_std, training, renormalize, generator, x.device)
    gating_x = x if router_input is None else router_input
    routings = tuple(
        _run_gating(gating_x, router, k, token_k, noise_std, training, renormalize, generator, None, backend)
        for router in routers
    )
    if not fused:
        outputs = []
        for g, routing in enumerate(routings):
            metadata = _run_metadata(routing.expert_ids, num_experts, None, backend)
            outputs.append(_run_expert_linear(x, weights[g], None if biases is None else biases[g], routing.gates,
                                              metadata, backend))
        return torch.stack(outputs, 1), routings
    # One routing over 3E experts: group g's ids shifted by g * E (-1 stays -1), ranks side by side.
    ids = torch.cat([torch.where(r.expert_ids >= 0, r.expert_ids + g * num_experts, -1) for g, r in enumerate(routings)], 1)
    metadata = _run_metadata(ids, 3 * num_experts, None, backend)
    gates = torch.stack([r.gates for r in routings], 1)  # (T, 3, k)
    flat_weights = weights.reshape(3 * num_experts, *weights.shape[2:])
    flat_biases = None if biases is None else biases.reshape(3 * num_experts, biases.shape[2])
    # expert_linear's kernels combine (T, 3, k) gates group by group (its public check wants (T, k)).
    return _run_expert_linear(x, flat_weights, flat_biases, gates, metadata, backend), routings


def moe_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    routers: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    expert_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    expert_biases: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None],
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    num_heads: int,
    k: int,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    token_k: tuple | None = None,
    noise_std: float = 1.0,
    training: bool = False,
    renormalize: bool = False,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, tuple[RoutingResult, RoutingResult, RoutingResult]]:
    """Sparse mixture of attention (SMoA, SM4_SPEC §1.4), batch-first.

    query: (B, L, d_q); key: (B, S, d_k); value: (B, S, d_v). Q, K and V each come from a group
    of single-linear experts with its own router: routers[i] (d_i, E), expert_weights[i]
    (E, d_i, C), expert_biases[i] (E, C) or None. Then torch's multi-head
    ``scaled_dot_product_attention`` (``attn_mask``, ``is_causal`` go there) and a dense output
    projection out_weight (C, C) in ``nn.Linear`` layout (out, in), out_bias (C,) or None.
    token_k: None, or a triple of per-token k for the q, k, v tokens, each (B, L) / (B, S) or None.
    Returns (output (B, L, C), (routing_q, routing_k, routing_v)).
    """
    c = Checker("sm4.ops.moe_attention")
    for name, triple in (("routers", routers), ("expert_weights", expert_weights), ("expert_biases", expert_biases)):
        if not isinstance(triple, (tuple, list)) or len(triple) != 3:
            c.fail(TypeError, f"{name} must be a triple (q, k, v), got {received(triple)}")
    c.tensor("query", query, "(B, L, d_q)", FLOAT_DTYPES)
    c.tensor("key", key, "(B, S, d_k)", FLOAT_DTYPES)
    c.tensor("value", value, "(B, S, d_v)", FLOAT_DTYPES)
    for i, (name, dim) in enumerate((("q", "d_q"), ("k", "d_k"), ("v", "d_v"))):
        c.tensor(f"routers[{i}] ({name})", routers[i], f"({dim}, E_{name})", FLOAT_DTYPES)
        c.tensor(f"expert_weights[{i}] ({name})", expert_weights[i], f"(E_{name}, {dim}, C)", FLOAT_DTYPES)
        c.tensor(f"expert_biases[{i}] ({name})", expert_biases[i], f"(E_{name}, C)", FLOAT_DTYPES, optional=True)
    c.tensor("out_weight", out_weight, "(C, C)", FLOAT_DTYPES)
    c.tensor("out_bias", out_bias, "(C,)", FLOAT_DTYPES, optional=True)
    c.integer("num_heads", num_heads, 1)
    channels = c.sizes["C"][0]
    if channels % num_heads:
        c.fail(ValueError, f"the expert output width C = {channels} must be divisible by num_heads = {num_heads}")
    if token_k is not None and (not isinstance(token_k, (tuple, list)) or len(token_k) != 3):
        c.fail(TypeError, f"token_k must be None or a triple (q, k, v) of per-token k tensors (or None each), "
                          f"got {received(token_k)}")
    for i, (tokens, shape) in enumerate(((query, "(B, L)"), (key, "(B, S)"), (value, "(B, S)"))):
        tk = None if token_k is None else token_k[i]
        if tk is not None:
            if not isinstance(tk, torch.Tensor) or tk.dtype not in INDEX_DTYPES:
                c.fail(TypeError, f"token_k[{i}] must be None or an int32/int64 tensor of shape {shape}, got "
                                  f"{getattr(tk, 'dtype', type(tk).__name__)}")
            if tk.shape != tokens.shape[:2]:
                c.fail(ValueError, f"token_k[{i}] must have shape {shape} = {tuple(tokens.shape[:2])}, got {tuple(tk.shape)}")
    c.flag("is_causal", is_causal)

    heads = []
    routings = []
    for i, tokens in enumerate((query, key, value)):
        batch, length, width = tokens.shape
        tk = None if token_k is None or token_k[i] is None else token_k[i].reshape(-1)
        out = moe_linear(
            tokens.reshape(batch * length, width), routers[i], expert_weights[i], expert_biases[i], k,
            token_k=tk, noise_std=noise_std, training=training, renormalize=renormalize,
            generator=generator, backend=backend,
        )
        heads.append(out.output.view(batch, length, num_heads, channels // num_heads).transpose(1, 2))
        routings.append(out.routing)
    attended = scaled_dot_product_attention(*heads, attn_mask=attn_mask, is_causal=is_causal)
    attended = attended.transpose(1, 2).reshape(query.shape[0], query.shape[1], channels)
    return torch.nn.functional.linear(attended, out_weight, out_bias), tuple(routings)


# Longest sequence for which inference on a CPU uses SDPA's math kernel (see below).
SHORT_SEQUENCE = 64


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False):
    """torch's ``F.scaled_dot_product_attention``, with the math kernel for short CPU inference.

    query (N, H, L, Dh), key / value (N, H, S, Dh). On a CPU, torch's fused (flash) kernel is
    slower than its math kernel on short sequences: forward, 32 x 8 heads x 24 tokens x head dim
    8 (the papers' medium layer) 583 against 304 µs, 48 tokens x 16: 533 against 466 µs, but 128
    tokens: 1046 against 1311 µs; with autograd the flash backward wins (1.6 against 2.2 ms). So
    the math kernel is chosen on a CPU, without autograd, when L and S are at most SHORT_SEQUENCE;
    everything else is torch's own choice.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    short = max(query.shape[-2], key.shape[-2]) <= SHORT_SEQUENCE
    if query.device.type == "cpu" and short and not needs_grad:
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
