"""Bad input: a ValueError/TypeError naming the argument and what was expected, before any kernel."""

import pytest
import torch

import sm4
from sm4 import ops

from .helpers import expert_params, router_inputs

X, W = router_inputs(6, 4, 5)


def raises(error, match, fn, *args, **kwargs):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(x=X[0]), ValueError, r"topk_gating: x must have 2 dimension\(s\) \(T, d\), got shape \(4,\)"),
        (dict(router_weight=W[:3]), ValueError, r"router_weight .* gives d = 3, but x .* gives d = 4"),
        (dict(x=X.long()), TypeError, r"x must have dtype in \(float16, bfloat16, float32, float64\), got torch.int64"),
        (dict(x=X.numpy()), TypeError, r"x must be a torch.Tensor of shape \(T, d\), got ndarray"),
        (dict(k=0), ValueError, r"k must be >= 1 and <= E = 5, got 0"),
        (dict(k=6), ValueError, r"k must be >= 1 and <= E = 5, got 6"),
        (dict(k=2.0), TypeError, r"k must be a Python int, got float"),
        (dict(k=torch.tensor([2] * 6)), TypeError, r"pass a per-token k as token_k="),
        (dict(token_k=torch.tensor([1, 2])), ValueError, r"token_k .* gives T = 2, but x .* gives T = 6"),
        (dict(token_k=torch.tensor([1, 2, 3, 1, 1, 1])), ValueError, r"token_k values must lie in \[1, k=2\], got values in \[1, 3\]"),
        (dict(token_k=torch.tensor([0, 1, 1, 1, 1, 1])), ValueError, r"token_k values must lie in \[1, k=2\]"),
        (dict(token_k=torch.ones(6)), TypeError, r"token_k must have dtype in \(int32, int64\)"),
        (dict(noise_std=-1.0), ValueError, r"noise_std must be >= 0.0, got -1.0"),
        (dict(noise_std=float("nan")), ValueError, r"noise_std must be >= 0.0"),
        (dict(training="yes"), TypeError, r"training must be a bool"),
        (dict(noise=torch.randn(6, 4)), ValueError, r"noise .* gives E = 4, but router_weight .* gives E = 5"),
        (dict(generator=42), TypeError, r"generator must be a torch.Generator, got int"),
        (dict(router_weight=W.to("meta")), ValueError, r"router_weight is on meta but x is on cpu"),
        (dict(router_weight=torch.zeros(4, 0)), ValueError, r"at least one expert"),
        (dict(backend="cuda-fast"), ValueError, r"unknown sm4 backend 'cuda-fast'"),
    ],
)
def test_topk_gating_bad_arguments(kwargs, error, match):
    args = dict(x=X, router_weight=W, k=2)
    args.update(kwargs)
    raises(error, match, ops.topk_gating, args.pop("x"), args.pop("router_weight"), args.pop("k"), **args)


def test_expert_histogram_and_metadata_bad_arguments():
    ids = torch.tensor([[0, 1], [2, -1]])
    raises(ValueError, r"expert_ids must lie in \[-1, num_experts=3\), got values in \[-2, 1\]", ops.expert_histogram, ids - 1, 3)
    raises(ValueError, r"expert_ids must lie in \[-1, num_experts=2\)", ops.expert_histogram, ids, 2)
    raises(TypeError, r"expert_ids must have dtype in \(int32, int64\)", ops.expert_histogram, ids.float(), 3)
    raises(ValueError, r"num_experts must be >= 1, got 0", ops.expert_histogram, ids, 0)
    raises(ValueError, r"expert_ids must have 2 dimension", ops.routing_metadata, ids[0], 3)
    raises(ValueError, r"token_k values must lie in \[1, k=2\]", ops.routing_metadata, ids, 3, token_k=torch.tensor([3, 1]))


def test_permute_and_unpermute_bad_arguments():
    x, w = router_inputs(4, 3, 3)
    r = ops.topk_gating(x, w, 2)
    m = ops.routing_metadata(r.expert_ids, 3)
    raises(ValueError, r"x .* gives T = 5, but metadata.assignment_row .* gives T = 4", ops.permute, torch.randn(5, 3), m)
    raises(TypeError, r"metadata must be the RoutingMetadata", ops.permute, x, tuple(m))
    raises(ValueError, r"gates .* gives k_max = 3, but metadata.assignment_row .* gives k_max = 2", ops.unpermute, torch.randn(8, 3), torch.randn(4, 3), m)
    raises(ValueError, r"y_sorted .* gives N = 7, but metadata.sorted_assignment .* gives N = 8", ops.unpermute, torch.randn(7, 3), r.gates, m)
    mixed = m._replace(sorted_token=m.sorted_token[:6])
    raises(ValueError, r"metadata.sorted_token .* gives N = 6, but metadata.sorted_assignment .* gives N = 8", ops.permute, x, mixed)
    short = m._replace(sorted_token=m.sorted_token[:6], sorted_assignment=m.sorted_assignment[:6])
    raises(ValueError, r"not from one routing_metadata call", ops.permute, x, short)


def test_grouped_and_composite_bad_arguments():
    weight, bias = expert_params(3, 4, 5, dtype=torch.float32)
    offsets = torch.tensor([0, 2, 2, 6])
    x = torch.randn(6, 4)
    raises(ValueError, r"weight .* gives E = 2, but expert_offsets .* gives E = 3", ops.grouped_linear, x, weight[:2], None, offsets)
    raises(ValueError, r"weight .* gives in = 5, but x_sorted .* gives in = 4", ops.grouped_linear, x, weight.transpose(1, 2), None, offsets)
    raises(ValueError, r"bias .* gives out = 4", ops.grouped_linear, x, weight, bias[:, :4], offsets)
    raises(TypeError, r"expert_offsets must have dtype in \(int64\)", ops.grouped_linear, x, weight, bias, offsets.int())
    w2, b2 = expert_params(3, 7, 4, dtype=torch.float32)
    raises(ValueError, r"w2 .* gives h = 7, but w1 .* gives h = 5", ops.grouped_ffn, x, weight, bias, w2, b2, offsets)
    raises(ValueError, r"activation must be one of \['gelu', 'gelu_tanh'\], got 'relu'", ops.grouped_ffn, x, weight, bias, weight.transpose(1, 2), None, offsets, "relu")
    router = torch.randn(4, 3)
    raises(ValueError, r"weight .* gives E = 2, but router_weight .* gives E = 3", ops.moe_linear, x, router, weight[:2], None, 1)
    raises(ValueError, r"k must be >= 1 and <= E = 3, got 4", ops.moe_ffn, x, router, weight, bias, weight.transpose(1, 2), None, 4)


def test_moe_attention_bad_arguments():
    q = torch.randn(2, 3, 8)
    routers = (torch.randn(8, 4),) * 3
    weights = (torch.randn(4, 8, 8),) * 3
    good = dict(expert_biases=(None,) * 3, out_weight=torch.eye(8), out_bias=None, num_heads=2, k=1)
    ops.moe_attention(q, q, q, routers, weights, **good)
    raises(ValueError, r"C = 8 must be divisible by num_heads = 3", ops.moe_attention, q, q, q, routers, weights, **{**good, "num_heads": 3})
    raises(ValueError, r"key .* gives B = 3, but query .* gives B = 2", ops.moe_attention, q, torch.randn(3, 3, 8), q, routers, weights, **good)
    raises(TypeError, r"token_k must be None or a triple", ops.moe_attention, q, q, q, routers, weights, token_k=torch.ones(2, 3), **good)


MIXED = [  # (x, router, expert weights): the combinations the contract accepts (README "Dtypes accepted")
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float16, torch.bfloat16),
    (torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.float32, torch.float16),
    (torch.float64, torch.float64, torch.float64),
    (torch.float32, torch.float64, torch.float32),  # an fp64 router with fp32 x and experts
    (torch.float64, torch.float32, torch.float32),  # fp32 weights cast to fp64 rows
]


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("x_dtype,router_dtype,weight_dtype", MIXED)
def test_accepted_dtype_combinations_match_the_reference(backend, x_dtype, router_dtype, weight_dtype):
    from .helpers import TOLERANCES, skip_unless_runs

    skip_unless_runs(backend, "expert_ffn")
    if backend == "triton" and torch.float64 in (x_dtype, router_dtype, weight_dtype):
        with pytest.raises(sm4.BackendNotSupportedError, match="float64"):
            ops.moe_ffn(*_mixed_inputs(x_dtype, router_dtype, weight_dtype), 2, backend=backend)
        return
    inputs = _mixed_inputs(x_dtype, router_dtype, weight_dtype)
    out = ops.moe_ffn(*inputs, 2, backend=backend).output
    assert out.dtype == x_dtype
    truth = ops.moe_ffn(*[t.double() for t in inputs], 2, backend="reference").output
    # rows rounded to x's dtype once in, weights cast to it: the tolerance of the lower precision
    low = max((x_dtype, weight_dtype), key=lambda d: TOLERANCES[d]["atol"])
    torch.testing.assert_close(out.double(), truth, **{key: 4 * v for key, v in TOLERANCES[low].items()})


def _mixed_inputs(x_dtype, router_dtype, weight_dtype):
    x, w = router_inputs(7, 4, 5)
    w1, b1 = expert_params(5, 4, 6)
    w2, b2 = expert_params(5, 6, 4, seed=2)
    return (x.to(x_dtype), w.to(router_dtype).double().to(router_dtype), w1.to(weight_dtype), b1.to(weight_dtype),
            w2.to(weight_dtype), b2.to(weight_dtype))


def test_refused_noise_dtype_names_noise():
    x, w = router_inputs(6, 4, 5)
    with pytest.raises(sm4.BackendNotSupportedError, match=r"noise is torch.float64"):
        ops.topk_gating(x, w, 2, training=True, noise=torch.randn(6, 5, dtype=torch.float64), backend="triton")
