"""Every argument of every public op, one bad value each: the exception class of the contract
(TypeError for a wrong type/dtype, ValueError for a wrong shape/value) and the argument's name in
the message."""

import pytest
import torch

from sm4 import ops

T, D, E, H, K = 6, 4, 5, 3, 2
g = torch.Generator().manual_seed(0)
X = torch.randn(T, D, generator=g)
R = torch.randn(D, E, generator=g)
W1, B1 = torch.randn(E, D, H, generator=g), torch.randn(E, H, generator=g)
W2, B2 = torch.randn(E, H, D, generator=g), torch.randn(E, D, generator=g)
ROUTING = ops.topk_gating(X, R, K)
IDS, GATES = ROUTING.expert_ids, ROUTING.gates
META = ops.routing_metadata(IDS, E)
ROWS = torch.randn(T * K, D, generator=g)
OFFSETS = META.expert_offsets
Q = torch.randn(2, 3, 8, generator=g)

CALLS = {
    "topk_gating": (ops.topk_gating, dict(x=X, router_weight=R, k=K)),
    "expert_histogram": (ops.expert_histogram, dict(expert_ids=IDS, num_experts=E)),
    "routing_metadata": (ops.routing_metadata, dict(expert_ids=IDS, num_experts=E)),
    "permute": (ops.permute, dict(x=X, metadata=META)),
    "unpermute": (ops.unpermute, dict(y_sorted=ROWS, gates=GATES, metadata=META)),
    "grouped_linear": (ops.grouped_linear, dict(x_sorted=ROWS, weight=W1, bias=B1, expert_offsets=OFFSETS)),
    "grouped_ffn": (ops.grouped_ffn, dict(x_sorted=ROWS, w1=W1, b1=B1, w2=W2, b2=B2, expert_offsets=OFFSETS)),
    "expert_linear": (ops.expert_linear, dict(x=X, weight=W1, bias=B1, gates=GATES, metadata=META)),
    "expert_ffn": (ops.expert_ffn, dict(x=X, w1=W1, b1=B1, w2=W2, b2=B2, gates=GATES, metadata=META)),
    "moe_linear": (ops.moe_linear, dict(x=X, router_weight=R, weight=W1, bias=B1, k=K)),
    "moe_ffn": (ops.moe_ffn, dict(x=X, router_weight=R, w1=W1, b1=B1, w2=W2, b2=B2, k=K)),
    "moe_qkv": (ops.moe_qkv, dict(x=X, routers=(R, R, R), weights=torch.stack([W1] * 3), biases=torch.stack([B1] * 3),
                                  k=K)),
    "moe_attention": (ops.moe_attention, dict(query=Q, key=Q, value=Q, routers=(torch.randn(8, 4),) * 3,
                                              expert_weights=(torch.randn(4, 8, 8),) * 3, expert_biases=(None,) * 3,
                                              out_weight=torch.eye(8), out_bias=None, num_heads=2, k=1)),
    "router_input_for": (ops.router_input_for, dict(x=X, router_index=torch.zeros(T, dtype=torch.int64), num_routers=2)),
}

# (op, argument, bad value, exception class); the message must name the argument.
BAD = [
    ("topk_gating", "x", X.long(), TypeError), ("topk_gating", "router_weight", R[:2], ValueError),
    ("topk_gating", "k", 0, ValueError), ("topk_gating", "token_k", torch.full((T,), 9), ValueError),
    ("topk_gating", "noise_std", -1.0, ValueError), ("topk_gating", "training", "yes", TypeError),
    ("topk_gating", "renormalize", 1, TypeError), ("topk_gating", "generator", 3, TypeError),
    ("topk_gating", "noise", torch.randn(T, 2), ValueError), ("topk_gating", "backend", "gpu", ValueError),
    ("expert_histogram", "expert_ids", IDS.float(), TypeError), ("expert_histogram", "num_experts", 1, ValueError),
    ("routing_metadata", "expert_ids", IDS + 9, ValueError), ("routing_metadata", "num_experts", "5", TypeError),
    ("routing_metadata", "token_k", torch.zeros(T, dtype=torch.int64), ValueError),
    ("permute", "x", X[:2], ValueError), ("permute", "metadata", tuple(META), TypeError),
    ("unpermute", "y_sorted", ROWS[:3], ValueError), ("unpermute", "gates", GATES.long(), TypeError),
    ("unpermute", "metadata", META._replace(assignment_row=META.assignment_row + 100), ValueError),
    ("grouped_linear", "x_sorted", ROWS.int(), TypeError), ("grouped_linear", "weight", W1[:, :2], ValueError),
    ("grouped_linear", "bias", B1[:2], ValueError), ("grouped_linear", "expert_offsets", OFFSETS.flip(0), ValueError),
    ("grouped_ffn", "w1", W1.half().long(), TypeError), ("grouped_ffn", "b1", B1[:, :1], ValueError),
    ("grouped_ffn", "w2", W2[:, :1], ValueError), ("grouped_ffn", "b2", B2[:, :1], ValueError),
    ("grouped_ffn", "activation", "relu", ValueError), ("grouped_ffn", "recompute_hidden", 1, TypeError),
    ("expert_linear", "gates", GATES[:, :1], ValueError), ("expert_linear", "x", X[:, :1], ValueError),
    ("expert_ffn", "metadata", META._replace(sorted_token=META.sorted_token - 1), ValueError),
    ("expert_ffn", "activation", "tanh", ValueError),
    ("moe_linear", "weight", W1[:2], ValueError), ("moe_linear", "bias", B1.long(), TypeError),
    ("moe_linear", "router_input", torch.randn(2, 3), ValueError), ("moe_linear", "fused", "no", TypeError),
    ("moe_ffn", "b1", B1[:, :1], ValueError), ("moe_ffn", "b2", B2.long(), TypeError),
    ("moe_ffn", "recompute_hidden", "no", TypeError), ("moe_ffn", "token_k", torch.ones(T), TypeError),
    ("moe_qkv", "routers", R, TypeError), ("moe_qkv", "weights", W1, ValueError),
    ("moe_qkv", "biases", B1, ValueError), ("moe_qkv", "k", 9, ValueError),
    ("moe_attention", "routers", torch.randn(8, 4), TypeError), ("moe_attention", "num_heads", 3, ValueError),
    ("moe_attention", "expert_weights", None, TypeError), ("moe_attention", "token_k", (torch.ones(2, 3),) * 3, TypeError),
    ("moe_attention", "out_weight", torch.eye(4), ValueError), ("moe_attention", "is_causal", "yes", TypeError),
    ("router_input_for", "x", "x", TypeError), ("router_input_for", "router_index", torch.full((T,), 2), ValueError),
    ("router_input_for", "num_routers", 0, ValueError),
    ("grouped_ffn", "x_sorted", ROWS[:, :2], ValueError), ("grouped_ffn", "expert_offsets", OFFSETS[:1], ValueError),
    ("expert_linear", "weight", W1.long(), TypeError), ("expert_linear", "bias", B1[:1], ValueError),
    ("expert_linear", "metadata", None, TypeError),
    ("expert_ffn", "x", X.long(), TypeError), ("expert_ffn", "w1", W1[:, :1], ValueError),
    ("expert_ffn", "b1", B1[:, :1], ValueError), ("expert_ffn", "w2", W2.long(), TypeError),
    ("expert_ffn", "b2", B2[:1], ValueError), ("expert_ffn", "gates", GATES[:1], ValueError),
    ("expert_ffn", "recompute_hidden", None, TypeError),
]
# The gating arguments of the composites, each through its own composite's check.
GATING = [("x", X[0], ValueError), ("router_weight", R.long(), TypeError), ("k", 1.5, TypeError),
          ("token_k", torch.full((T,), 7), ValueError), ("noise_std", float("nan"), ValueError),
          ("training", None, TypeError), ("renormalize", "no", TypeError), ("generator", "seed", TypeError),
          ("noise", torch.randn(T + 1, E), ValueError)]
BAD += [(op, arg, value, error) for op in ("moe_linear", "moe_ffn", "moe_qkv") for arg, value, error in GATING
        if not (op == "moe_qkv" and arg in ("router_weight", "noise"))]
BAD += [
    ("moe_ffn", "w1", W1[:, :1], ValueError), ("moe_ffn", "w2", W2[:, :1], ValueError),
    ("moe_ffn", "activation", "relu", ValueError), ("moe_ffn", "router_input", torch.randn(T, 2), ValueError),
    ("moe_ffn", "fused", 0, TypeError),
    ("moe_qkv", "router_input", torch.randn(T + 1, D), ValueError), ("moe_qkv", "fused", None, TypeError),
    ("moe_attention", "query", Q[0], ValueError), ("moe_attention", "key", Q[:, :, :4], ValueError),
    ("moe_attention", "value", Q.long(), TypeError), ("moe_attention", "expert_biases", (torch.randn(4, 3),) * 3, ValueError),
    ("moe_attention", "out_bias", torch.randn(3), ValueError), ("moe_attention", "k", 5, ValueError),
    ("moe_attention", "noise_std", -2.0, ValueError), ("moe_attention", "training", 2, TypeError),
    ("moe_attention", "renormalize", None, TypeError), ("moe_attention", "generator", 1, TypeError),
]


def received_forms(value) -> list[str]:
    """How a message may state the received value: a tensor's shape, dtype, or (an integer tensor)
    its smallest or largest value; anything else's repr or type name."""
    if isinstance(value, torch.Tensor):
        forms = [str(tuple(value.shape)), str(list(value.shape)), str(value.dtype), str(value.dtype).split(".")[-1]]
        if value.numel() and not value.is_floating_point():
            forms += [str(int(value.min())), str(int(value.max()))]
        return forms
    if isinstance(value, (tuple, list)):
        return [type(value).__name__, *(form for item in value for form in received_forms(item))]
    return [repr(value), str(value), type(value).__name__]


def assert_names_argument_and_received_value(error: pytest.ExceptionInfo, argument: str, value):
    message = str(error.value)
    assert argument in message, message
    assert any(form in message for form in received_forms(value)), f"no received value of {argument} in: {message}"


@pytest.mark.parametrize("op,argument,value,error", BAD, ids=[f"{op}-{arg}" for op, arg, _, _ in BAD])
def test_bad_argument_names_itself(op, argument, value, error):
    fn, good = CALLS[op]
    kwargs = {**good, argument: value}
    with pytest.raises(error) as raised:
        fn(**kwargs)
    assert_names_argument_and_received_value(raised, argument, value)


def test_every_argument_of_every_op_is_listed():
    import inspect

    covered = {(op, arg) for op, arg, _, _ in BAD}
    for op in ops.__all__:
        params = inspect.signature(getattr(ops, op)).parameters
        missing = [p for p in params if (op, p) not in covered and p not in EXEMPT]
        assert not missing, f"{op}: no bad-value case for {missing}"


# Arguments whose every value is valid or that another row already covers through the same check.
EXEMPT = {"backend", "attn_mask"}  # backend: topk_gating's row; attn_mask: torch's SDPA checks it


MODULE_BAD = [  # (constructor keyword, bad value, exception class) for SparseMoEFFN and SM4EncoderLayer
    ("d_model", 0, ValueError), ("d_model", "64", TypeError), ("num_experts", 0, ValueError),
    ("num_experts", 2.0, TypeError), ("top_k", 9, ValueError), ("top_k", None, TypeError),
    ("noise_std", -1.0, ValueError), ("balance_loss_weight", -1.0, ValueError), ("num_routers", 0, ValueError),
    ("backend", "gpu", ValueError), ("activation", "swish", ValueError),
]


@pytest.mark.parametrize("argument,value,error", MODULE_BAD, ids=[f"{a}-{v!r}" for a, v, _ in MODULE_BAD])
@pytest.mark.parametrize("module", ["SparseMoEFFN", "SM4EncoderLayer"])
def test_module_constructor_bad_argument_names_itself(module, argument, value, error):
    import sm4

    good = dict(d_model=8, num_experts=4, top_k=2)
    good.update({"dim_feedforward": 16} if module == "SparseMoEFFN" else {"nhead": 2, "dim_feedforward": 16})
    with pytest.raises(error) as raised:
        getattr(sm4, module)(**{**good, argument: value})
    assert_names_argument_and_received_value(raised, argument, value)


@pytest.mark.parametrize("argument,value,error", [
    ("x", torch.randn(3, 5), ValueError), ("token_k", torch.ones(4, dtype=torch.int64), ValueError),
    ("token_k", torch.ones(3), TypeError), ("router_index", torch.zeros(3, dtype=torch.int64), ValueError),
])
def test_sparse_ffn_forward_bad_argument_names_itself(argument, value, error):
    import sm4

    layer = sm4.SparseMoEFFN(8, 16, num_experts=4, top_k=2, num_routers=2)
    kwargs = {"x": torch.randn(3, 8), "router_index": torch.zeros(3, dtype=torch.int64), argument: value}
    if argument == "router_index":
        kwargs["router_index"] = torch.full((3,), 5)
    with pytest.raises(error) as raised:
        layer(kwargs.pop("x"), **kwargs)
    assert_names_argument_and_received_value(raised, argument, kwargs.get(argument, value))


SRC = torch.randn(2, 3, 8, generator=g)  # (N, L, C), batch_first
ENCODER_BAD = [  # SM4EncoderLayer.forward: (argument, bad value, exception class)
    ("src", torch.randn(2, 3, 5), ValueError), ("src", torch.randn(2, 2, 3, 8), ValueError),
    ("src", SRC.long(), TypeError), ("src", "src", TypeError),
    ("src_mask", torch.zeros(5, 5), ValueError), ("src_mask", torch.zeros(3, 3, dtype=torch.int64), TypeError),
    ("src_key_padding_mask", torch.zeros(2, 5, dtype=torch.bool), ValueError),
    ("src_key_padding_mask", torch.zeros(2, 3, dtype=torch.int64), TypeError),
    ("is_causal", "yes", TypeError), ("is_causal", True, ValueError),  # True needs src_mask
    ("token_k", torch.ones(2, 4, dtype=torch.int64), ValueError), ("token_k", torch.ones(2, 3), TypeError),
    ("token_k", torch.full((2, 3), 5), ValueError),
    ("router_index", torch.zeros(2, 4, dtype=torch.int64), ValueError), ("router_index", torch.zeros(2, 3), TypeError),
    ("router_index", torch.full((2, 3), 7), ValueError), ("router_index", None, ValueError),  # num_routers = 2
]


@pytest.mark.parametrize("argument,value,error", ENCODER_BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(ENCODER_BAD)])
def test_encoder_layer_forward_bad_argument_names_itself(argument, value, error):
    import sm4

    layer = sm4.SM4EncoderLayer(8, 2, 16, num_experts=4, top_k=2, num_routers=2, batch_first=True)
    kwargs = {"src": SRC, "router_index": torch.zeros(2, 3, dtype=torch.int64), argument: value}
    with pytest.raises(error) as raised:
        layer(**kwargs)
    assert_names_argument_and_received_value(raised, argument, value)


def test_every_forward_argument_of_the_modules_is_listed():
    import inspect

    import sm4

    covered = {"SM4EncoderLayer": {a for a, _, _ in ENCODER_BAD}, "SparseMoEFFN": {"x", "token_k", "router_index"}}
    for module, arguments in covered.items():
        params = set(inspect.signature(getattr(sm4, module).forward).parameters) - {"self"}
        assert params == arguments, f"{module}.forward: no bad-value case for {params - arguments}"
