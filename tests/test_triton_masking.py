"""The Triton kernels' masking of bad metadata (kernels/grouped_gemm.py, kernels/permutation.py).

On GPU tensors the ops cannot validate hand-built metadata without a host sync, so the kernels
themselves must stay inside their tensors and give the documented result, the CUDA grouped GEMM's:
a gather / a_index / grad_index outside its tensor reads a zero row, a destination outside [0,
num_out_rows) is dropped, offsets are clamped into [0, M), an assignment_row outside [-1, N) is an
inactive rank, an expert id outside [-1, E) is inactive. The kernels are called directly (below
sm4.ops, whose CPU validation would refuse these inputs first), through Triton's interpreter on
small CPU tensors. The interpreter may not fault on an out-of-bounds access as a GPU would, so
each test checks the masked *result* against a model built from the reference.
"""

import pytest
import torch

from sm4 import reference

from .helpers import skip_unless_runs

BAD_ROWS = [-1, -7, 10**6, 2**40]


@pytest.fixture(autouse=True)
def _triton_runs():
    skip_unless_runs("triton")


def _kernels():
    from sm4.kernels import grouped_gemm, permutation

    return grouped_gemm, permutation


def _problem(rows=12, k=16, n=16, experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, k, generator=g)
    weight = torch.randn(experts, k, n, generator=g) / 4
    bias = torch.randn(experts, n, generator=g)
    return a, weight, bias


def _zero_padded(a):
    """a with one zero row appended: index a.shape[0] is "the zero row"."""
    return torch.cat([a, a.new_zeros(1, a.shape[1])])


def _valid_or(index, rows, replacement):
    return torch.where((index >= 0) & (index < rows), index, replacement)


def test_grouped_mm_bad_gather_index_reads_a_zero_row():
    grouped_gemm, _ = _kernels()
    a, weight, bias = _problem()
    offsets = torch.tensor([0, 5, 9, 12])
    gather = torch.arange(12).flip(0)
    gather[[1, 4, 6, 11]] = torch.tensor(BAD_ROWS)
    out, preact = grouped_gemm.grouped_mm(a, weight, bias, offsets, gather_index=gather, activation=1, save_preact=True)
    want, want_pre = reference.grouped_mm(_zero_padded(a), weight, bias, offsets, gather_index=_valid_or(gather, 12, 12),
                                          activation=1, save_preact=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(preact, want_pre)


def test_grouped_mm_bad_scatter_index_drops_the_row():
    grouped_gemm, _ = _kernels()
    a, weight, bias = _problem()
    offsets = torch.tensor([0, 5, 9, 12])
    scatter = torch.arange(12).roll(3)
    scatter[[0, 5, 8, 10]] = torch.tensor(BAD_ROWS)
    scale = torch.rand(12, generator=torch.Generator().manual_seed(1))
    out, _ = grouped_gemm.grouped_mm(a, weight, bias, offsets, scatter_index=scatter, scatter_scale=scale, num_out_rows=12)
    want, _ = reference.grouped_mm(a, weight, bias, offsets, scatter_index=_valid_or(scatter, 12, 12),
                                   scatter_scale=scale, num_out_rows=13)
    torch.testing.assert_close(out, want[:12])
    written = set(_valid_or(scatter, 12, -1).tolist()) - {-1}
    for row in set(range(12)) - written:
        assert (out[row] == 0).all(), f"row {row} is written by no valid row and must be zero"


@pytest.mark.parametrize("num_out_rows", [0, 4, 12, 15])
def test_grouped_mm_without_scatter_keeps_the_first_num_out_rows(num_out_rows):
    """num_out_rows < rows is the CUDA kernel's behaviour (rows past the end are dropped), not an error."""
    grouped_gemm, _ = _kernels()
    a, weight, bias = _problem()
    offsets = torch.tensor([0, 5, 9, 12])
    out, _ = grouped_gemm.grouped_mm(a, weight, bias, offsets, num_out_rows=num_out_rows)
    full, _ = reference.grouped_mm(a, weight, bias, offsets)
    want = torch.cat([full, full.new_zeros(max(num_out_rows - 12, 0), full.shape[1])])[:num_out_rows]
    assert out.shape == (num_out_rows, 16)
    torch.testing.assert_close(out, want)


# Offsets the CUDA conventions clamp into [0, M): begin_0 = 0, begin_e = clamp(o_e, 0, M),
# end_e = clamp(o_{e+1}, begin_e, M). These ones stay non-decreasing after clamping, so the result
# is the reference's on the clamped offsets.
CLAMPED_OFFSETS = [
    ([-5, 4, 9, 12], [0, 4, 9, 12]),             # negative first offset
    ([0, -3, 9, 12], [0, 0, 9, 12]),             # negative inner offset
    ([0, 4, 9, 40], [0, 4, 9, 12]),              # last offset past M
    ([0, 30, 50, 2**40], [0, 12, 12, 12]),       # every offset past M
    ([-2**40, -9, -1, -1], [0, 0, 0, 0]),        # all negative: no row is active
]


@pytest.mark.parametrize("bad,clamped", CLAMPED_OFFSETS, ids=str)
def test_grouped_mm_and_weight_grad_clamp_bad_offsets(bad, clamped):
    grouped_gemm, _ = _kernels()
    a, weight, bias = _problem()
    bad, clamped = torch.tensor(bad), torch.tensor(clamped)
    out, preact = grouped_gemm.grouped_mm(a, weight, bias, bad, activation=2, save_preact=True)
    want, want_pre = reference.grouped_mm(a, weight, bias, clamped, activation=2, save_preact=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(preact, want_pre)
    grad = torch.randn(12, 16, generator=torch.Generator().manual_seed(2))
    gw, gb = grouped_gemm.grouped_weight_grad(a, grad, bad)
    want_gw, want_gb = reference.grouped_weight_grad(a, grad, clamped)
    torch.testing.assert_close(gw, want_gw)
    torch.testing.assert_close(gb, want_gb)


def test_grouped_mm_decreasing_offsets_stay_in_bounds():
    """Decreasing offsets: the result is unspecified (rows may belong to no or two experts) but every
    access stays in bounds; rows that only one expert owns get that expert's product."""
    grouped_gemm, _ = _kernels()
    a, weight, bias = _problem()
    out, _ = grouped_gemm.grouped_mm(a, weight, bias, torch.tensor([0, 8, 3, 12]))
    assert out.shape == (12, 16) and torch.isfinite(out).all()
    # Expert 0 owns [0, 8), expert 1 nothing, expert 2 [3, 12): rows 0..2 are expert 0's alone.
    torch.testing.assert_close(out[:3], a[:3] @ weight[0] + bias[0])


def test_grouped_weight_grad_bad_indices_read_zero_rows():
    grouped_gemm, _ = _kernels()
    a, _, _ = _problem()
    grad = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    offsets = torch.tensor([0, 4, 8, 12])
    a_index = torch.arange(12)
    a_index[[2, 7]] = torch.tensor([-1, 2**40])
    grad_index = torch.arange(12) % 10
    grad_index[[3, 9]] = torch.tensor([10, -4])
    gw, gb = grouped_gemm.grouped_weight_grad(a, grad, offsets, a_index=a_index, grad_index=grad_index)
    want_gw, want_gb = reference.grouped_weight_grad(_zero_padded(a), _zero_padded(grad), offsets,
                                                     a_index=_valid_or(a_index, 12, 12),
                                                     grad_index=_valid_or(grad_index, 10, 10))
    torch.testing.assert_close(gw, want_gw)
    torch.testing.assert_close(gb, want_gb)


def _metadata(tokens=6, k=2, experts=3):
    _, permutation = _kernels()
    ids = torch.tensor([[0, 2], [1, 0], [2, -1], [0, 1], [1, 2], [2, 0]])[:tokens, :k]
    return permutation.routing_metadata_op(ids, experts)


def test_permute_drops_out_of_range_assignment_rows():
    _, permutation = _kernels()
    counts, offsets, _, _, assignment_row = _metadata()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    good = permutation.permute_op(x, assignment_row, offsets)
    bad_rows = assignment_row.clone()
    bad_rows[0, 1], bad_rows[3, 0] = 2**40, 12  # N = 12
    out = permutation.permute_op(x, bad_rows, offsets)
    dropped = {assignment_row[0, 1].item(), assignment_row[3, 0].item()}
    for row in range(12):
        if row not in dropped:
            torch.testing.assert_close(out[row], good[row])


def test_unpermute_and_backwards_ignore_out_of_range_assignment_rows():
    _, permutation = _kernels()
    _, offsets, _, _, assignment_row = _metadata()
    y_sorted = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    gates = torch.rand(6, 2, generator=torch.Generator().manual_seed(6))
    bad_rows = assignment_row.clone()
    bad_rows[1, 0], bad_rows[4, 1] = -9, 2**40
    inactive_rows = torch.where((bad_rows >= 0) & (bad_rows < 12), bad_rows, -1)  # what the kernels must see
    torch.testing.assert_close(permutation.unpermute_op(y_sorted, gates, bad_rows, offsets),
                               permutation.unpermute_op(y_sorted, gates, inactive_rows, offsets))
    torch.testing.assert_close(permutation.permute_backward_op(y_sorted, bad_rows),
                               permutation.permute_backward_op(y_sorted, inactive_rows))
    grad_y = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    got_sorted, got_gates = permutation.unpermute_backward_op(grad_y, y_sorted, gates, bad_rows, offsets)
    want_sorted, want_gates = permutation.unpermute_backward_op(grad_y, y_sorted, gates, inactive_rows, offsets)
    torch.testing.assert_close(got_gates, want_gates)
    assert got_gates[1, 0] == 0 and got_gates[4, 1] == 0
    written = inactive_rows[inactive_rows >= 0]
    torch.testing.assert_close(got_sorted[written], want_sorted[written])


def test_routing_metadata_treats_out_of_range_expert_ids_as_inactive():
    _, permutation = _kernels()
    ids = torch.tensor([[0, 2], [1, 3], [2, -1], [2**40, 1]])
    got = permutation.routing_metadata_op(ids, 3)
    want = permutation.routing_metadata_op(torch.where((ids >= 0) & (ids < 3), ids, -1), 3)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
