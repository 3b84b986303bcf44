"""The benchmarks' torch_grouped_mm peer (benchmarks/peers/torch_grouped_mm.py) computes the same
function as sm4: same gates (softmax of the fp32 logits at the top-k, not renormalised, noise
included), same outputs and gradients as sm4's float64 reference. Otherwise the benchmarks'
"sm4 / best peer" ratios would compare different work.

The peer runs in fp32 or bf16 (``F.grouped_mm`` has no float64 kernel), so it is compared with
the float64 reference at the fp32 / bf16 tolerances of tests/helpers.py.
"""

import pytest
import torch

from benchmarks.peers import torch_grouped_mm as peer
from sm4 import ops

from .helpers import TOLERANCES, assert_close, expert_params, router_inputs

TOKENS, DIM, HIDDEN, EXPERTS, K = 96, 16, 32, 7, 2  # E prime: groups of uneven, some empty, sizes


def _inputs(dtype, layer):
    x, router = router_inputs(TOKENS, DIM, EXPERTS, dtype=torch.float64)
    if layer == "moe_qkv":
        w = torch.stack([expert_params(EXPERTS, DIM, DIM, seed=s)[0] for s in (1, 2, 3)])
        b = torch.stack([expert_params(EXPERTS, DIM, DIM, seed=s)[1] for s in (4, 5, 6)])
        routers = torch.stack([router] + [router_inputs(TOKENS, DIM, EXPERTS, seed=s, dtype=torch.float64)[1]
                                          for s in (7, 8)])
        return [x, routers, w, b]
    w1, b1 = expert_params(EXPERTS, DIM, HIDDEN, seed=1)
    if layer == "moe_linear":
        return [x, router, w1, b1]
    w2, b2 = expert_params(EXPERTS, HIDDEN, DIM, seed=2)
    return [x, router, w1, b1, w2, b2]


def _sm4(layer, tensors, **kw):
    if layer == "moe_qkv":
        x, routers, w, b = tensors
        return ops.moe_qkv(x, tuple(routers.unbind(0)), w, b, K, backend="reference", **kw)[0]
    return getattr(ops, layer)(*tensors, K, backend="reference", **kw).output


def _peer(layer, tensors, **kw):
    if layer == "moe_qkv":
        x, routers, w, b = tensors
        return peer.moe_qkv(x, routers.unbind(0), w, b, K, **kw)
    return peer.LAYERS[layer](*tensors, K, **kw)


def _output_and_grads(fn, layer, tensors, grad_out=None, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(layer, leaves, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) \
        if grad_out is None else grad_out
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", ["moe_linear", "moe_ffn", "moe_qkv"])
def test_peer_matches_the_float64_reference(layer, dtype):
    tensors = [t.to(dtype).double() for t in _inputs(dtype, layer)]  # rounded to dtype once, on input
    expected, expected_grads, grad_out = _output_and_grads(_sm4, layer, tensors)
    out, grads, _ = _output_and_grads(_peer, layer, [t.to(dtype) for t in tensors], grad_out)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, msg=f"{layer} output")
    for name, grad, want in zip(["x", "router", "w1", "b1", "w2", "b2"], grads, expected_grads):
        # gradients sum over tokens: scale the tolerance with their magnitude, as the kernels' tests do
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(grad.double(), want, atol=tol["atol"] * max(1.0, want.abs().max().item()),
                                   rtol=tol["rtol"] * 4, msg=f"{layer} grad {name}")


def test_peer_gates_are_sm4s_gates_not_renormalised_with_training_noise():
    x, router = router_inputs(TOKENS, DIM, EXPERTS)
    noise = torch.randn(TOKENS, EXPERTS, generator=torch.Generator().manual_seed(3))
    for training in (False, True):
        want = ops.topk_gating(x, router, K, training=training, noise=noise, backend="reference")
        gates, ids, _ = peer.gate(x, router, K, training=training, noise=noise)
        torch.testing.assert_close(ids, want.expert_ids)
        torch.testing.assert_close(gates, want.gates, atol=1e-6, rtol=1e-6)
        assert (gates.sum(-1) < 1).all()  # kept probability mass, not renormalised to 1


def test_peer_with_per_token_k_zeroes_the_inactive_ranks():
    tensors = [t.float() for t in _inputs(torch.float32, "moe_ffn")]
    token_k = torch.randint(1, K + 1, (TOKENS,), generator=torch.Generator().manual_seed(4))
    token_k[:5] = 1  # some inactive ranks for sure
    expected, expected_grads, grad_out = _output_and_grads(_sm4, "moe_ffn", tensors, token_k=token_k)
    out, grads, _ = _output_and_grads(_peer, "moe_ffn", tensors, grad_out, token_k=token_k)
    assert_close(out, expected, torch.float32)
    for grad, want in zip(grads, expected_grads):  # the unwritten rows past offs[-1] leak nowhere
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, want, atol=1e-4, rtol=1e-4)


def test_an_encoder_layer_on_the_peer_experts_computes_the_same_layer():
    from benchmarks.peers.swap import use_torch_grouped_mm_experts
    from sm4.modules import collect_aux_loss
    from sm4.modules.encoder import SM4EncoderLayer

    torch.manual_seed(0)
    layer = SM4EncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, num_experts=EXPERTS, top_k=K,
                            backend="reference").eval()
    swapped = SM4EncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, num_experts=EXPERTS, top_k=K,
                              backend="reference").eval()
    swapped.load_state_dict(layer.state_dict())
    use_torch_grouped_mm_experts(swapped)
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(1))
    token_k = torch.randint(1, K + 1, (3, 10), generator=torch.Generator().manual_seed(2))
    for kw in ({}, {"token_k": token_k}):
        want = layer(x, **kw)
        got = swapped(x, **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # eval: no noise, so the hard load is sm4's load and the balancing losses agree
        torch.testing.assert_close(collect_aux_loss(swapped), collect_aux_loss(layer), atol=1e-6, rtol=1e-5)
    swapped.train()
    (swapped(x).square().mean() + collect_aux_loss(swapped)).backward()
    assert all(torch.isfinite(p.grad).all() for p in swapped.parameters() if p.grad is not None)
    assert swapped.ffn.w1.grad is not None and swapped.self_attn.expert_weight.grad is not None
