"""Routing metadata, permute and unpermute on every kernel backend against the reference.

Metadata must equal the reference exactly (it is integer bookkeeping); permute is a copy, so it is
exact in every dtype; unpermute and the gradients are compared with the dtype's tolerance against
the float64 reference on the same (rounded) inputs.
"""

import pytest
import torch

from sm4 import ops

from .helpers import FLOAT_DTYPES, TOLERANCES, kernel_device, skip_unless_runs

BACKENDS = ["cpu", "triton", "cuda"]




def ids_case(name):
    g = torch.Generator().manual_seed(0)
    cases = {
        "random with inactive ranks": (torch.randint(-1, 7, (53, 3), generator=g), 7),
        "every token to one expert, others empty": (torch.full((19, 1), 4), 11),
        "T = 0": (torch.zeros(0, 2, dtype=torch.long), 3),
        "T = 1": (torch.tensor([[2, 0]]), 3),
        "E = 1": (torch.zeros(9, 1, dtype=torch.long), 1),
        "k = E": (torch.stack([torch.randperm(5, generator=g) for _ in range(12)]), 5),
        "E prime, int32 ids": (torch.randint(0, 13, (40, 2), generator=g).int(), 13),
        "several sort blocks": (torch.randint(-1, 64, (9000, 2), generator=g), 64),
    }
    return cases[name]


CASES = ["random with inactive ranks", "every token to one expert, others empty", "T = 0", "T = 1", "E = 1", "k = E",
         "E prime, int32 ids", "several sort blocks"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_equals_reference(backend, case):
    skip_unless_runs(backend, "routing_metadata")
    ids, experts = ids_case(case)
    got = ops.routing_metadata(ids.to(kernel_device(backend)), experts, backend=backend)
    want = ops.routing_metadata(ids, experts, backend="reference")
    for field, a, b in zip(want._fields, got, want):
        assert a.dtype == torch.int64, field
        assert torch.equal(a.cpu(), b), f"{case}: {field}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_with_per_token_k(backend):
    skip_unless_runs(backend, "routing_metadata")
    ids = torch.randint(0, 6, (30, 3), generator=torch.Generator().manual_seed(1))
    token_k = torch.randint(1, 4, (30,), generator=torch.Generator().manual_seed(2))
    got = ops.routing_metadata(ids.to(kernel_device(backend)), 6, token_k=token_k.to(kernel_device(backend)), backend=backend)
    want = ops.routing_metadata(ids, 6, token_k=token_k, backend="reference")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    assert int(got.expert_offsets[-1]) == int(token_k.sum())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", ["random with inactive ranks", "every token to one expert, others empty", "T = 1", "k = E"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_unpermute_forward_and_backward(backend, case, dtype):
    for op in ("permute", "unpermute"):
        skip_unless_runs(backend, op)
    ids, experts = ids_case(case)
    tokens, k = ids.shape
    dim = 37  # not a multiple of any block size
    g = torch.Generator().manual_seed(3)
    x = torch.randn(tokens, dim, generator=g).to(dtype)
    gates = torch.rand(tokens, k, generator=g)
    y_sorted = torch.randn(tokens * k, dim, generator=g).to(dtype)
    meta = ops.routing_metadata(ids, experts, backend="reference")
    device = kernel_device(backend)
    dmeta = type(meta)(*(t.to(device) for t in meta))

    xk = x.to(device, copy=True).requires_grad_(True)
    x_sorted = ops.permute(xk, dmeta, backend=backend)
    ref_x = x.detach().double().requires_grad_(True)
    ref_sorted = ops.permute(ref_x, meta, backend="reference")
    assert x_sorted.dtype == dtype and torch.equal(x_sorted.cpu().double(), ref_sorted)  # a copy: exact
    grad_sorted = torch.randn(tokens * k, dim, generator=g)
    x_sorted.backward(grad_sorted.to(device, dtype))
    ref_sorted.backward(grad_sorted.to(dtype).double())
    torch.testing.assert_close(xk.grad.cpu().double(), ref_x.grad, **TOLERANCES[dtype])

    yk, gk = y_sorted.to(device, copy=True).requires_grad_(True), gates.to(device, copy=True).requires_grad_(True)
    y = ops.unpermute(yk, gk, dmeta, backend=backend)
    ref_y_sorted, ref_gates = y_sorted.detach().double().requires_grad_(True), gates.detach().double().requires_grad_(True)
    ref = ops.unpermute(ref_y_sorted, ref_gates, meta, backend="reference")
    assert y.dtype == dtype
    torch.testing.assert_close(y.cpu().double(), ref, **TOLERANCES[dtype])
    grad_y = torch.randn(tokens, dim, generator=g)
    y.backward(grad_y.to(device, dtype))
    ref.backward(grad_y.to(dtype).double())
    torch.testing.assert_close(yk.grad.cpu().double(), ref_y_sorted.grad, **TOLERANCES[dtype])
    torch.testing.assert_close(gk.grad.cpu().double(), ref_gates.grad, **TOLERANCES[dtype])


def test_cpu_gradcheck_float64():
    skip_unless_runs("cpu", "permute")
    ids = torch.tensor([[0, 2], [2, -1], [1, 0], [-1, -1], [2, 1]])
    meta = ops.routing_metadata(ids, 3, backend="cpu")
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y_sorted = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.permute(x, meta, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda y, g: ops.unpermute(y, g, meta, backend="cpu"), (y_sorted, gates))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_stays_in_its_token_and_non_contiguous_inputs(backend):
    skip_unless_runs(backend, "unpermute")
    ids = torch.tensor([[0, 1], [1, -1], [0, 2]])
    meta = ops.routing_metadata(ids, 3, backend="reference")
    device = kernel_device(backend)
    dmeta = type(meta)(*(t.to(device) for t in meta))
    y_sorted = torch.randn(6, 8)[:, ::2]  # non-contiguous (6, 4)
    assert not y_sorted.is_contiguous()
    gates = torch.rand(3, 2)
    y_sorted[meta.assignment_row[0, 0]] = float("nan")  # a NaN row of token 0
    out = ops.unpermute(y_sorted.to(device), gates.to(device), dmeta, backend=backend).cpu()
    assert torch.isnan(out[0]).all()
    ref = ops.unpermute(y_sorted, gates, meta, backend="reference")
    torch.testing.assert_close(out[1:], ref[1:])


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_opcheck_and_compile(backend):
    skip_unless_runs(backend, "permute")
    device = kernel_device(backend)
    prefix = "triton_" if backend == "triton" else ""
    ids = torch.tensor([[0, 2], [2, -1], [1, 0], [1, 1]], device=device)
    meta = ops.routing_metadata(ids, 3, backend=backend)
    x = torch.randn(4, 5, device=device)
    y_sorted = torch.randn(8, 5, device=device)
    gates = torch.rand(4, 2, device=device)
    # The Triton unpermute also takes the offsets (its backward zeroes the padding rows with them).
    extra = (meta.expert_offsets,) if backend == "triton" else ()
    torch.library.opcheck(getattr(torch.ops.sm4, prefix + "routing_metadata").default, (ids, 3))
    for args in [(x, meta.assignment_row, meta.expert_offsets), (x.requires_grad_(True), meta.assignment_row, meta.expert_offsets)]:
        torch.library.opcheck(getattr(torch.ops.sm4, prefix + "permute").default, args)
    for args in [(y_sorted, gates, meta.assignment_row, *extra),
                 (y_sorted.requires_grad_(True), gates.requires_grad_(True), meta.assignment_row, *extra)]:
        torch.library.opcheck(getattr(torch.ops.sm4, prefix + "unpermute").default, args)

    @torch.compile(fullgraph=True)
    def round_trip(x, gates, ids):
        m = ops.routing_metadata(ids, 3, backend=backend)
        return ops.unpermute(ops.permute(x, m, backend=backend) * 2, gates, m, backend=backend)

    expected = ops.unpermute(ops.permute(x, meta, backend="reference") * 2, gates, meta, backend="reference")
    torch.testing.assert_close(round_trip(x, gates, ids), expected)
    (grad,) = torch.autograd.grad(round_trip(x, gates, ids).sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def _available_gib():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


@pytest.mark.skipif(_available_gib() < 14, reason="needs ~10 GiB of free memory for > 2^31-element tensors")
def test_cpu_offsets_past_two_to_the_31():
    """Rows whose element offset row * d exceeds 2^31 (the int32 overflow MoE kernels have shipped):
    T = 1025 tokens, k = 2, d = 2^20, fp16, so rows 2048.. start past element 2^31."""
    skip_unless_runs("cpu", "permute")
    tokens, k, dim = 1025, 2, 2**20
    ids = torch.zeros(tokens, k, dtype=torch.long)
    ids[:, 1] = 1
    meta = ops.routing_metadata(ids, 2, backend="cpu")
    x = torch.arange(tokens, dtype=torch.float16)[:, None].expand(tokens, dim).contiguous()  # row t holds t
    x_sorted = ops.permute(x, meta, backend="cpu")
    assert x_sorted.shape[0] * dim > 2**31
    for row in (2048, 2049, 2 * tokens - 1):  # expert 1's rows, all past element 2^31
        token = int(meta.sorted_token[row])
        assert row * dim >= 2**31 and x_sorted[row, ::65536].eq(token).all() and x_sorted[row, -1] == token
    del x
    gates = torch.full((tokens, k), 0.5)
    y = ops.unpermute(x_sorted, gates, meta, backend="cpu")  # 0.5 t + 0.5 t = t
    for token in (0, 1023, 1024):
        assert y[token, ::65536].eq(token).all() and y[token, -1] == token
