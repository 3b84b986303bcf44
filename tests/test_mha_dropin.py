"""SparseMoEAttention where torch uses an nn.MultiheadAttention: swapped into built containers in
every mode, nested input, deepcopy/pickle, torch's exception classes, export, jit.script's refusal,
and second derivatives (exact where claimed, a clear error where not)."""

import copy
import io
import pickle
import weakref

import pytest
import torch
from torch import nn

import sm4
from sm4 import SparseMoEAttention
from sm4.modules import AttentionRuntimeError, AttentionTypeError, AttentionValueError

from .helpers import skip_unless_runs

F64 = torch.float64


def swap_attention(model):
    """Replace every self_attn / multihead_attn of torch's layers by its one-expert upcycling."""
    for layer in model.modules():
        for name in ("self_attn", "multihead_attn"):
            dense = getattr(layer, name, None)
            if isinstance(dense, nn.MultiheadAttention):
                setattr(layer, name, SparseMoEAttention.from_dense(dense, num_experts=1, top_k=1))
    return model


@pytest.mark.parametrize("batch_first", [True, False])
def test_swapped_into_a_built_encoder_in_every_mode(batch_first):
    torch.manual_seed(0)
    dense = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first), 2,
                                  enable_nested_tensor=True)
    sparse = swap_attention(copy.deepcopy(dense))
    src = torch.randn(2, 6, 8) if batch_first else torch.randn(6, 2, 8)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    valid = ~padding if batch_first else ~padding.t()
    for training in (True, False):
        for grad in (True, False):
            dense.train(training), sparse.train(training)
            with torch.set_grad_enabled(grad):
                want, got = dense(src, src_key_padding_mask=padding), sparse(src, src_key_padding_mask=padding)
            # torch's no-grad fast path zeroes padded positions; elsewhere they are equal.
            torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert not sparse.layers[0].self_attn.in_proj_weight.requires_grad  # attribute reads work
    with pytest.raises(TypeError, match="no packed in_proj_weight"):
        sparse.layers[0].self_attn.in_proj_weight.chunk(3)


def test_encoder_decoder_transformer_built_after_the_swap_train_and_backward():
    torch.manual_seed(0)
    layer = swap_attention(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True))
    encoder = nn.TransformerEncoder(layer, 2)  # deep-copies the layer
    decoder = nn.TransformerDecoder(swap_attention(nn.TransformerDecoderLayer(8, 2, 16, batch_first=True)), 2)
    transformer = swap_attention(nn.Transformer(8, 2, 1, 1, 16, batch_first=True))
    src, tgt = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    for model in (encoder, decoder, transformer):
        for training in (True, False):
            model.train(training)
            if model is encoder:
                out = model(src, src_key_padding_mask=padding)
            elif model is decoder:
                out = model(tgt, src, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=padding)
            else:
                out = model(src, tgt, tgt_mask=causal, src_key_padding_mask=padding, memory_key_padding_mask=padding)
            (out.square().mean() + sm4.collect_aux_loss(model)).backward()
            assert all(p.grad is not None for n, p in model.named_parameters() if "routers" in n)
            with torch.no_grad():
                assert torch.isfinite(model(src, src_key_padding_mask=padding) if model is encoder else out).all()


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_input_equals_padded_input_with_mask(layout):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    layer = SparseMoEAttention.from_dense(mha, num_experts=3, top_k=2, renormalize=True).eval()
    parts = [torch.randn(3, 8), torch.randn(5, 8)]
    padded = torch.nested.to_padded_tensor(torch.nested.nested_tensor(parts), 0.0)
    padding = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    want, want_weights = layer(padded, padded, padded, key_padding_mask=padding)
    nested = torch.nested.nested_tensor(parts, layout=layout, requires_grad=True)
    got, weights = layer(nested, nested, nested)
    assert got.is_nested and got.layout == layout
    for i, part in enumerate(got.unbind()):
        torch.testing.assert_close(part, want[i, : part.shape[0]])
    torch.testing.assert_close(weights[0, :3], want_weights[0, :3])
    assert (weights[0, 3:] == 0).all()
    sum(part.sum() for part in got.unbind()).backward()
    assert nested.grad is not None
    if layout == torch.strided:  # torch's own fast path takes strided nested input: same numbers
        with torch.no_grad():
            dense_out, dense_weights = mha(nested, nested, nested)
            ours, our_weights = layer(nested, nested, nested)
        torch.testing.assert_close(torch.nested.to_padded_tensor(ours, 0.0),
                                   torch.nested.to_padded_tensor(dense_out, 0.0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(our_weights, dense_weights)
    with pytest.raises(AssertionError, match="not supported with NestedTensor"):
        layer(nested, nested, nested, key_padding_mask=padding)


def test_deepcopy_pickle_and_checkpoints_after_a_forward_with_grad(tmp_path):
    torch.manual_seed(0)
    layer = SparseMoEAttention(8, 2, num_experts=3).train()
    x = torch.randn(4, 2, 8, requires_grad=True)
    layer(x, x, x)
    assert layer.aux_loss.requires_grad
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.aux_loss is None and clone.routing_stats == {}
        torch.testing.assert_close(clone.eval()(x, x, x)[0], layer.eval()(x, x, x)[0])
        layer.train()
    assert not any("aux" in key or "routing" in key and "router" not in key for key in layer.state_dict())
    nn.TransformerEncoder(swap_attention(nn.TransformerEncoderLayer(8, 2, 16)), 2)
    path = tmp_path / "model.pt"
    torch.save(layer, path)
    assert torch.load(path, weights_only=False).aux_loss is None


def test_kept_statistics_hold_no_graph_across_steps():
    torch.manual_seed(0)
    layer = SparseMoEAttention(8, 2, num_experts=3).train()
    x = torch.randn(4, 2, 8, requires_grad=True)
    seen = weakref.ref(x)
    layer(x, x, x)  # no backward: the kept aux_loss holds this step's graph (and x) ...
    del x
    assert seen() is not None
    y = torch.randn(4, 2, 8, requires_grad=True)
    layer(y, y, y)  # ... until the next forward replaces it
    assert seen() is None


def test_multihead_attention_attributes_exist():
    layer = SparseMoEAttention(8, 2, kdim=4, vdim=4, sparse=("q",), num_experts=2)
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_weight", "in_proj_bias", "bias_k",
                 "bias_v", "_qkv_same_embed_dim", "batch_first", "embed_dim", "kdim", "vdim", "num_heads",
                 "head_dim", "dropout", "add_zero_attn", "out_proj", "merge_masks", "_reset_parameters"):
        assert hasattr(layer, name) and hasattr(mha, name), name
    assert layer.q_proj_weight is None and layer.k_proj_weight.shape == mha.k_proj_weight.shape
    assert layer._qkv_same_embed_dim is mha._qkv_same_embed_dim is False
    assert layer.in_proj_bias is None and "in_proj_weight" not in layer.state_dict()


BAD_CALLS = [  # (what, call on (layer, x (L, N, C)), torch's class, sm4's class)
    ("4-D query", lambda m, x: m(x[None], x[None], x[None]), AssertionError, ValueError),
    ("mixed dims", lambda m, x: m(x, x[0], x[0]), AssertionError, ValueError),
    ("embed dim", lambda m, x: m(x[..., :4], x[..., :4], x[..., :4]), AssertionError, ValueError),
    ("key/value shapes", lambda m, x: m(x, x, x[:3]), AssertionError, ValueError),
    ("uint8 padding mask", lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.uint8)),
     AssertionError, TypeError),
    ("int attn_mask", lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64)), AssertionError, TypeError),
    ("1-D padding mask", lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(5, dtype=torch.bool)),
     AssertionError, ValueError),
    ("padding mask shape", lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     AssertionError, ValueError),
    ("4-D attn_mask", lambda m, x: m(x, x, x, attn_mask=torch.zeros(1, 1, 5, 5)), AssertionError, ValueError),
    ("2-D attn_mask shape", lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 4)), RuntimeError, ValueError),
    ("3-D attn_mask shape", lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 5, 5)), RuntimeError, ValueError),
    ("is_causal without mask", lambda m, x: m(x, x, x, is_causal=True), RuntimeError, ValueError),
    ("unbatched 3-D attn_mask", lambda m, x: m(x[:, 0], x[:, 0], x[:, 0], attn_mask=torch.zeros(3, 5, 5)),
     AssertionError, ValueError),
]


@pytest.mark.parametrize("what, call, torch_class, sm4_class", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_what_torch_raises(what, call, torch_class, sm4_class):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)
    layer = SparseMoEAttention.from_dense(mha, num_experts=2)
    x = torch.randn(5, 2, 8)
    with pytest.raises(torch_class):
        call(mha, x)
    with pytest.raises(torch_class) as raised:
        call(layer, x)
    assert isinstance(raised.value, sm4_class)
    with pytest.raises(AssertionError, match="divisible") as raised:
        SparseMoEAttention(10, 3)
    assert isinstance(raised.value, ValueError)
    assert issubclass(AttentionValueError, AssertionError) and issubclass(AttentionTypeError, TypeError)
    assert issubclass(AttentionRuntimeError, RuntimeError)


def test_export_of_the_module_and_the_encoder_layer_equals_eager():
    torch.manual_seed(0)
    layer = SparseMoEAttention(8, 2, batch_first=True, num_experts=3).eval()
    encoder_layer = sm4.SM4EncoderLayer(8, 2, 16, batch_first=True, num_experts=3).eval()
    x = torch.randn(2, 4, 8)
    program = torch.export.export(layer, (x, x, x))
    y = torch.randn(2, 4, 8)
    for got, want in zip(program.module()(y, y, y), layer(y, y, y)):
        torch.testing.assert_close(got, want)
    program = torch.export.export(encoder_layer, (x,))
    torch.testing.assert_close(program.module()(y), encoder_layer(y))


def test_jit_script_names_the_supported_routes():
    for module in (SparseMoEAttention(8, 2, num_experts=2), sm4.SM4EncoderLayer(8, 2, 16, num_experts=2),
                   nn.TransformerEncoder(swap_attention(nn.TransformerEncoderLayer(8, 2, 16)), 1)):
        with pytest.raises(RuntimeError, match="torch.compile.*torch.export"):
            torch.jit.script(module)


# ---- second derivatives ----------------------------------------------------------------------


def test_attention_gradgradcheck_on_the_reference_backend():
    torch.manual_seed(0)
    layer = SparseMoEAttention(4, 2, num_experts=3, top_k=2, add_bias_kv=True, dtype=F64, backend="reference").eval()
    x = torch.randn(3, 2, 4, dtype=F64, requires_grad=True)
    # need_weights=True: the explicit softmax (SDPA's fused CPU kernel has no double backward,
    # for nn.MultiheadAttention just the same).
    fn = lambda x: layer(x, x, x)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_permutation_gradgradcheck_on_every_backend_that_claims_it():
    from sm4 import ops

    torch.manual_seed(0)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [1, 1]])
    metadata = ops.routing_metadata(ids, 3, backend="reference")
    for backend in ("reference", "cpu"):
        skip_unless_runs(backend, "permute")
        x = torch.randn(4, 3, dtype=F64, requires_grad=True)
        rows = torch.randn(8, 3, dtype=F64, requires_grad=True)
        gates = torch.rand(4, 2, dtype=F64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda x: ops.permute(x, metadata, backend=backend), (x,))
        assert torch.autograd.gradgradcheck(lambda r, g: ops.unpermute(r, g, metadata, backend=backend), (rows, gates))


def test_triton_permutation_second_derivatives_equal_the_reference():
    """The Triton backend has no float64: its Hessian-vector product against the reference in fp32."""
    from sm4 import ops

    skip_unless_runs("triton", "permute")
    torch.manual_seed(0)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0]])
    x, rows, gates = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True), torch.rand(3, 2)
    gates.requires_grad_()
    results = {}
    for backend in ("reference", "triton"):
        metadata = ops.routing_metadata(ids, 3, backend=backend)
        y = ops.unpermute(ops.permute(x, metadata, backend=backend) * rows, gates, metadata, backend=backend)
        first = torch.autograd.grad(y.square().sum(), (x, rows, gates), create_graph=True)
        results[backend] = torch.autograd.grad(sum(g.square().sum() for g in first), (x, rows, gates))
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("module", ["attention", "ffn", "gating"])
def test_fused_backwards_refuse_create_graph_with_the_way_out(backend, module):
    skip_unless_runs(backend, "expert_linear")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    if module == "attention":
        out = SparseMoEAttention(8, 2, num_experts=3, backend=backend)(x, x, x)[0]
    elif module == "ffn":
        out = sm4.SparseMoEFFN(8, 16, num_experts=3, backend=backend)(x)
    else:
        out = sm4.ops.topk_gating(x.view(6, 8), torch.randn(8, 3), 2, backend=backend).gates
    with pytest.raises(sm4.DoubleBackwardNotSupportedError, match='set_backend\\(module, "reference"\\)'):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    assert torch.autograd.grad(out.square().sum(), x)[0].shape == x.shape  # first order unaffected
