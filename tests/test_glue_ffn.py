"""The fused FFN experts and their combine as one autograd node (ExpertFFNCombine, issue 13).

- Each gradient subset (x, w1, b1, w2, b2, gates, and mixes) matches the reference backend, with a
  per-token k, in fp32 and fp64, and in bf16 within its tolerance; with the fused fp32 FFN backward
  op and with it switched off (the layered backward), and with recompute_hidden.
- An unwanted gradient is None (not computed).
- Inference (no_grad, or nothing that wants a gradient) builds no autograd node.
- torch.compile(fullgraph=True) of a moe_ffn step gives eager's loss and gradients.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sm4 import grouped, ops

from .helpers import TOLERANCES, expert_params, router_inputs

pytestmark = pytest.mark.skipif("cpu" not in ops.dispatch.implemented_ops() or
                                "expert_ffn" not in ops.dispatch.implemented_ops()["cpu"],
                                reason="the cpu backend (sm4._C) is not built")

NAMES = ("x", "w1", "b1", "w2", "b2", "gates")


def _inputs(dtype, tokens=30, dim=7, hidden=9, out=5, experts=5, k=3, seed=3):
    x, w = router_inputs(tokens, dim, experts, dtype=torch.float64, seed=seed)
    token_k = torch.randint(1, k + 1, (tokens,), generator=torch.Generator().manual_seed(seed + 1))
    routing = ops.topk_gating(x, w, k, token_k=token_k, backend="reference")
    meta = ops.routing_metadata(routing.expert_ids, experts)
    w1, b1 = expert_params(experts, dim, hidden, seed=seed + 2)
    w2, b2 = expert_params(experts, hidden, out, seed=seed + 3)
    tensors = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "gates": routing.gates.detach()}
    return {name: t.to(dtype) for name, t in tensors.items()}, meta


def _grads(inputs, meta, wanted, backend, recompute_hidden=False, dtype=None):
    leaves = {name: t.detach().clone().to(dtype or t.dtype).requires_grad_(name in wanted) for name, t in inputs.items()}
    y = ops.expert_ffn(leaves["x"], leaves["w1"], leaves["b1"], leaves["w2"], leaves["b2"], leaves["gates"], meta,
                       recompute_hidden=recompute_hidden, backend=backend)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return {name: t.grad for name, t in leaves.items()}


SUBSETS = [("x",), ("w1",), ("b1",), ("w2",), ("b2",), ("gates",), ("x", "gates"), ("w1", "b1", "w2", "b2"), NAMES]


@pytest.mark.parametrize("fused_backward", [True, False], ids=["fused_op", "layered"])
@pytest.mark.parametrize("wanted", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_ffn_node_computes_each_gradient_subset(wanted, dtype, fused_backward, monkeypatch):
    monkeypatch.setattr(grouped, "FUSED_FFN_BACKWARD", fused_backward)
    inputs, meta = _inputs(dtype)
    got = _grads(inputs, meta, wanted, "cpu")
    want = _grads(inputs, meta, wanted, "reference")
    for name in NAMES:
        if name not in wanted:
            assert got[name] is None, name
            continue
        assert got[name].dtype == dtype, name
        torch.testing.assert_close(got[name].double(), want[name].double(), **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ffn_node_recompute_hidden(dtype):
    inputs, meta = _inputs(dtype, seed=7)
    got = _grads(inputs, meta, NAMES, "cpu", recompute_hidden=True)
    want = _grads(inputs, meta, NAMES, "reference")
    for name in NAMES:
        torch.testing.assert_close(got[name].double(), want[name].double(), **TOLERANCES[dtype], msg=name)


def test_moe_ffn_builds_one_expert_node():
    """The FFN experts and the combine are one node: the output's grad_fn is ExpertFFNCombine."""
    inputs, meta = _inputs(torch.float32)
    w1 = inputs["w1"].clone().requires_grad_(True)
    y = ops.expert_ffn(inputs["x"], w1, inputs["b1"], inputs["w2"], inputs["b2"], inputs["gates"], meta, backend="cpu")
    assert "ExpertFFNCombine" in type(y.grad_fn).__name__


@pytest.mark.parametrize("grad_mode", ["no_grad", "inputs_without_grad"])
def test_ffn_inference_builds_no_autograd_node(grad_mode):
    x, w = router_inputs(24, 8, 5)
    w1, b1 = expert_params(5, 8, 12, dtype=torch.float32)
    w2, b2 = expert_params(5, 12, 6, dtype=torch.float32, seed=2)
    if grad_mode == "no_grad":
        for t in (x, w, w1, b1, w2, b2):
            t.requires_grad_(True)

    def run():
        with torch.set_grad_enabled(grad_mode != "no_grad"):
            out = ops.moe_ffn(x, w, w1, b1, w2, b2, 2, backend="cpu")
        assert out.output.grad_fn is None

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    assert sorted({e.name for e in prof.events() if "ExpertFFN" in e.name or "BalanceTerms" in e.name}) == []


def test_fused_ffn_node_compiles_fullgraph():
    x, w = router_inputs(24, 8, 5)
    w1, b1 = expert_params(5, 8, 12, dtype=torch.float32)
    w2, b2 = expert_params(5, 12, 6, dtype=torch.float32, seed=2)
    for t in (w, w1, w2):
        t.requires_grad_(True)

    def step(x, w, w1, w2):
        out = ops.moe_ffn(x, w, w1, b1, w2, b2, 2, backend="cpu")
        return out.output.square().mean() + out.routing.importance_loss

    eager = step(x, w, w1, w2)
    want = torch.autograd.grad(eager, (w, w1, w2))
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, w, w1, w2)
    got = torch.autograd.grad(loss, (w, w1, w2))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
