"""The glue around the CPU MoE layers (issue 13): what the composites skip, and that it stays right.

- Inference (no_grad, or no input that wants a gradient) builds no autograd node: the gating runs
  below its autograd wrapper, the balance terms and the fused linear-and-combine layer run their
  forward without an autograd.Function.
- The fused linear-and-combine node's backward computes each gradient only when asked, and each
  subset matches the reference backend.
- The router gradient's cheap all-finite check (one sum of the gates) still masks a non-finite token.
- The composites check their arguments once, under their own name.
"""

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sm4 import ops

from .helpers import TOLERANCES, expert_params, router_inputs

pytestmark = pytest.mark.skipif("cpu" not in ops.dispatch.implemented_ops() or
                                "expert_linear" not in ops.dispatch.implemented_ops()["cpu"],
                                reason="the cpu backend (sm4._C) is not built")

# Names of the autograd Functions (and the gating's register_autograd wrapper) a forward may run.
AUTOGRAD_NODES = ("GeneratedBackwardFor", "BalanceTerms", "ExpertLinear")


def _qkv_inputs(tokens=24, dim=8, experts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g)
    routers = tuple(torch.randn(dim, experts, generator=g) for _ in range(3))
    return x, routers, torch.randn(3, experts, dim, dim, generator=g) / dim**0.5, torch.randn(3, experts, dim, generator=g)


def _autograd_events(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if any(n in e.name for n in AUTOGRAD_NODES)})


@pytest.mark.parametrize("grad_mode", ["no_grad", "inputs_without_grad"])
def test_inference_builds_no_autograd_node(grad_mode):
    x, w = router_inputs(24, 8, 5)
    weight, bias = expert_params(5, 8, 6, dtype=torch.float32)
    qx, routers, weights, biases = _qkv_inputs()
    if grad_mode == "no_grad":  # parameters that want gradients, but grad mode is off
        for t in (x, w, weight, bias, qx, weights, biases, *routers):
            t.requires_grad_(True)

    def run():
        with torch.set_grad_enabled(grad_mode != "no_grad"):
            out = ops.moe_linear(x, w, weight, bias, 2, backend="cpu")
            qkv, _ = ops.moe_qkv(qx, routers, weights, biases, 2, backend="cpu")
        assert out.output.grad_fn is None and out.routing.importance_loss.grad_fn is None and qkv.grad_fn is None

    assert _autograd_events(run) == []


def test_training_still_builds_the_nodes():
    """The inference shortcut must not be taken when a gradient is wanted."""
    x, w = router_inputs(24, 8, 5)
    weight, bias = expert_params(5, 8, 6, dtype=torch.float32)
    w.requires_grad_(True)
    weight.requires_grad_(True)
    out = ops.moe_linear(x, w, weight, bias, 2, backend="cpu")
    assert out.output.grad_fn is not None and out.routing.importance_loss.grad_fn is not None
    assert out.routing.gates.grad_fn is not None


@pytest.mark.parametrize("wanted", [("x",), ("weight",), ("bias",), ("gates",), ("x", "gates"), ("weight", "bias")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_linear_backward_computes_each_gradient_subset(wanted, dtype):
    tokens, dim, experts, k = 30, 7, 5, 3
    x, w = router_inputs(tokens, dim, experts, dtype=dtype, seed=3)
    routing = ops.topk_gating(x, w, k, token_k=torch.randint(1, k + 1, (tokens,), generator=torch.Generator().manual_seed(4)),
                              backend="reference")
    meta = ops.routing_metadata(routing.expert_ids, experts)
    weight, bias = expert_params(experts, dim, 4, dtype=dtype)
    inputs = {"x": x, "weight": weight, "bias": bias, "gates": routing.gates.detach().to(dtype)}

    def grads(backend):
        leaves = {name: t.detach().clone().requires_grad_(name in wanted) for name, t in inputs.items()}
        y = ops.expert_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["gates"], meta, backend=backend)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        return {name: t.grad for name, t in leaves.items()}

    got, want = grads("cpu"), grads("reference")
    for name in inputs:
        if name not in wanted:
            assert got[name] is None, name
            continue
        torch.testing.assert_close(got[name].double(), want[name].double(), **TOLERANCES[dtype], msg=name)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_router_gradient_masks_a_non_finite_token(bad):
    """One bad token among good ones: the all-finite check sees it and the router gradient is the
    gradient of the good tokens only (the same as with the bad token's features zeroed and its
    output left out of the loss)."""
    tokens, dim, experts = 20, 6, 4
    x, w = router_inputs(tokens, dim, experts, seed=5)
    weight, bias = expert_params(experts, dim, 3, dtype=torch.float32)
    x[7] = bad
    good = torch.ones(tokens, 1)
    good[7] = 0

    def router_grad(features):
        router = w.clone().requires_grad_(True)
        out = ops.moe_linear(features, router, weight, bias, 2, backend="cpu")
        (torch.nan_to_num(out.output, nan=0.0) * good).sum().backward()
        return router.grad

    got = router_grad(x)
    assert torch.isfinite(got).all()
    zeroed = torch.where(good.bool(), x, 0.0)
    torch.testing.assert_close(got, router_grad(zeroed), atol=1e-5, rtol=1e-5)
    # and with every token finite the fast path (no mask) gives the masked path's answer
    x[7] = 0.0
    torch.testing.assert_close(router_grad(x), router_grad(zeroed), atol=0, rtol=0)


def test_composite_checks_name_the_composite():
    x, routers, weights, biases = _qkv_inputs()
    with pytest.raises(ValueError, match=r"sm4\.ops\.moe_qkv: k must be >= 1 and <= E = 5, got 9"):
        ops.moe_qkv(x, routers, weights, biases, 9)
    with pytest.raises(TypeError, match=r"sm4\.ops\.moe_qkv: training must be a bool"):
        ops.moe_qkv(x, routers, weights, biases, 2, training=1)
    xl, w = router_inputs(24, 8, 5)
    weight, bias = expert_params(5, 8, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"sm4\.ops\.moe_linear: k must be"):
        ops.moe_linear(xl, w, weight, bias, 6)


def test_fused_linear_node_compiles_fullgraph():
    """ExpertLinearCombine and the no-grad shortcuts under torch.compile: same loss and gradients."""
    x, w = router_inputs(24, 8, 5)
    weight, bias = expert_params(5, 8, 6, dtype=torch.float32)
    w.requires_grad_(True)
    weight.requires_grad_(True)

    def step(x, w, weight):
        out = ops.moe_linear(x, w, weight, bias, 2, backend="cpu")
        return out.output.square().mean() + out.routing.importance_loss

    eager = step(x, w, weight)
    want = torch.autograd.grad(eager, (w, weight))
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, w, weight)
    got = torch.autograd.grad(loss, (w, weight))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
