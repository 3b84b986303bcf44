"""Reference grouped GEMMs and composites against independent per-token loops, in every dtype."""

import pytest
import torch

import sm4
from sm4 import ops

from .helpers import FLOAT_DTYPES, TOLERANCES, assert_close, expert_params, router_inputs


def per_token_linear(x, routing, weight, bias):
    """Independent statement of moe_linear: a loop over tokens and their active ranks."""
    out = torch.zeros(x.shape[0], weight.shape[2], dtype=torch.float64)
    for t in range(x.shape[0]):
        for rank, e in enumerate(routing.expert_ids[t].tolist()):
            if e >= 0:
                y = x[t].double() @ weight[e].double() + (0 if bias is None else bias[e].double())
                out[t] += routing.gates[t, rank].double() * y
    return out


def per_token_ffn(x, routing, w1, b1, w2, b2, activation):
    act = (lambda h: torch.nn.functional.gelu(h)) if activation == "gelu" else (lambda h: torch.nn.functional.gelu(h, approximate="tanh"))
    out = torch.zeros(x.shape[0], w2.shape[2], dtype=torch.float64)
    for t in range(x.shape[0]):
        for rank, e in enumerate(routing.expert_ids[t].tolist()):
            if e >= 0:
                h = act(x[t].double() @ w1[e].double() + b1[e].double())
                out[t] += routing.gates[t, rank].double() * (h @ w2[e].double() + b2[e].double())
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_matches_a_row_loop_with_empty_experts(bias):
    # 7 experts, offsets with empty experts (0, 3, 6) and padding rows at the end.
    offsets = torch.tensor([0, 0, 4, 4, 9, 11, 11, 12])
    x = torch.randn(15, 5, dtype=torch.float64)
    weight, b = expert_params(7, 5, 3, bias=bias)
    y = ops.grouped_linear(x, weight, b, offsets, backend="reference")
    expert_of_row = torch.searchsorted(offsets, torch.arange(12), right=True) - 1
    for row in range(15):
        if row < 12:
            e = expert_of_row[row]
            expected = x[row] @ weight[e] + (b[e] if bias else 0)
        else:
            expected = torch.zeros(3, dtype=torch.float64)  # padding rows are zero
        torch.testing.assert_close(y[row], expected)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_grouped_ffn_is_two_grouped_linears_around_gelu(activation):
    offsets = torch.tensor([0, 3, 3, 8])
    x = torch.randn(10, 5, dtype=torch.float64)
    w1, b1 = expert_params(3, 5, 7)
    w2, b2 = expert_params(3, 7, 4, seed=2)
    y = ops.grouped_ffn(x, w1, b1, w2, b2, offsets, activation, backend="reference")
    approximate = "none" if activation == "gelu" else "tanh"
    h = torch.nn.functional.gelu(ops.grouped_linear(x, w1, b1, offsets, backend="reference"), approximate=approximate)
    torch.testing.assert_close(y, ops.grouped_linear(h, w2, b2, offsets, backend="reference"))
    assert (y[8:] == 0).all()


@pytest.mark.parametrize(
    "tokens,experts,k,per_token_k",
    [
        (1, 1, 1, False),  # T = 1, E = 1
        (24, 5, 2, False),  # E prime
        (31, 6, 6, False),  # k = E
        (40, 13, 3, True),  # E prime, per-token k
    ],
)
def test_moe_linear_matches_per_token_loop(tokens, experts, k, per_token_k):
    x, router = router_inputs(tokens, 9, experts, dtype=torch.float64)
    weight, bias = expert_params(experts, 9, 7)
    token_k = torch.randint(1, k + 1, (tokens,)) if per_token_k else None
    out = ops.moe_linear(x, router, weight, bias, k, token_k=token_k, backend="reference")
    torch.testing.assert_close(out.output, per_token_linear(x, out.routing, weight, bias))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_moe_ffn_matches_per_token_loop(activation):
    x, router = router_inputs(20, 6, 7, dtype=torch.float64)
    w1, b1 = expert_params(7, 6, 11)
    w2, b2 = expert_params(7, 11, 5, seed=3)
    out = ops.moe_ffn(x, router, w1, b1, w2, b2, 2, activation=activation, training=True, generator=torch.Generator().manual_seed(0), backend="reference")
    torch.testing.assert_close(out.output, per_token_ffn(x, out.routing, w1, b1, w2, b2, activation))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_moe_ffn_low_precision_against_float64(dtype):
    """Each dtype against float64 on the same (rounded) inputs: error within the dtype's tolerance
    and at most twice that of a plain PyTorch per-token loop run in the same dtype."""
    x, router = router_inputs(32, 16, 8, dtype=dtype)
    w1, b1 = (t.to(dtype) for t in expert_params(8, 16, 24))
    w2, b2 = (t.to(dtype) for t in expert_params(8, 24, 16, seed=4))
    out = ops.moe_ffn(x, router, w1, b1, w2, b2, 2, backend="reference")
    assert out.output.dtype == dtype
    exact = ops.moe_ffn(x.double(), router.double(), w1.double(), b1.double(), w2.double(), b2.double(), 2, backend="reference")
    assert torch.equal(out.routing.expert_ids, exact.routing.expert_ids)
    assert_close(out.output, exact.output, dtype)
    if dtype != torch.float32:
        gelu = torch.nn.functional.gelu
        plain = torch.stack([
            sum(g * (gelu(x[t] @ w1[e] + b1[e]) @ w2[e] + b2[e]) for g, e in zip(exact.routing.gates[t].to(dtype), exact.routing.expert_ids[t]))
            for t in range(32)
        ])
        ours = (out.output.double() - exact.output).abs().max()
        theirs = (plain.double() - exact.output).abs().max()
        assert ours <= 2 * theirs + TOLERANCES[torch.float32]["atol"]


def test_moe_linear_and_ffn_gradcheck_float64():
    x, router = router_inputs(7, 4, 5, dtype=torch.float64)
    weight, bias = expert_params(5, 4, 3)
    w2, b2 = expert_params(5, 3, 4, seed=5)
    noise = torch.randn(7, 5, dtype=torch.float64)
    params = [t.requires_grad_(True) for t in (x, router, weight, bias, w2, b2)]

    def linear(x, router, weight, bias):
        out = ops.moe_linear(x, router, weight, bias, 2, training=True, noise=noise, backend="reference")
        return out.output, out.routing.load_loss

    def ffn(x, router, w1, b1, w2, b2):
        return ops.moe_ffn(x, router, w1, b1, w2, b2, 2, token_k=torch.tensor([1, 2, 2, 1, 2, 2, 1]), backend="reference").output

    assert torch.autograd.gradcheck(linear, tuple(params[:4]))
    assert torch.autograd.gradcheck(ffn, tuple(params))


def test_nan_token_does_not_corrupt_other_tokens_outputs():
    x, router = router_inputs(9, 6, 5, dtype=torch.float32)
    w1, b1 = (t.float() for t in expert_params(5, 6, 8))
    w2, b2 = (t.float() for t in expert_params(5, 8, 6, seed=2))
    clean = ops.moe_ffn(x, router, w1, b1, w2, b2, 2, backend="reference").output
    x[4, 0] = float("nan")
    dirty = ops.moe_ffn(x, router, w1, b1, w2, b2, 2, backend="reference").output
    assert torch.isnan(dirty[4]).all(), "the bad token's own output must be visibly NaN"
    others = [0, 1, 2, 3, 5, 6, 7, 8]
    torch.testing.assert_close(dirty[others], clean[others])


def test_moe_attention_with_one_expert_equals_multihead_attention():
    torch.manual_seed(0)
    embed, heads, batch, length = 16, 4, 3, 5
    mha = torch.nn.MultiheadAttention(embed, heads, batch_first=True, dtype=torch.float64)
    q = torch.randn(batch, length, embed, dtype=torch.float64)
    kv = torch.randn(batch, length + 2, embed, dtype=torch.float64)
    expected, _ = mha(q, kv, kv, need_weights=False)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    routers = tuple(torch.randn(embed, 1, dtype=torch.float64) for _ in range(3))
    weights = tuple(w.t()[None] for w in (w_q, w_k, w_v))  # (1, in, out)
    biases = tuple(b[None] for b in (b_q, b_k, b_v))
    out, routings = ops.moe_attention(
        q, kv, kv, routers, weights, biases, mha.out_proj.weight, mha.out_proj.bias, heads, 1, backend="reference"
    )
    torch.testing.assert_close(out, expected)
    assert all(r.expert_ids.shape == (batch * n, 1) for r, n in zip(routings, (length, length + 2, length + 2)))


def test_moe_attention_causal_and_per_token_k():
    torch.manual_seed(1)
    q = torch.randn(2, 6, 8, dtype=torch.float64)
    routers = tuple(torch.randn(8, 4, dtype=torch.float64) for _ in range(3))
    weights = tuple(torch.randn(4, 8, 8, dtype=torch.float64) for _ in range(3))
    token_k = (torch.ones(2, 6, dtype=torch.long), None, torch.full((2, 6), 2))
    out, routings = ops.moe_attention(
        q, q, q, routers, weights, (None, None, None), torch.eye(8, dtype=torch.float64), None, 2, 2,
        is_causal=True, token_k=token_k, backend="reference",
    )
    assert out.shape == (2, 6, 8)
    assert (routings[0].expert_ids[:, 1] == -1).all() and (routings[2].expert_ids >= 0).all()
    # Causality: the first position only sees itself, so changing later tokens leaves it alone.
    q2 = q.clone()
    q2[:, 3:] += 1.0
    out2, _ = ops.moe_attention(
        q2, q2, q2, routers, weights, (None, None, None), torch.eye(8, dtype=torch.float64), None, 2, 2,
        is_causal=True, token_k=token_k, backend="reference",
    )
    torch.testing.assert_close(out2[:, :3], out[:, :3])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_permute_unpermute_round_trip_in_each_dtype(dtype):
    x, router = router_inputs(13, 7, 5, dtype=dtype)
    r = ops.topk_gating(x, router, 2, renormalize=True, backend="reference")
    m = ops.routing_metadata(r.expert_ids, 5, backend="reference")
    x_sorted = ops.permute(x, m, backend="reference")
    assert x_sorted.dtype == dtype and torch.equal(x_sorted, x[m.sorted_token])
    # Renormalised gates sum to one, so combining the permuted rows gives x back.
    y = ops.unpermute(x_sorted, r.gates, m, backend="reference")
    assert y.dtype == dtype
    assert_close(y, x.double(), dtype)


def test_non_contiguous_expert_weights():
    x, router = router_inputs(10, 6, 4, dtype=torch.float64)
    weight, bias = expert_params(4, 5, 6)  # (E, 5, 6) -> transpose to a non-contiguous (E, 6, 5)
    weight_t = weight.transpose(1, 2)
    assert not weight_t.is_contiguous()
    out = ops.moe_linear(x, router, weight_t, None, 2, backend="reference")
    torch.testing.assert_close(out.output, per_token_linear(x, out.routing, weight_t, None))


def test_composites_return_named_results():
    x, router = router_inputs(4, 3, 2)
    weight, _ = expert_params(2, 3, 3, dtype=torch.float32)
    result = ops.moe_linear(x, router, weight, None, 1)
    assert isinstance(result, sm4.MoEOutput) and isinstance(result.routing, sm4.RoutingResult)
