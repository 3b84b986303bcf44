"""SparseMoEAttention as a drop-in for nn.MultiheadAttention: equal to it with one expert (outputs
and attention weights, every mask and layout), upcycled, kernels against the reference for every
parameter gradient, inside torch's transformer layers, autocast, compile, state_dict, bad args."""

import pytest
import torch
from torch import nn

import sm4
from sm4 import SparseMoEAttention

from .helpers import skip_unless_runs

DTYPE = torch.float64


def dense_and_sparse(embed=16, heads=4, num_experts=1, top_k=1, seed=0, **kwargs):
    torch.manual_seed(seed)
    moe_keys = {"renormalize", "noise_std", "balance_loss_weight", "backend", "sparse"}
    dense_kwargs = {key: value for key, value in kwargs.items() if key not in moe_keys}
    moe_kwargs = {key: value for key, value in kwargs.items() if key in moe_keys}
    mha = nn.MultiheadAttention(embed, heads, dtype=DTYPE, **dense_kwargs).eval()
    sparse = SparseMoEAttention.from_dense(mha, num_experts=num_experts, top_k=top_k, **moe_kwargs).eval()
    return mha, sparse


def assert_same_call(mha, sparse, *args, **kwargs):
    want = mha(*args, **kwargs)
    got = sparse(*args, **kwargs)
    torch.testing.assert_close(got[0], want[0])
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_one_expert_equals_multihead_attention(batch_first, need_weights, average):
    mha, sparse = dense_and_sparse(batch_first=batch_first)
    x = torch.randn(3, 5, 16, dtype=DTYPE)
    assert_same_call(mha, sparse, x, x, x, need_weights=need_weights, average_attn_weights=average)
    memory = torch.randn(3, 7, 16, dtype=DTYPE) if batch_first else torch.randn(7, 5, 16, dtype=DTYPE)
    assert_same_call(mha, sparse, x, memory, memory, need_weights=need_weights, average_attn_weights=average)


def test_masks_and_causal_hint_match_multihead_attention():
    mha, sparse = dense_and_sparse(batch_first=True)
    x = torch.randn(2, 6, 16, dtype=DTYPE)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=DTYPE)
    bool_causal = causal.isinf()
    for kwargs in [
        dict(key_padding_mask=padding),
        dict(key_padding_mask=padding.to(DTYPE) * -1e9),
        dict(attn_mask=causal),
        dict(attn_mask=bool_causal, key_padding_mask=padding),
        dict(attn_mask=causal, is_causal=True, need_weights=False),
        dict(attn_mask=causal, is_causal=True, key_padding_mask=padding),
        dict(attn_mask=torch.randn(2 * 4, 6, 6, dtype=DTYPE)),
    ]:
        assert_same_call(mha, sparse, x, x, x, **kwargs)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        sparse(x, x, x, is_causal=True)


@pytest.mark.parametrize("options", [dict(add_bias_kv=True), dict(add_zero_attn=True), dict(kdim=5, vdim=7), dict(bias=False)])
def test_options_match_multihead_attention(options):
    mha, sparse = dense_and_sparse(batch_first=True, **options)
    q = torch.randn(2, 4, 16, dtype=DTYPE)
    kv_k = torch.randn(2, 6, options.get("kdim", 16), dtype=DTYPE)
    kv_v = torch.randn(2, 6, options.get("vdim", 16), dtype=DTYPE)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, -2:] = True
    assert_same_call(mha, sparse, q, kv_k, kv_v, key_padding_mask=padding)


def test_unbatched_input():
    mha, sparse = dense_and_sparse()
    x = torch.randn(5, 16, dtype=DTYPE)
    assert_same_call(mha, sparse, x, x, x, key_padding_mask=torch.tensor([False] * 4 + [True]))


def test_upcycled_layer_with_renormalized_gates_equals_the_dense_layer():
    mha, sparse = dense_and_sparse(num_experts=4, top_k=2, renormalize=True, batch_first=True)
    x = torch.randn(3, 5, 16, dtype=DTYPE)
    assert_same_call(mha, sparse, x, x, x)
    assert sparse.aux_loss is not None and sparse.aux_loss.requires_grad


def grads(module, *inputs, **kwargs):
    module.zero_grad()
    out, _ = module(*inputs, need_weights=False, **kwargs)
    loss = out.square().sum() + sm4.collect_aux_loss(module)
    loss.backward()
    return out.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("self_attention", [True, False], ids=["fused qkv", "cross attention"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernels_match_the_reference_for_every_parameter_gradient(backend, self_attention):
    skip_unless_runs(backend, "expert_linear")
    dtype = torch.float64 if backend == "cpu" else torch.float32
    torch.manual_seed(0)
    layer = SparseMoEAttention(16, 4, batch_first=True, num_experts=5, top_k=2, dtype=dtype).train()
    x = torch.randn(2, 6, 16, dtype=dtype)
    memory = x if self_attention else torch.randn(2, 4, 16, dtype=dtype)
    token_k = torch.randint(1, 3, (2, 6))
    key_token_k = token_k if self_attention else torch.randint(1, 3, (2, 4))
    results = {}
    for name in ("reference", backend):
        sm4.set_backend(layer, name)
        torch.manual_seed(1)  # the same router noise
        results[name] = grads(layer, x, memory, memory, token_k=token_k, key_token_k=key_token_k)
    tolerance = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(results[backend][0], results["reference"][0], **tolerance)
    for name, grad in results["reference"][1].items():
        torch.testing.assert_close(results[backend][1][name], grad, **tolerance, msg=name)


def test_per_token_k_reaches_every_router():
    torch.manual_seed(0)
    layer = SparseMoEAttention(8, 2, batch_first=True, num_experts=4, top_k=3).eval()
    x = torch.randn(2, 5, 8)
    layer(x, x, x, token_k=torch.ones(2, 5, dtype=torch.long))
    for name in ("q", "k", "v"):
        assert int(layer.routing_stats[name]["expert_counts"].sum()) == 10  # one expert per token
        assert layer.routing_stats[name]["entropy"].shape == (10,)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_drop_in_for_transformer_encoder_and_decoder_layers(mode):
    torch.manual_seed(0)
    encoder_layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True)
    encoder_layer.self_attn = SparseMoEAttention(16, 4, dropout=0.1, batch_first=True, num_experts=4)
    decoder_layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True)
    decoder_layer.self_attn = SparseMoEAttention(16, 4, dropout=0.1, batch_first=True, num_experts=4)
    decoder_layer.multihead_attn = SparseMoEAttention(16, 4, dropout=0.1, batch_first=True, num_experts=4)
    encoder = nn.TransformerEncoder(encoder_layer, num_layers=2, enable_nested_tensor=False)
    decoder = nn.TransformerDecoder(decoder_layer, num_layers=2)
    model = nn.ModuleDict({"encoder": encoder, "decoder": decoder}).train(mode == "train")
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -3:] = True
    memory = encoder(src, src_key_padding_mask=padding)
    out = decoder(tgt, memory, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True,
                  memory_key_padding_mask=padding)
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()
    loss = out.square().mean() + sm4.collect_aux_loss(model)
    loss.backward()
    routers = [p for name, p in model.named_parameters() if "routers" in name]
    assert len(routers) == 6 and all(p.grad is not None for p in routers)


def test_autocast_bfloat16():
    torch.manual_seed(0)
    layer = SparseMoEAttention(16, 4, batch_first=True, num_experts=4).eval()
    x = torch.randn(2, 5, 16)
    reference, _ = layer(x, x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = layer(x, x, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_compiles_fullgraph():
    torch.manual_seed(0)
    layer = SparseMoEAttention(16, 4, batch_first=True, num_experts=4).eval()
    x = torch.randn(2, 5, 16)

    def step(x):
        out, _ = layer(x, x, x, need_weights=False)
        return out, layer.aux_loss

    eager = step(x)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    layer = SparseMoEAttention(16, 4, num_experts=3, kdim=6, vdim=6, sparse=("q", "v")).eval()
    path = tmp_path / "attn.pt"
    torch.save(layer.state_dict(), path)
    torch.manual_seed(1)
    copy = SparseMoEAttention(16, 4, num_experts=3, kdim=6, vdim=6, sparse=("q", "v")).eval()
    copy.load_state_dict(torch.load(path))
    q, kv = torch.randn(4, 2, 16), torch.randn(3, 2, 6)
    torch.testing.assert_close(copy(q, kv, kv)[0], layer(q, kv, kv)[0])
    assert "k_proj_weight" in layer.state_dict() and "q_router" in layer.state_dict()


def test_bad_arguments_are_as_clear_as_multihead_attention():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads"):
        SparseMoEAttention(10, 3)
    with pytest.raises(ValueError, match="top_k must be an int in \\[1, num_experts=4\\]"):
        SparseMoEAttention(8, 2, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        SparseMoEAttention(8, 2, num_experts=4, top_k=0)
    with pytest.raises(ValueError, match="sparse must name projections"):
        SparseMoEAttention(8, 2, sparse=("q", "o"))
    layer = SparseMoEAttention(8, 2, num_experts=2)
    with pytest.raises(ValueError, match="unbatched 2D or batched 3D"):
        layer(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8))


def test_autocast_routes_in_fp32_on_every_backend():
    torch.manual_seed(0)
    layer = SparseMoEAttention(16, 4, batch_first=True, num_experts=4, kdim=8, vdim=8, sparse=("q", "v")).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    outputs = {}
    for backend in ("reference", "cpu"):
        sm4.set_backend(layer, backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[backend] = layer(q, kv, kv)[0]
        assert outputs[backend].dtype == torch.bfloat16
        assert layer.routing_stats["q"]["importance"].dtype == torch.float32
    torch.testing.assert_close(outputs["cpu"], outputs["reference"], atol=1e-2, rtol=1e-2)


def test_short_cpu_inference_uses_the_math_attention_kernel(monkeypatch):
    """ops.scaled_dot_product_attention: SDPA's math kernel for short sequences on a CPU without
    autograd (faster there), torch's own choice otherwise; the same values either way."""
    import torch.nn.functional as F

    from sm4 import ops

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    for length, grad in ((24, False), (24, True), (ops.SHORT_SEQUENCE + 1, False)):
        q, k, v = (torch.randn(2, 3, length, 8, generator=g).requires_grad_(grad) for _ in range(3))
        mask = torch.randn(length, length, generator=g)
        torch.testing.assert_close(ops.scaled_dot_product_attention(q, k, v, attn_mask=mask), real(q, k, v, attn_mask=mask))
    assert seen == [False, True, True], "flash off (math kernel) only for the short no-grad call"
    assert torch.backends.cuda.flash_sdp_enabled(), "the kernel choice must not leak out of the call"
