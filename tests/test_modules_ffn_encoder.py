"""The drop-in layers SparseMoEFFN and SM4EncoderLayer: equal to the ops (and, densely, to torch's
layers) they are built from, the default kernels equal to the reference in outputs and every
gradient, and the things a drop-in module must do (shapes, masks, modes, state_dict, compile,
autocast, the balancing loss)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sm4
from sm4 import ops
from sm4.modules import collect_aux_loss, set_backend
from sm4.modules.ffn import SparseMoEFFN

from .helpers import TOLERANCES

D, H, E = 8, 16, 4  # small: the suite shares one core


def make_ffn(seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"num_experts": E, "top_k": 2, **kwargs}
    return SparseMoEFFN(D, H, dtype=dtype, **kwargs)


def randn(*shape, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def loss_and_grads(model, x, seed=0, **forward_kwargs):
    """Output, aux loss and the gradients of a loss using both, for every parameter and x."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the router noise (training mode) comes from the global RNG
    y = model(x, **forward_kwargs)
    weights = randn(*y.shape, seed=99, dtype=y.dtype)
    aux = collect_aux_loss(model)
    ((y * weights).sum() + aux).backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return y.detach(), aux.detach(), grads


def assert_same_run(a, b, dtype):
    (ya, auxa, ga), (yb, auxb, gb) = a, b
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(auxa, auxb, **tol)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


# ---- SparseMoEFFN ------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_ffn_is_the_moe_ffn_op(bias, activation):
    ffn = make_ffn(bias=bias, activation=activation).eval()
    x = randn(10, D)
    expected = ops.moe_ffn(x, ffn.router, ffn.w1, ffn.b1, ffn.w2, ffn.b2, 2, activation=activation)
    torch.testing.assert_close(ffn(x), expected.output, rtol=0, atol=0)
    assert (ffn.b1 is None) == (not bias) and (ffn.b2 is None) == (not bias)
    assert ffn.router.shape == (D, E) and ffn.w1.shape == (E, D, H) and ffn.w2.shape == (E, H, D)
    torch.testing.assert_close(ffn.aux_loss, expected.routing.balance_loss(0.05))
    assert set(ffn.routing_stats) == {"ffn"}
    torch.testing.assert_close(ffn.routing_stats["ffn"]["expert_counts"], expected.routing.expert_counts)


@pytest.mark.parametrize("how", ["set_backend", "use_backend"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ffn_default_kernels_equal_the_reference_with_every_gradient(dtype, training, how):
    ffn = make_ffn(dtype=dtype).train(training)
    reference = copy.deepcopy(ffn)
    x = randn(3, 5, D, dtype=dtype)
    fast = loss_and_grads(ffn, x)
    if how == "set_backend":
        assert set_backend(reference, "reference") is reference and reference.moe.backend == "reference"
        slow = loss_and_grads(reference, x)
    else:
        with sm4.use_backend("reference"):
            slow = loss_and_grads(reference, x)
    assert set(fast[2]) == {"router", "w1", "b1", "w2", "b2", "x"}
    assert_same_run(fast, slow, dtype)


def test_ffn_recompute_hidden_gives_the_same_gradients():
    ffn = make_ffn()
    recomputing = copy.deepcopy(ffn)
    recomputing.recompute_hidden = True
    x = randn(12, D)
    assert_same_run(loss_and_grads(ffn, x), loss_and_grads(recomputing, x), torch.float64)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "num_experts, top_k, renormalize, bias, activation",
    [(1, 1, False, True, "gelu"), (4, 2, True, True, "gelu"), (4, 3, True, False, "gelu_tanh")],
)
def test_ffn_from_dense_equals_the_dense_ffn(num_experts, top_k, renormalize, bias, activation, training):
    torch.manual_seed(3)
    linear1 = nn.Linear(D, H, bias=bias, dtype=torch.float64)
    linear2 = nn.Linear(H, D, bias=bias, dtype=torch.float64)
    ffn = SparseMoEFFN.from_dense(linear1, linear2, num_experts, top_k, renormalize=renormalize,
                                  activation=activation).train(training)
    assert ffn.w1.dtype == torch.float64 and ffn.moe.num_experts == num_experts and ffn.moe.top_k == top_k
    x = randn(2, 6, D)
    approximate = "none" if activation == "gelu" else "tanh"
    dense = linear2(F.gelu(linear1(x), approximate=approximate))
    torch.testing.assert_close(ffn(x), dense, **TOLERANCES[torch.float64])


def test_ffn_from_dense_fills_a_missing_bias_and_checks_shapes():
    linear1 = nn.Linear(D, H, bias=True, dtype=torch.float64)
    linear2 = nn.Linear(H, D, bias=False, dtype=torch.float64)
    ffn = SparseMoEFFN.from_dense(linear1, linear2, 1, 1)
    assert torch.equal(ffn.b2, torch.zeros(1, D, dtype=torch.float64))
    x = randn(4, D)
    torch.testing.assert_close(ffn(x), linear2(F.gelu(linear1(x))))
    with pytest.raises(ValueError, match="linear2"):
        SparseMoEFFN.from_dense(linear1, nn.Linear(H, D + 1), 2, 1)


def test_ffn_per_token_k():
    ffn = make_ffn(num_experts=E, top_k=3).eval()
    x = randn(2, 5, D)
    token_k = torch.tensor([[1, 2, 3, 1, 2], [3, 3, 1, 1, 2]])
    y = ffn(x, token_k=token_k)
    expected = ops.moe_ffn(x.reshape(-1, D), ffn.router, ffn.w1, ffn.b1, ffn.w2, ffn.b2, 3,
                           token_k=token_k.reshape(-1)).output.reshape(2, 5, D)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert int(ffn.routing_stats["ffn"]["expert_counts"].sum()) == int(token_k.sum())
    # k = top_k everywhere is the same as no token_k; k = 1 is top-1
    torch.testing.assert_close(ffn(x, token_k=torch.full((2, 5), 3)), ffn(x))
    torch.testing.assert_close(ffn(x, token_k=torch.ones(2, 5, dtype=torch.int32)), make_ffn(num_experts=E, top_k=1).eval()(x))
    with pytest.raises(ValueError, match="token_k"):
        ffn(x, token_k=token_k.reshape(-1))  # must be shaped like x.shape[:-1]
    with pytest.raises(ValueError, match="token_k"):
        ffn(x, token_k=torch.full((2, 5), 4))  # > top_k


def test_ffn_takes_any_leading_shape():
    ffn = make_ffn().eval()
    x = randn(2, 3, 4, D)
    flat = ffn(x.reshape(-1, D))
    torch.testing.assert_close(ffn(x), flat.reshape(2, 3, 4, D))
    torch.testing.assert_close(ffn(x[0, 0]), flat[:4])  # (L, d)
    torch.testing.assert_close(ffn(x[0, 0, 0]), flat[0])  # unbatched (d,)
    assert ffn(x[0, 0, 0]).shape == (D,)
    with pytest.raises(ValueError, match="d_model"):
        ffn(randn(3, D + 1))


def test_ffn_noise_only_in_training():
    ffn = make_ffn(noise_std=1.0)
    x = randn(32, D)
    ffn.eval()
    first = ffn(x)
    torch.manual_seed(123)
    torch.testing.assert_close(ffn(x), first, rtol=0, atol=0)  # eval: no noise, deterministic
    ffn.train()
    torch.manual_seed(5)
    noisy = ffn(x)
    assert not torch.allclose(noisy, first)
    torch.manual_seed(5)
    torch.testing.assert_close(ffn(x), noisy, rtol=0, atol=0)  # the noise is the global RNG's
    quiet = make_ffn(noise_std=0.0).train()
    torch.testing.assert_close(quiet(x), quiet.eval()(x), rtol=0, atol=0)


def test_ffn_aux_loss_is_differentiable_and_collected():
    first, second = make_ffn(seed=0), make_ffn(seed=1, balance_loss_weight=0.1)
    model = nn.Sequential(first, nn.Identity(), second)
    assert first.aux_loss is None
    assert collect_aux_loss(model).item() == 0.0
    y = model(randn(16, D))
    for ffn in (first, second):
        assert ffn.aux_loss.shape == () and ffn.aux_loss.requires_grad and ffn.aux_loss.item() > 0
    total = collect_aux_loss(model)
    torch.testing.assert_close(total, (first.aux_loss + second.aux_loss).float())
    assert total is not None and sm4.modules.collect_aux_loss is collect_aux_loss
    total.backward()
    assert first.router.grad is not None and first.router.grad.abs().sum() > 0
    del y


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 4, "top_k": 0}, "top_k"),
        ({"num_experts": 0, "top_k": 1}, "num_experts"),
        ({"activation": "relu"}, "activation"),
        ({"noise_std": -1.0}, "noise_std"),
        ({"balance_loss_weight": -0.1}, "balance_loss_weight"),
        ({"backend": "nope"}, "backend"),
    ],
)
def test_ffn_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SparseMoEFFN(D, H, **kwargs)


def test_ffn_rejects_bad_sizes():
    with pytest.raises(ValueError, match="d_model"):
        SparseMoEFFN(0, H)
    with pytest.raises(ValueError, match="dim_feedforward"):
        SparseMoEFFN(D, 0)
    with pytest.raises(ValueError, match="unknown sm4 backend"):
        set_backend(make_ffn(), "nope")


@pytest.mark.parametrize("bias", [True, False])
def test_ffn_state_dict_round_trip(bias):
    source, target = make_ffn(seed=0, bias=bias).eval(), make_ffn(seed=1, bias=bias).eval()
    expected_keys = {"router", "w1", "w2"} | ({"b1", "b2"} if bias else set())
    assert set(source.state_dict()) == expected_keys
    x = randn(8, D)
    assert not torch.allclose(source(x), target(x))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_ffn_repr():
    text = repr(make_ffn(activation="gelu_tanh", renormalize=True, backend="reference"))
    for part in ("d_model=8", "dim_feedforward=16", "'gelu_tanh'", "num_experts=4", "top_k=2", "renormalize=True",
                 "backend='reference'"):
        assert part in text


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_ffn_compiles_fullgraph(training):
    torch._dynamo.reset()
    ffn = make_ffn(dtype=torch.float32).train(training)
    x = randn(2, 6, D, dtype=torch.float32)
    eager = loss_and_grads(ffn, x)
    for p in ffn.parameters():
        p.grad = None
    compiled = loss_and_grads(torch.compile(ffn, fullgraph=True, backend="aot_eager"), x)
    assert_same_run(compiled, eager, torch.float32)


def test_ffn_autocast_bf16():
    ffn = make_ffn(dtype=torch.float32).eval()
    # x rounded to bf16 first, as the layer rounds it: the routing is then the fp32 layer's (a
    # token near a tie could otherwise pick another expert), and only the expert GEMMs differ.
    x = randn(4, 6, D, dtype=torch.float32).bfloat16().float()
    full = ffn(x)
    for backend in (None, "reference"):
        set_backend(ffn, backend)
        x_leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ffn(x_leaf)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), full, **TOLERANCES[torch.bfloat16])
        (y.float().sum() + ffn.aux_loss).backward()
        assert x_leaf.grad.dtype == torch.float32
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ffn.parameters())
        ffn.zero_grad()


# ---- SM4EncoderLayer ---------------------------------------------------------------------------

C, NHEAD, HIDDEN, L, N = 16, 4, 32, 5, 3


def make_layer(seed=0, dtype=torch.float64, **kwargs):
    from sm4.modules.encoder import SM4EncoderLayer

    torch.manual_seed(seed)
    kwargs = {"num_experts": E, "top_k": 2, "dropout": 0.0, **kwargs}
    return SM4EncoderLayer(C, NHEAD, HIDDEN, dtype=dtype, **kwargs)


def layer_input(batch_first, dtype=torch.float64, seed=1):
    return randn(*((N, L, C) if batch_first else (L, N, C)), seed=seed, dtype=dtype)


def padding_mask():
    mask = torch.zeros(N, L, dtype=torch.bool)
    mask[0, 3:] = True  # sequence 0 has 3 tokens, sequence 2 has 4
    mask[2, 4:] = True
    return mask


def causal_mask(dtype=torch.float64):
    return nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)


def sequence(x, batch_first, n, positions):
    """x[sequence n, positions] in either layout."""
    return x[n, positions] if batch_first else x[positions, n]


def test_layer_parts_and_names():
    from sm4.modules.attention import SparseMoEAttention

    layer = make_layer()
    assert isinstance(layer.self_attn, SparseMoEAttention) and isinstance(layer.ffn, SparseMoEFFN)
    assert layer.norm_first and layer.self_attn.batch_first is False
    for name in ("norm1", "norm2", "dropout1", "dropout2"):
        assert isinstance(getattr(layer, name), nn.Module)
    assert layer.ffn.moe == layer.self_attn.moe  # one MoE configuration for both
    no_smoa = make_layer(sparse_attention=False)
    assert type(no_smoa.self_attn) is nn.MultiheadAttention and isinstance(no_smoa.ffn, SparseMoEFFN)
    no_smoe = make_layer(sparse_ffn=False, activation="relu")
    assert no_smoe.ffn is None and isinstance(no_smoe.linear1, nn.Linear) and no_smoe.activation is F.relu
    assert "sparse_attention=True, sparse_ffn=True" in repr(layer)


@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_shapes_and_masks_behave_like_torchs(batch_first):
    layer = make_layer(batch_first=batch_first).eval()
    x = layer_input(batch_first)
    assert layer(x).shape == x.shape

    # Padding: the padded tokens' values change nothing in the other tokens' outputs.
    mask = padding_mask()
    y = layer(x, src_key_padding_mask=mask)
    changed = x.clone()
    changed_seq = sequence(changed, batch_first, 0, slice(3, None))
    changed_seq.add_(5.0)
    y_changed = layer(changed, src_key_padding_mask=mask)
    torch.testing.assert_close(sequence(y_changed, batch_first, 0, slice(0, 3)), sequence(y, batch_first, 0, slice(0, 3)))
    torch.testing.assert_close(sequence(y_changed, batch_first, 1, slice(None)), sequence(y, batch_first, 1, slice(None)))
    # A float padding mask (-inf = padding) is the same mask.
    float_mask = torch.zeros(N, L, dtype=torch.float64).masked_fill(mask, float("-inf"))
    torch.testing.assert_close(layer(x, src_key_padding_mask=float_mask), y)

    # Causal: a token's output depends on no later token; is_causal is only a hint.
    causal = causal_mask()
    y = layer(x, src_mask=causal)
    torch.testing.assert_close(layer(x, src_mask=causal, is_causal=True), y)
    torch.testing.assert_close(layer(x, src_mask=causal.isinf()), y)  # bool mask, True = not allowed
    changed = x.clone()
    sequence(changed, batch_first, 1, slice(L - 1, None)).add_(5.0)
    torch.testing.assert_close(sequence(layer(changed, src_mask=causal), batch_first, 1, slice(0, L - 1)),
                               sequence(y, batch_first, 1, slice(0, L - 1)))
    # Both masks together; and an unbatched (L, C) input.
    assert layer(x, src_mask=causal.isinf(), src_key_padding_mask=mask).shape == x.shape
    single = sequence(x, batch_first, 1, slice(None))
    torch.testing.assert_close(layer(single), sequence(layer(x), batch_first, 1, slice(None)))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_in_torch_transformer_encoder(batch_first, training):
    layer = make_layer(batch_first=batch_first, dtype=torch.float32, dropout=0.1)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).train(training)
    x = layer_input(batch_first, dtype=torch.float32).requires_grad_(True)
    y = encoder(x, mask=causal_mask(torch.float32).isinf(), src_key_padding_mask=padding_mask())
    assert y.shape == x.shape and torch.isfinite(y).all()
    aux = collect_aux_loss(encoder)
    first, second = encoder.layers
    torch.testing.assert_close(aux, first.aux_loss + second.aux_loss)
    (y.square().mean() + aux).backward()
    assert x.grad is not None
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if not training:
        torch.testing.assert_close(encoder(x), encoder(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dense_ablation_is_torchs_layer(batch_first, norm_first):
    torch.manual_seed(0)
    dense = nn.TransformerEncoderLayer(C, NHEAD, HIDDEN, dropout=0.0, activation="gelu", batch_first=batch_first,
                                       norm_first=norm_first, dtype=torch.float64)
    ours = make_layer(seed=1, batch_first=batch_first, norm_first=norm_first, sparse_attention=False, sparse_ffn=False)
    ours.load_state_dict(dense.state_dict())  # strict: the same parameter names
    x = layer_input(batch_first)
    for mode in (False, True):
        dense.train(mode), ours.train(mode)
        kwargs = {"src_mask": causal_mask().isinf(), "src_key_padding_mask": padding_mask()}
        torch.testing.assert_close(ours(x, **kwargs), dense(x, **kwargs), **TOLERANCES[torch.float64])
        torch.testing.assert_close(ours(x), dense(x), **TOLERANCES[torch.float64])
    assert collect_aux_loss(ours).item() == 0.0 and ours.aux_loss is None


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_norm", "post_norm"])
def test_sparse_layer_is_the_residual_composition_of_its_parts(norm_first):
    layer = make_layer(norm_first=norm_first, batch_first=True).eval()
    x = layer_input(True)
    token_k = torch.randint(1, 3, (N, L))

    def attend(t):
        return layer.self_attn(t, t, t, need_weights=False, token_k=token_k)[0]

    if norm_first:
        h = x + attend(layer.norm1(x))
        expected = h + layer.ffn(layer.norm2(h), token_k=token_k)
    else:
        h = layer.norm1(x + attend(x))
        expected = layer.norm2(h + layer.ffn(h, token_k=token_k))
    torch.testing.assert_close(layer(x, token_k=token_k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_layer_token_k_reaches_every_router(batch_first):
    layer = make_layer(batch_first=batch_first, top_k=3).eval()
    x = layer_input(batch_first)
    token_k = torch.randint(1, 4, x.shape[:-1])
    layer(x, token_k=token_k)
    stats = {**{f"attn.{k}": v for k, v in layer.self_attn.routing_stats.items()}, "ffn": layer.ffn.routing_stats["ffn"]}
    assert set(stats) == {"attn.q", "attn.k", "attn.v", "ffn"}
    for name, router in stats.items():
        assert int(router["expert_counts"].sum()) == int(token_k.sum()), name
    # Dense parts ignore it.
    dense = make_layer(batch_first=batch_first, sparse_attention=False, sparse_ffn=False).eval()
    torch.testing.assert_close(dense(x, token_k=token_k), dense(x))


@pytest.mark.parametrize("ablation", ["full", "no_smoa", "no_smoe"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_default_kernels_equal_the_reference_with_every_gradient(dtype, training, ablation):
    flags = {"full": {}, "no_smoa": {"sparse_attention": False}, "no_smoe": {"sparse_ffn": False}}[ablation]
    layer = make_layer(dtype=dtype, batch_first=True, **flags).train(training)
    reference = set_backend(copy.deepcopy(layer), "reference")
    x = layer_input(True, dtype=dtype)
    kwargs = {"src_key_padding_mask": padding_mask(), "token_k": torch.randint(1, 3, (N, L))}
    fast, slow = loss_and_grads(layer, x, **kwargs), loss_and_grads(reference, x, **kwargs)
    assert len(fast[2]) == len(list(layer.parameters())) + 1  # every parameter has a gradient, and x
    assert_same_run(fast, slow, dtype)


def test_layer_aux_loss():
    layer = make_layer()
    assert layer.aux_loss is None
    layer(layer_input(False))
    total = collect_aux_loss(layer)
    torch.testing.assert_close(total, (layer.self_attn.aux_loss + layer.ffn.aux_loss).float())
    torch.testing.assert_close(layer.aux_loss, total)
    assert total.requires_grad and total.shape == ()
    total.backward()
    assert layer.ffn.router.grad.abs().sum() > 0


def test_layer_state_dict_round_trip():
    source, target = make_layer(seed=0).eval(), make_layer(seed=1).eval()
    x = layer_input(False)
    assert not torch.allclose(source(x), target(x))
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layer_compiles_fullgraph(training):
    torch._dynamo.reset()
    layer = make_layer(dtype=torch.float32, batch_first=True).train(training)
    x = layer_input(True, dtype=torch.float32)
    kwargs = {"src_key_padding_mask": padding_mask(), "token_k": torch.randint(1, 3, (N, L))}
    eager = loss_and_grads(layer, x, **kwargs)
    layer.zero_grad(set_to_none=True)
    compiled = loss_and_grads(torch.compile(layer, fullgraph=True, backend="aot_eager"), x, **kwargs)
    assert_same_run(compiled, eager, torch.float32)


def test_layer_rejects_an_activation_the_kernels_lack():
    with pytest.raises(ValueError, match="activation"):
        make_layer(activation="relu")
    with pytest.raises(ValueError, match="activation"):
        make_layer(sparse_ffn=False, activation="swish")
    assert make_layer(activation=F.gelu).ffn.activation == "gelu"
    assert make_layer(activation="gelu_tanh").ffn.activation == "gelu_tanh"
    with pytest.raises(ValueError, match="top_k"):
        make_layer(top_k=E + 1)


def test_layer_autocast_bf16():
    layer = make_layer(dtype=torch.float32, batch_first=True).eval()
    x = layer_input(True, dtype=torch.float32).bfloat16().float()
    full = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), full, atol=0.1, rtol=0.1)
    (y.float().sum() + layer.aux_loss).backward()
    assert all(p.grad is not None for p in layer.parameters())
