"""The fused fp32 FFN-expert backward (sm4::grouped_ffn_backward, csrc/cpu/grouped_ffn_backward.cpp).

Checks, against autograd of a float64 per-row reference: the op's five gradients over the edge
cases (T = 0/1, E prime, k = E, empty experts, all rows to one expert, h = 0, padding rows,
gather/scatter or neither, both GELUs, non-contiguous inputs); opcheck with its fake kernel;
bitwise repeatability and thread-count independence; that the cpu backend's layers take it by
default (and the layered backward when it is switched off, for other dtypes, and where the device
has no kernel) with the same gradients; and that double backward is refused.
"""

import pytest
import torch
import torch.nn.functional as F

import sm4
import sm4.grouped
from sm4 import _extension, ops
from sm4._double_backward import DoubleBackwardNotSupportedError

from .helpers import TOLERANCES, skip_unless_runs

pytestmark = pytest.mark.skipif(not _extension.has_kernel("grouped_ffn_backward", "CPU"),
                                reason="the extension has no CPU grouped_ffn_backward kernel")
FP32 = TOLERANCES[torch.float32]
OP = "sm4::grouped_ffn_backward"


def randn(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def reference(grad_out, x, w1, b1, w2, b2, offsets, gather, scatter, activation):
    """float64 autograd of out[scatter[i]] = gelu(x[gather[i]] @ w1[e] + b1[e]) @ w2[e] + b2[e]
    over the active sorted rows i of expert e. Returns (preact (M, h), grads of x, w1, b1, w2, b2)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    x64, w1_64, b1_64, w2_64, b2_64 = leaves
    rows = len(gather) if gather is not None else x.shape[0]
    approximate = "tanh" if activation == 2 else "none"
    out = torch.zeros(grad_out.shape, dtype=torch.float64)
    pre_rows = torch.zeros(rows, w1.shape[2], dtype=torch.float64)
    for e in range(w1.shape[0]):
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        if lo == hi:
            continue
        sel = torch.arange(lo, hi)
        src = gather[sel] if gather is not None else sel
        pre = x64[src] @ w1_64[e] + b1_64[e]
        pre_rows[lo:hi] = pre.detach()
        y = F.gelu(pre, approximate=approximate) @ w2_64[e] + b2_64[e]
        out = out.index_add(0, scatter[sel] if scatter is not None else sel, y)
    if not out.requires_grad:  # no active row: every gradient is zero
        return pre_rows, [torch.zeros_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad(out, leaves, grad_out.double(), allow_unused=True)
    return pre_rows, [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


def problem(counts, tokens, k, d_in=13, hidden=24, d_out=11, seed=0, padding=0, indexed=True):
    """fp32 inputs of the op: counts rows per expert (+ padding inactive rows); with indexed, the
    fused layout (gather = token of each assignment, scatter = assignment, as routing_metadata
    makes them), else x already in sorted order."""
    experts, active = len(counts), sum(counts)
    rows = active + padding
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.long)
    if indexed:
        assert rows == tokens * k
        scatter = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        gather = scatter // k
        x = randn(tokens, d_in, seed=seed + 1)
        out_rows = rows
    else:
        gather = scatter = None
        x = randn(rows, d_in, seed=seed + 1)
        out_rows = rows
    w1, b1 = randn(experts, d_in, hidden, seed=seed + 2, scale=d_in**-0.5), randn(experts, hidden, seed=seed + 3)
    w2, b2 = randn(experts, hidden, d_out, seed=seed + 4, scale=max(hidden, 1) ** -0.5), randn(experts, d_out, seed=seed + 5)
    grad_out = randn(out_rows, d_out, seed=seed + 6)
    return dict(grad_out=grad_out, x=x, w1=w1, b1=b1, w2=w2, b2=b2, offsets=offsets, gather=gather, scatter=scatter)


def fused(p, activation=1, pre=None, compute_grad_x=True, bias=(True, True)):
    f = lambda t: t.float()  # noqa: E731
    if pre is None:
        pre = reference(p["grad_out"], p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["offsets"], p["gather"],
                        p["scatter"], activation)[0]
    return torch.ops.sm4.grouped_ffn_backward(f(p["grad_out"]), f(p["x"]), f(p["w1"]), f(p["w2"]), f(pre), p["offsets"],
                                              p["gather"], p["scatter"], activation, compute_grad_x, *bias)


CASES = {  # name -> (counts per expert, tokens, k, padding, indexed)
    "papers-like, E prime": ([7, 0, 12, 5, 9, 3, 6], 21, 2, 0, True),
    "k = E": ([5, 5, 5], 5, 3, 0, True),
    "all rows to one expert": ([0, 0, 30, 0], 15, 2, 0, True),
    "T = 1": ([0, 1, 1], 1, 2, 0, True),
    "T = 0": ([0, 0, 0], 0, 2, 0, True),
    "more rows than a tile (256)": ([300, 0, 214], 257, 2, 0, True),
    "unfused, padding rows": ([4, 0, 6, 3], None, None, 3, False),
    "unfused, E = 1": ([9], None, None, 0, False),
}


@pytest.mark.parametrize("activation", [1, 2], ids=["gelu", "gelu_tanh"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_autograd(case, activation):
    counts, tokens, k, padding, indexed = CASES[case]
    p = problem(counts, tokens, k, padding=padding, indexed=indexed)
    pre, truth = reference(p["grad_out"], p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["offsets"], p["gather"],
                           p["scatter"], activation)
    got = fused(p, activation, pre)
    for name, g, t in zip(["grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"], got, truth):
        assert g.dtype == torch.float32 and g.shape == t.shape, name
        torch.testing.assert_close(g.double(), t, **FP32, msg=f"{case} {name}")


def test_inactive_rows_in_the_fused_layout_contribute_nothing():
    # 40 assignments, the last 6 inactive (rows past expert_offsets[E]): their x rows get no gradient.
    p = problem([10, 0, 30], 20, 2)
    p["offsets"] = torch.tensor([0, 10, 10, 34])
    pre, truth = reference(p["grad_out"], p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["offsets"], p["gather"],
                           p["scatter"], 1)
    for g, t in zip(fused(p, 1, pre), truth):
        torch.testing.assert_close(g.double(), t, **FP32)


def test_h_zero_gives_zero_grad_x_with_a_gather_index():
    p = problem([6, 2, 4], 6, 2, hidden=0)
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = fused(p)
    assert grad_x.shape == (6, 13) and torch.equal(grad_x, torch.zeros_like(grad_x))
    assert grad_w1.shape == (3, 13, 0) and grad_b1.shape == (3, 0) and grad_w2.shape == (3, 0, 11)
    truth = reference(p["grad_out"], p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["offsets"], p["gather"],
                      p["scatter"], 1)[1]
    torch.testing.assert_close(grad_b2.double(), truth[4], **FP32)  # db2 = per-expert sums of dY


def test_optional_outputs_are_empty_when_not_asked_for():
    p = problem([5, 3], 4, 2)
    grad_x, _, grad_b1, _, grad_b2 = fused(p, compute_grad_x=False, bias=(False, False))
    assert grad_x.shape == (0, 13) and grad_b1.shape == (0, 24) and grad_b2.shape == (0, 11)


def test_non_contiguous_inputs():
    p = problem([7, 0, 12, 5, 9, 3, 6], 21, 2)
    pre, truth = reference(p["grad_out"], p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["offsets"], p["gather"],
                           p["scatter"], 1)
    strided = lambda t: t.float().t().contiguous().t()  # noqa: E731  (same values, transposed strides)
    wide = lambda t: torch.cat([t.float(), t.float()], -1)[..., : t.shape[-1]]  # noqa: E731
    got = torch.ops.sm4.grouped_ffn_backward(strided(p["grad_out"]), strided(p["x"]), wide(p["w1"]), wide(p["w2"]),
                                             strided(pre), p["offsets"], p["gather"][::1].clone()[:, None][:, 0],
                                             p["scatter"], 1, True, True, True)
    assert not strided(p["x"]).is_contiguous() and not wide(p["w1"]).is_contiguous()
    for g, t in zip(got, truth):
        torch.testing.assert_close(g.double(), t, **FP32)


def test_bitwise_repeatable_and_independent_of_the_thread_count():
    p = problem([300, 0, 213, 40, 1], 277, 2)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(p)
        torch.set_num_threads(2)
        two, again = fused(p), fused(p)
    finally:
        torch.set_num_threads(previous)
    for a, b, c in zip(one, two, again):
        assert torch.equal(b, c) and torch.equal(a, b)


def test_opcheck():
    p = problem([7, 0, 12, 5], 12, 2)
    pre = reference(p["grad_out"], p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["offsets"], p["gather"], p["scatter"],
                    1)[0]
    f = lambda t: t.float()  # noqa: E731
    args = (f(p["grad_out"]), f(p["x"]), f(p["w1"]), f(p["w2"]), f(pre), p["offsets"], p["gather"], p["scatter"], 1, True,
            True, True)
    torch.library.opcheck(torch.ops.sm4.grouped_ffn_backward, args)


# ---- the layers: which backward runs, and that both agree -----------------------------------------


def fused_calls(fn) -> int:
    """How many sm4::grouped_ffn_backward calls fn() makes (from the profiler's op events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name == OP)


def moe_ffn_grads(dtype=torch.float32, tokens=37, experts=5, k=2, d=12, h=20, backend="cpu", activation="gelu",
                  recompute_hidden=False):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()  # noqa: E731
    tensors = [mk(tokens, d), mk(d, experts, scale=d**-0.5), mk(experts, d, h, scale=d**-0.5), mk(experts, h),
               mk(experts, h, d, scale=h**-0.5), mk(experts, d)]
    out = ops.moe_ffn(*tensors, k, backend=backend, activation=activation, recompute_hidden=recompute_hidden).output
    out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype))
    return [t.grad for t in tensors]


@pytest.mark.parametrize("recompute_hidden", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_moe_ffn_takes_the_fused_backward_by_default_and_matches_reference(activation, recompute_hidden):
    skip_unless_runs("cpu")
    assert sm4.grouped.FUSED_FFN_BACKWARD
    kw = dict(activation=activation, recompute_hidden=recompute_hidden)
    grads = []
    assert fused_calls(lambda: grads.append(moe_ffn_grads(**kw))) == 1
    truth = moe_ffn_grads(torch.float64, backend="reference", **kw)
    for got, t in zip(grads[0], truth):
        torch.testing.assert_close(got.double(), t, atol=3e-5, rtol=3e-5)


def test_switched_off_takes_the_layered_backward_with_the_same_gradients(monkeypatch):
    skip_unless_runs("cpu")
    on = moe_ffn_grads()
    monkeypatch.setattr(sm4.grouped, "FUSED_FFN_BACKWARD", False)
    grads = []
    assert fused_calls(lambda: grads.append(moe_ffn_grads())) == 0
    for a, b in zip(on, grads[0]):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_take_the_layered_backward(monkeypatch, dtype):
    skip_unless_runs("cpu")
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", "native")  # bf16 kernels, not the fp32 upcast
    assert fused_calls(lambda: moe_ffn_grads(dtype)) == 0


def test_bf16_upcast_to_fp32_takes_the_fused_backward(monkeypatch):
    skip_unless_runs("cpu")
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", "fp32")  # sm4/compute_dtype.py
    assert fused_calls(lambda: moe_ffn_grads(torch.bfloat16)) == 1


def test_a_device_without_the_kernel_takes_the_layered_backward(monkeypatch):
    skip_unless_runs("cpu")
    from sm4.compiled import grouped_gemm

    meta = [torch.empty(s, device="meta") for s in [(8, 3), (4, 3), (2, 3, 5), (2, 5, 3), (8, 5)]]
    assert grouped_gemm.ffn_backward(meta[0], meta[1], meta[2], meta[3], meta[4], torch.tensor([0, 4, 8]), None, None,
                                     1, True, True, True) is None
    monkeypatch.setattr(_extension, "has_kernel", lambda op, key: op != "grouped_ffn_backward")
    grads = []
    assert fused_calls(lambda: grads.append(moe_ffn_grads())) == 0
    monkeypatch.undo()
    for a, b in zip(moe_ffn_grads(), grads[0]):
        torch.testing.assert_close(a, b, **FP32)


def test_the_emulated_cuda_backend_takes_the_layered_backward():
    """On a GPU the op has no kernel, so the CUDA FFN backward is grouped_mm + grouped_weight_grad;
    the emulation runs those CUDA kernels on CPU tensors and must not fall into the CPU fused op."""
    from . import cuda_emulation

    if not cuda_emulation.enabled():
        pytest.skip(f"the CUDA emulation is switched off ({cuda_emulation.ENV_SWITCH}=0)")
    with cuda_emulation.emulated_cuda_backend():
        grads = []
        assert fused_calls(lambda: grads.append(moe_ffn_grads(backend="cuda", tokens=9, experts=3))) == 0
    assert sm4.grouped.FUSED_FFN_BACKWARD  # restored on leaving the block
    for a, b in zip(moe_ffn_grads(tokens=9, experts=3), grads[0]):
        torch.testing.assert_close(a, b, **FP32)


def test_grouped_ffn_unfused_layer_takes_it_too():
    skip_unless_runs("cpu")
    g = torch.Generator().manual_seed(5)
    counts = [6, 0, 9, 4]
    offsets = torch.tensor([0, 6, 6, 15, 19])
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    leaves64 = [mk(21, 7), mk(4, 7, 10), mk(4, 10), mk(4, 10, 7), mk(4, 7)]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    grad = torch.randn(21, 7, generator=g, dtype=torch.float64)
    assert sum(counts) == 19
    assert fused_calls(lambda: ops.grouped_ffn(*leaves32, offsets, backend="cpu").backward(grad.float())) == 1
    ops.grouped_ffn(*leaves64, offsets, backend="reference").backward(grad)
    for a, b in zip(leaves32, leaves64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=3e-5, rtol=3e-5)


def test_double_backward_is_refused():
    skip_unless_runs("cpu")
    x = torch.randn(9, 6, requires_grad=True)
    w1, w2 = torch.randn(3, 6, 8, requires_grad=True), torch.randn(3, 8, 6, requires_grad=True)
    out = ops.moe_ffn(x, torch.randn(6, 3), w1, torch.zeros(3, 8), w2, torch.zeros(3, 6), 2, backend="cpu").output
    with pytest.raises(DoubleBackwardNotSupportedError):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
