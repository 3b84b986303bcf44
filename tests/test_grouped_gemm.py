"""Grouped expert GEMMs on every kernel backend against the float64 reference.

Three layers of checks:
  * the two primitives (grouped_mm, grouped_weight_grad) against sm4.reference's, flag by flag;
  * the public ops (grouped_linear, grouped_ffn, expert_linear, expert_ffn): outputs and every
    gradient, in each dtype; low precision must err at most twice as much as plain PyTorch in the
    same dtype (a per-expert loop of F.linear), fp32 within the fp32 tolerance;
  * the paths against each other: fused (gather/scatter in the GEMM), unfused, fused Q/K/V.
"""

import pytest
import torch
import torch.nn.functional as F

from sm4 import ops, reference
from sm4.types import RoutingMetadata

from .helpers import FLOAT_DTYPES, TOLERANCES, kernel_device, skip_unless_runs

BACKENDS = ["cpu", "triton", "cuda"]


def primitives(backend):
    """The backend's (grouped_mm, grouped_weight_grad), or skip."""
    skip_unless_runs(backend, "grouped_linear")
    if backend == "triton":
        from sm4.kernels import grouped_gemm as module
    else:
        from sm4.compiled import grouped_gemm as module
    return module.grouped_mm, module.grouped_weight_grad


# ---- inputs -----------------------------------------------------------------------------------

# name -> (expert_offsets, number of sorted rows M): empty experts, padding rows, extremes.
OFFSET_CASES = {
    "empty experts and padding rows": (torch.tensor([0, 0, 4, 4, 9, 11, 11, 12]), 15),
    "one expert owns every row": (torch.tensor([0, 0, 0, 0, 21, 21]), 21),
    "E = 1": (torch.tensor([0, 10]), 10),
    "M = 1": (torch.tensor([0, 0, 1, 1]), 1),
    "M = 0": (torch.tensor([0, 0, 0]), 0),
    "more rows than one tile, E prime": (torch.tensor([0, 40, 41, 75, 75, 130]), 133),
}


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def moe_case(tokens=29, dim=13, experts=5, k=2, seed=0, token_k=None, ids=None):
    """Routing of a small MoE problem from the reference (so every backend sees the same)."""
    x, router = randn(tokens, dim, seed=seed), randn(dim, experts, seed=seed + 1)
    routing = ops.topk_gating(x, router, k, token_k=token_k, backend="reference")
    if ids is not None:  # force a routing (e.g. everything to one expert), keeping the gates
        routing = routing._replace(expert_ids=ids)
    metadata = ops.routing_metadata(routing.expert_ids, experts, backend="reference")
    return x, routing.gates, metadata


def to_device(tensors, device):
    return [None if t is None else t.to(device) for t in tensors]


def metadata_to(metadata, device):
    return RoutingMetadata(*(t.to(device) for t in metadata))


# ---- the primitives ------------------------------------------------------------------------------

FLAG_SETS = {
    "plain": dict(),
    "bias, gelu, saved pre-activation": dict(bias=True, activation=1, save_preact=True),
    "gather, scatter, scale, gelu_tanh": dict(gather=True, scatter=True, scale=True, bias=True, activation=2),
    "transposed weight, gather": dict(transpose=True, gather=True),
    "scatter only, saved pre-activation": dict(scatter=True, activation=1, save_preact=True),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("flags", list(FLAG_SETS))
@pytest.mark.parametrize("case", list(OFFSET_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_primitive(backend, case, flags, dtype):
    grouped_mm, _ = primitives(backend)
    f = FLAG_SETS[flags]
    offsets, rows = OFFSET_CASES[case]
    experts, k_in, n_out = offsets.numel() - 1, 13, 7  # odd sizes: no block divides them
    g = torch.Generator().manual_seed(4)
    # With a gather index, a has other rows than the sorted order; with a scatter index, so has out.
    source_rows = rows + 3 if f.get("gather") else rows
    out_rows = rows + 5 if f.get("scatter") else rows
    a = randn(source_rows, k_in, seed=1, dtype=dtype)
    weight = randn(experts, *((n_out, k_in) if f.get("transpose") else (k_in, n_out)), seed=2, dtype=dtype) / 3
    bias = randn(experts, n_out, seed=3, dtype=dtype) if f.get("bias") else None
    gather = torch.randint(0, source_rows, (rows,), generator=g) if f.get("gather") else None
    scatter = torch.randperm(out_rows, generator=g)[:rows] if f.get("scatter") else None
    scale = torch.rand(rows, generator=g) if f.get("scale") else None
    kwargs = dict(gather_index=gather, scatter_index=scatter, scatter_scale=scale, num_out_rows=out_rows,
                  transpose_weight=bool(f.get("transpose")), activation=f.get("activation", 0),
                  save_preact=bool(f.get("save_preact")))
    want_out, want_pre = reference.grouped_mm(a.double(), weight.double(), None if bias is None else bias.double(),
                                              offsets, **kwargs)
    device = kernel_device(backend)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    dev_kwargs = {name: dev(v) if isinstance(v, torch.Tensor) else v for name, v in kwargs.items()}
    out, pre = grouped_mm(dev(a), dev(weight), dev(bias), dev(offsets), **dev_kwargs)
    assert out.dtype == dtype and out.shape == want_out.shape
    torch.testing.assert_close(out.cpu().double(), want_out, **TOLERANCES[dtype])
    assert pre.shape == want_pre.shape
    torch.testing.assert_close(pre.cpu().double(), want_pre, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("indexed", [False, True], ids=["direct", "through indices"])
@pytest.mark.parametrize("case", list(OFFSET_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_weight_grad_primitive(backend, case, indexed, dtype):
    _, weight_grad = primitives(backend)
    offsets, rows = OFFSET_CASES[case]
    a = randn(rows + 4, 11, seed=5, dtype=dtype)
    grad = randn(rows + 6, 9, seed=6, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    a_index = torch.randint(0, rows + 4, (rows,), generator=g) if indexed else None
    grad_index = torch.randperm(rows + 6, generator=g)[:rows] if indexed else None
    if not indexed:
        a, grad = a[:rows], grad[:rows]
    want_w, want_b = reference.grouped_weight_grad(a.double(), grad.double(), offsets, a_index, grad_index)
    device = kernel_device(backend)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    got_w, got_b = weight_grad(dev(a), dev(grad), dev(offsets), dev(a_index), dev(grad_index), True)
    # A sum over up to 130 rows: the tolerance grows with sqrt(rows) for rounded inputs.
    tol = {name: value * max(1.0, rows**0.5 / 3) for name, value in TOLERANCES[dtype].items()}
    torch.testing.assert_close(got_w.cpu().double(), want_w, **tol)
    torch.testing.assert_close(got_b.cpu().double(), want_b, **tol)
    _, no_bias = weight_grad(dev(a), dev(grad), dev(offsets), dev(a_index), dev(grad_index), False)
    assert no_bias.shape == (0, 9)


# ---- the public ops: outputs and every gradient --------------------------------------------------


def plain_pytorch_ffn(x, w1, b1, w2, b2, offsets, activation="gelu"):
    """What a user writes without sm4: a per-expert loop of F.linear, in the inputs' dtype."""
    bounds = offsets.tolist()
    pieces = []
    for e in range(w1.shape[0]):
        rows = x[bounds[e] : bounds[e + 1]]
        h = F.gelu(F.linear(rows, w1[e].t(), b1[e]), approximate="tanh" if activation == "gelu_tanh" else "none")
        pieces.append(F.linear(h, w2[e].t(), b2[e]))
    pieces.append(x.new_zeros(x.shape[0] - bounds[-1], w2.shape[2]))
    return torch.cat(pieces)


def plain_pytorch_linear(x, weight, bias, offsets):
    bounds = offsets.tolist()
    pieces = [F.linear(x[bounds[e] : bounds[e + 1]], weight[e].t(), bias[e]) for e in range(weight.shape[0])]
    pieces.append(x.new_zeros(x.shape[0] - bounds[-1], weight.shape[2]))
    return torch.cat(pieces)


def run_with_grads(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of (out * grad_out).sum() for every input that is a tensor."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.to(out.dtype))
    return out, grads


def errors(results, truth):
    """Max abs error of each tensor of results against truth (float64)."""
    (out, grads), (true_out, true_grads) = results, truth
    return [(a.cpu().double() - b).abs().max().item() if a.numel() else 0.0 for a, b in zip([out, *grads], [true_out, *true_grads])]


def check_against_reference(kernel, truth, plain, dtype, names):
    kernel_errors = errors(kernel, truth)
    if dtype == torch.float32:
        for name, (a, b) in zip(names, zip([kernel[0], *kernel[1]], [truth[0], *truth[1]])):
            torch.testing.assert_close(a.cpu().double(), b, **TOLERANCES[dtype], msg=lambda m: f"{name}: {m}")
        return
    plain_errors = errors(plain, truth)
    for name, mine, theirs, value in zip(names, kernel_errors, plain_errors, [truth[0], *truth[1]]):
        floor = 1e-3 * max(value.abs().max().item() if value.numel() else 0.0, 1.0)  # where plain PyTorch is exact
        assert mine <= 2 * theirs + floor, f"{name}: error {mine:.3g} > 2 x plain PyTorch's {theirs:.3g}"


LAYER_CASES = ["empty experts and padding rows", "one expert owns every row", "E = 1", "M = 1", "more rows than one tile, E prime"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_linear_and_gradients(backend, case, dtype):
    skip_unless_runs(backend, "grouped_linear")
    offsets, rows = OFFSET_CASES[case]
    experts = offsets.numel() - 1
    inputs = [randn(rows, 13, seed=1, dtype=dtype), randn(experts, 13, 7, seed=2, dtype=dtype) / 3,
              randn(experts, 7, seed=3, dtype=dtype)]
    grad_out = randn(rows, 7, seed=4)
    device = kernel_device(backend)
    truth = run_with_grads(lambda x, w, b: ops.grouped_linear(x, w, b, offsets, backend="reference"),
                           [t.double() for t in inputs], grad_out)
    kernel = run_with_grads(lambda x, w, b: ops.grouped_linear(x, w, b, offsets.to(device), backend=backend),
                            to_device(inputs, device), grad_out.to(device))
    plain = run_with_grads(lambda x, w, b: plain_pytorch_linear(x, w, b, offsets), inputs, grad_out)
    check_against_reference(kernel, truth, plain, dtype, ["y", "dx", "dW", "db"])


@pytest.mark.parametrize("recompute_hidden", [False, True], ids=["saved hidden", "recomputed hidden"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_ffn_and_gradients(backend, case, dtype, activation, recompute_hidden):
    skip_unless_runs(backend, "grouped_ffn")
    offsets, rows = OFFSET_CASES[case]
    experts, d, h = offsets.numel() - 1, 13, 17
    inputs = [randn(rows, d, seed=1, dtype=dtype), randn(experts, d, h, seed=2, dtype=dtype) / 3,
              randn(experts, h, seed=3, dtype=dtype), randn(experts, h, d, seed=4, dtype=dtype) / 4,
              randn(experts, d, seed=5, dtype=dtype)]
    grad_out = randn(rows, d, seed=6)
    device = kernel_device(backend)
    truth = run_with_grads(lambda *t: ops.grouped_ffn(*t, offsets, activation, backend="reference"),
                           [t.double() for t in inputs], grad_out)
    kernel = run_with_grads(
        lambda *t: ops.grouped_ffn(*t, offsets.to(device), activation, recompute_hidden=recompute_hidden, backend=backend),
        to_device(inputs, device), grad_out.to(device))
    plain = run_with_grads(lambda *t: plain_pytorch_ffn(*t, offsets, activation), inputs, grad_out)
    check_against_reference(kernel, truth, plain, dtype, ["y", "dx", "dW1", "db1", "dW2", "db2"])


MOE_CASES = {
    "random, k = 2": dict(),
    "per-token k (inactive ranks)": dict(k=3, token_k=torch.randint(1, 4, (29,), generator=torch.Generator().manual_seed(9))),
    "k = E": dict(k=5),
    "k = E = 11 (the combine's large-k form)": dict(experts=11, k=11),
    "everything to one expert": dict(k=1, ids=torch.full((29, 1), 3)),
    "T = 1": dict(tokens=1),
    "T = 0": dict(tokens=0),
    "E = 1": dict(experts=1, k=1),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MOE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_linear_fused_and_gradients(backend, case, dtype):
    skip_unless_runs(backend, "expert_linear")
    x, gates, meta = moe_case(**MOE_CASES[case])
    experts = meta.expert_counts.numel()
    inputs = [x.to(dtype), randn(experts, 13, 7, seed=2, dtype=dtype) / 3, randn(experts, 7, seed=3, dtype=dtype), gates.float()]
    grad_out = randn(x.shape[0], 7, seed=4)
    device = kernel_device(backend)
    dmeta = metadata_to(meta, device)
    truth = run_with_grads(lambda x, w, b, g: ops.expert_linear(x, w, b, g, meta, backend="reference"),
                           [t.double() for t in inputs], grad_out)
    kernel = run_with_grads(lambda x, w, b, g: ops.expert_linear(x, w, b, g, dmeta, backend=backend),
                            to_device(inputs, device), grad_out.to(device))
    # plain PyTorch: the unfused steps in the dtype (permute, per-expert loop, weighted sum)
    def plain_fn(x, w, b, g):
        y_sorted = plain_pytorch_linear(ops.permute(x, meta, backend="reference"), w, b, meta.expert_offsets)
        return ops.unpermute(y_sorted, g.to(x.dtype), meta, backend="reference")

    plain = run_with_grads(plain_fn, inputs, grad_out)
    check_against_reference(kernel, truth, plain, dtype, ["y", "dx", "dW", "db", "dgates"])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(MOE_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_fused_and_gradients(backend, case, dtype):
    skip_unless_runs(backend, "expert_ffn")
    x, gates, meta = moe_case(**MOE_CASES[case])
    experts, d, h = meta.expert_counts.numel(), 13, 17
    inputs = [x.to(dtype), randn(experts, d, h, seed=2, dtype=dtype) / 3, randn(experts, h, seed=3, dtype=dtype),
              randn(experts, h, d, seed=4, dtype=dtype) / 4, randn(experts, d, seed=5, dtype=dtype), gates.float()]
    grad_out = randn(x.shape[0], d, seed=6)
    device = kernel_device(backend)
    dmeta = metadata_to(meta, device)
    truth = run_with_grads(lambda *t: ops.expert_ffn(*t, meta, backend="reference"), [t.double() for t in inputs], grad_out)
    kernel = run_with_grads(lambda *t: ops.expert_ffn(*t, dmeta, backend=backend), to_device(inputs, device),
                            grad_out.to(device))

    def plain_fn(x, w1, b1, w2, b2, g):
        y_sorted = plain_pytorch_ffn(ops.permute(x, meta, backend="reference"), w1, b1, w2, b2, meta.expert_offsets)
        return ops.unpermute(y_sorted, g.to(x.dtype), meta, backend="reference")

    plain = run_with_grads(plain_fn, inputs, grad_out)
    check_against_reference(kernel, truth, plain, dtype, ["y", "dx", "dW1", "db1", "dW2", "db2", "dgates"])


# ---- the paths against each other ----------------------------------------------------------------


def moe_inputs(seed=0, tokens=31, d=12, h=20, experts=5, dtype=torch.float32):
    return dict(
        x=randn(tokens, d, seed=seed, dtype=dtype), router_weight=randn(d, experts, seed=seed + 1, dtype=dtype),
        w1=randn(experts, d, h, seed=seed + 2, dtype=dtype) / 3, b1=randn(experts, h, seed=seed + 3, dtype=dtype),
        w2=randn(experts, h, d, seed=seed + 4, dtype=dtype) / 4, b2=randn(experts, d, seed=seed + 5, dtype=dtype),
    )


def grads_of(fn, tensors):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    out = fn(**leaves)
    out.square().sum().backward()
    return out.detach(), {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_and_unfused_moe_ffn_agree(backend):
    skip_unless_runs(backend, "expert_ffn")
    device = kernel_device(backend)
    inputs = {name: t.to(device) for name, t in moe_inputs().items()}
    results = [
        grads_of(lambda **t: ops.moe_ffn(k=2, fused=fused, backend=backend, **t).output, inputs) for fused in (True, False)
    ]
    (out_fused, grads_fused), (out_unfused, grads_unfused) = results
    torch.testing.assert_close(out_fused, out_unfused, **TOLERANCES[torch.float32])
    for name in grads_fused:
        torch.testing.assert_close(grads_fused[name], grads_unfused[name], **TOLERANCES[torch.float32], msg=name)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_fused_qkv_equals_three_moe_linears(backend):
    if backend != "reference":
        skip_unless_runs(backend, "expert_linear")
    device = "cpu" if backend == "reference" else kernel_device(backend)
    tokens, d, c, experts, k = 23, 12, 8, 5, 2
    inputs = {"x": randn(tokens, d, seed=0), "weights": randn(3, experts, d, c, seed=1) / 3,
              "biases": randn(3, experts, c, seed=2), "rq": randn(d, experts, seed=3), "rk": randn(d, experts, seed=4),
              "rv": randn(d, experts, seed=5)}
    inputs = {name: t.float().to(device) for name, t in inputs.items()}

    def fused(x, weights, biases, rq, rk, rv):
        return ops.moe_qkv(x, (rq, rk, rv), weights, biases, k, backend=backend)[0]

    def separate(x, weights, biases, rq, rk, rv):
        return torch.stack([ops.moe_linear(x, r, weights[g], biases[g], k, backend=backend).output
                            for g, r in enumerate((rq, rk, rv))], 1)

    (out_f, grads_f), (out_s, grads_s) = grads_of(fused, inputs), grads_of(separate, inputs)
    assert out_f.shape == (tokens, 3, c)
    torch.testing.assert_close(out_f, out_s, **TOLERANCES[torch.float32])
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_s[name], **TOLERANCES[torch.float32], msg=name)
    unfused = ops.moe_qkv(inputs["x"], (inputs["rq"], inputs["rk"], inputs["rv"]), inputs["weights"], inputs["biases"], k,
                          fused=False, backend=backend)[0]
    torch.testing.assert_close(unfused, out_f.detach(), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weights(backend):
    skip_unless_runs(backend, "expert_linear")
    device = kernel_device(backend)
    x, gates, meta = moe_case()
    stored = randn(5, 7, 13, seed=2).float().to(device)  # (E, out, in): its transpose is a view
    weight = stored.transpose(1, 2)
    assert not weight.is_contiguous()
    got = ops.expert_linear(x.float().to(device), weight, None, gates.float().to(device), metadata_to(meta, device), backend=backend)
    want = ops.expert_linear(x.float(), weight.contiguous().cpu(), None, gates.float(), meta, backend="reference")
    torch.testing.assert_close(got.cpu(), want, **TOLERANCES[torch.float32])


# ---- fp64 gradcheck of the CPU kernels, opcheck, torch.compile ----------------------------------------


def test_gradcheck_cpu_kernels():
    skip_unless_runs("cpu", "expert_ffn")
    x, gates, meta = moe_case(tokens=6, dim=3, experts=3, k=2)
    d, h = 3, 4
    params = [randn(3, d, h, seed=2), randn(3, h, seed=3), randn(3, h, d, seed=4), randn(3, d, seed=5)]
    leaves = [t.clone().requires_grad_(True) for t in (x, *params, gates)]
    assert torch.autograd.gradcheck(lambda *t: ops.expert_ffn(*t, meta, backend="cpu"), leaves)
    assert torch.autograd.gradcheck(lambda *t: ops.expert_ffn(*t, meta, "gelu_tanh", recompute_hidden=True, backend="cpu"),
                                    leaves)
    lin = [leaves[0], leaves[1], leaves[2], leaves[-1]]
    assert torch.autograd.gradcheck(lambda x, w, b, g: ops.expert_linear(x, w, b, g, meta, backend="cpu"), lin)
    offsets = torch.tensor([0, 2, 2, 5])
    rows = randn(6, d, seed=7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda r, w, b: ops.grouped_linear(r, w, b, offsets, backend="cpu"), [rows, *lin[1:3]])
    assert torch.autograd.gradcheck(lambda r, *p: ops.grouped_ffn(r, *p, offsets, backend="cpu"), [rows, *leaves[1:5]])


def test_opcheck_compiled_primitives():
    skip_unless_runs("cpu", "grouped_linear")
    offsets = torch.tensor([0, 3, 3, 7])
    a, weight, bias = randn(9, 5, seed=1).float(), randn(3, 5, 4, seed=2).float(), randn(3, 4, seed=3).float()
    gather, scatter, scale = torch.tensor([8, 0, 1, 2, 3, 4, 5, 6]), torch.randperm(10)[:8], torch.rand(8)
    for args in [
        (a, weight, bias, offsets, None, None, None, 9, False, 1, True),
        (a, weight, None, offsets, gather, scatter, scale, 10, False, 2, False),
        (a, weight.transpose(1, 2).contiguous(), None, offsets, gather, None, None, 8, True, 0, False),
    ]:
        torch.library.opcheck(torch.ops.sm4.grouped_mm.default, args)
    torch.library.opcheck(torch.ops.sm4.grouped_weight_grad.default, (a, randn(10, 4, seed=4).float(), offsets, gather, scatter, True))


def test_moe_ffn_compiles_fullgraph_on_cpu():
    skip_unless_runs("cpu", "expert_ffn")
    inputs = moe_inputs(tokens=16)

    def step(**t):
        return ops.moe_ffn(k=2, backend="cpu", **t).output

    eager_out, eager_grads = grads_of(step, inputs)
    compiled_out, compiled_grads = grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"), inputs)
    torch.testing.assert_close(compiled_out, eager_out)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], msg=name)


# ---- bad input -----------------------------------------------------------------------------------


def test_expert_ops_reject_mismatched_inputs():
    x, gates, meta = moe_case()
    weight = randn(5, 13, 7, seed=2)
    with pytest.raises(ValueError, match="gates"):
        ops.expert_linear(x, weight, None, gates[:, :1], meta)
    with pytest.raises(ValueError, match="gives E = 4"):
        ops.expert_linear(x, randn(4, 13, 7, seed=2), None, gates, meta)
    with pytest.raises(TypeError, match="recompute_hidden"):
        ops.grouped_ffn(x, randn(5, 13, 3, seed=1), None, randn(5, 3, 13, seed=1), None, meta.expert_offsets,
                        recompute_hidden=1)
    with pytest.raises(ValueError, match="weights"):
        ops.moe_qkv(x, (randn(13, 5, seed=3),) * 3, randn(2, 5, 13, 7, seed=3), None, 2)


def test_cpu_kernel_rejects_bad_offsets():
    # A direct call bypasses sm4.ops' checks: the kernel's own are ValueErrors, as sm4.ops' are.
    skip_unless_runs("cpu", "grouped_linear")
    a, weight = torch.randn(6, 3), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="expert_offsets"):
        torch.ops.sm4.grouped_mm(a, weight, None, torch.tensor([0, 5, 9]), None, None, None, 6, False, 0, False)
    with pytest.raises(ValueError, match="non-decreasing"):
        torch.ops.sm4.grouped_mm(a, weight, None, torch.tensor([0, 5, 3]), None, None, None, 6, False, 0, False)
    for bad_index, seen in (([0, 1, 2, 9], "flat entry 3 is 9"), ([0, -1, 2, 3], "flat entry 1 is -1")):
        with pytest.raises(ValueError, match=rf"gather_index values must lie in \[0, 6\), but {seen}"):
            torch.ops.sm4.grouped_mm(a, weight, None, torch.tensor([0, 2, 4]), torch.tensor(bad_index), None, None, 4,
                                     False, 0, False)


def test_cpu_kernels_are_not_recast_by_autocast():
    # Under torch.autocast the kernels' own at::mm calls must stay in the inputs' dtype.
    skip_unless_runs("cpu", "expert_ffn")
    inputs = {name: t.float() for name, t in moe_inputs().items()}
    want = ops.moe_ffn(k=2, backend="cpu", **inputs).output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.moe_ffn(k=2, backend="cpu", **inputs).output
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_opcheck_triton_primitives():
    skip_unless_runs("triton", "grouped_linear")
    from sm4.kernels import grouped_gemm as triton_gg

    device = kernel_device("triton")
    offsets = torch.tensor([0, 3, 3, 7], device=device)
    a, weight, bias = (randn(9, 5, seed=1).float().to(device), randn(3, 5, 4, seed=2).float().to(device),
                       randn(3, 4, seed=3).float().to(device))
    gather = torch.tensor([8, 0, 1, 2, 3, 4, 5, 6], device=device)
    scatter, scale = torch.randperm(10)[:8].to(device), torch.rand(8).to(device)
    torch.library.opcheck(triton_gg.grouped_mm_op, (a, weight, bias, offsets, None, None, None, 9, False, 1, True))
    torch.library.opcheck(triton_gg.grouped_mm_op, (a, weight, None, offsets, gather, scatter, scale, 10, False, 2, False))
    torch.library.opcheck(triton_gg.grouped_weight_grad_op,
                          (a, randn(10, 4, seed=4).float().to(device), offsets, gather, scatter, True))
