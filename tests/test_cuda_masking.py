"""Bad metadata on the CUDA kernels, executed under the CPU emulation: they mask, never touch memory
outside their tensors (issue #16).

On GPU tensors a check of hand-built metadata would be a host sync, so the CUDA permute, unpermute,
their backwards and the gating backward mask on the device instead (csrc/cuda/permutation.cu and
topk_gating.cu say how): an assignment_row outside [-1, N) is dropped / reads zeros, padding
offsets are clamped, an expert id or runner-up outside [0, E) counts as inactive. The compiled
ops are called directly (sm4.ops would refuse the metadata on CPU tensors first), in a child
process, so that an out-of-bounds access (a segfault at row 2**40, heap damage just past the end)
fails the test instead of killing pytest; a hazard of the emulation would come back as an error.
"""

import os
import subprocess
import sys

import pytest
import torch

from . import cuda_emulation
from .helpers import FLOAT_DTYPES, assert_close

pytestmark = pytest.mark.skipif(not cuda_emulation.enabled(), reason=f"{cuda_emulation.ENV_SWITCH}=0")

TOKENS, K, EXPERTS = 37, 2, 5
N = TOKENS * K
DIMS = (64, 7)  # 16-byte vectors for every dtype / element by element
# (token, rank) -> corrupted assignment_row: far past the end, just past it, below -1, far below.
BAD_ROWS = {(0, 0): 2**40, (1, 1): N, (2, 0): -7, (3, 1): -(2**40)}
BAD_IDS = {(0, 0): 2**40, (1, 1): EXPERTS, (2, 0): -7}   # expert ids of the gating backward
BAD_RUNNERS = {3: 2**40, 4: EXPERTS, 5: -(2**40)}


def _inputs(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    ids = torch.randint(-1, EXPERTS, (TOKENS, K), generator=g)
    from sm4 import ops

    m = ops.routing_metadata(ids, EXPERTS, backend="reference")
    rows = m.assignment_row.clone()
    for (t, r), value in BAD_ROWS.items():
        rows[t, r] = value
    x = torch.randn(TOKENS, dim, generator=g).to(dtype)
    y = torch.randn(N, dim, generator=g).to(dtype)
    gates = torch.rand(TOKENS, K, generator=g).to(dtype)
    return m, rows, x, y, gates


def _gating_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(TOKENS, 16, generator=g)
    w = torch.randn(16, EXPERTS, generator=g)
    noise = torch.randn(TOKENS, EXPERTS, generator=g)
    grads = torch.randn(TOKENS, K, generator=g), torch.randn(EXPERTS, generator=g), torch.randn(EXPERTS, generator=g)
    return x, w, noise, grads


def _run_in_child(path):
    """Every call with bad metadata; saves {case: outputs or the error message} to path."""
    cuda_emulation.load()
    ops = torch.ops.sm4_cuda_emulated
    results = {}

    def record(case, fn):
        try:
            results[case] = fn()
        except Exception as e:  # a hazard or a refusal: the parent reports it
            results[case] = f"{type(e).__name__}: {e}"

    for dtype in FLOAT_DTYPES:
        for dim in DIMS:
            m, rows, x, y, gates = _inputs(dtype, dim)
            tag = f"{dtype}-{dim}"
            record(f"permute {tag}", lambda: ops.permute(x, rows, m.expert_offsets))
            for name, last in (("below 0", -5), ("past N", 2**40)):
                offsets = m.expert_offsets.clone()
                offsets[-1] = last
                record(f"permute offsets {name} {tag}", lambda: ops.permute(x, m.assignment_row, offsets))
            record(f"unpermute {tag}", lambda: ops.unpermute(y, gates, rows))
            record(f"permute_backward {tag}", lambda: ops.permute_backward(y, rows))
            record(f"unpermute_backward {tag}", lambda: ops.unpermute_backward(x, y, gates, rows))
    x, w, noise, (d_gates, d_importance, d_load) = _gating_inputs()
    forward = ops.topk_gating_forward(x, w, noise, None, K, 1.0, True)
    ids, runner_up, logits = forward[1], forward[6], forward[7]
    bad_ids, bad_runners, masked_ids, masked_runners = ids.clone(), runner_up.clone(), ids.clone(), runner_up.clone()
    for (t, r), value in BAD_IDS.items():
        bad_ids[t, r], masked_ids[t, r] = value, -1
    for t, value in BAD_RUNNERS.items():
        bad_runners[t], masked_runners[t] = value, -1
    for renormalize in (True, False):
        def backward(i, run):
            return ops.topk_gating_backward(d_gates, d_importance, d_load, logits, noise, i, run, 1.0, renormalize)

        record(f"gating_backward bad {renormalize}", lambda: backward(bad_ids, bad_runners))
        record(f"gating_backward masked {renormalize}", lambda: backward(masked_ids, masked_runners))
        record(f"gating_backward valid {renormalize}", lambda: backward(ids, runner_up))
    torch.save(results, path)


@pytest.fixture(scope="module")
def child_results(tmp_path_factory):
    cuda_emulation.load()  # built here, so the child only loads it
    path = tmp_path_factory.mktemp("masking") / "results.pt"
    code = f"from tests.test_cuda_masking import _run_in_child; _run_in_child({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=cuda_emulation.ROOT, env={**os.environ, "PYTHONPATH": str(cuda_emulation.ROOT)})
    assert done.returncode == 0, f"the process died (return code {done.returncode}): {done.stderr[-3000:]}"
    results = torch.load(path)
    errors = {case: r for case, r in results.items() if isinstance(r, str)}
    assert not errors, errors
    return results


def _valid(rows, num_rows):
    return (rows >= 0) & (rows < num_rows)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_permute_drops_rows_out_of_range(child_results, dtype, dim):
    m, rows, x, _, _ = _inputs(dtype, dim)
    out = child_results[f"permute {dtype}-{dim}"]
    assert out.shape == (N, dim)
    written = torch.zeros(N, dtype=torch.bool)
    for t, r in _valid(rows, N).nonzero().tolist():
        assert torch.equal(out[rows[t, r]], x[t])
        written[rows[t, r]] = True
    padding = int(m.expert_offsets[-1])
    assert not written[padding:].any() and out[padding:].eq(0).all()
    # The rows the corrupted entries pointed at were written by nobody (unspecified, never outside out).
    lost = {int(m.assignment_row[t, r]) for t, r in BAD_ROWS if m.assignment_row[t, r] >= 0}
    assert lost and not any(written[row] for row in lost)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_permute_clamps_bad_padding_offsets(child_results, dtype, dim):
    m, _, x, _, _ = _inputs(dtype, dim)
    active = m.assignment_row >= 0
    expected_rows = x.repeat_interleave(K, 0)[active.flatten()]
    everything_padding = child_results[f"permute offsets below 0 {dtype}-{dim}"]  # zeroed, then the rows written
    assert torch.equal(everything_padding[m.assignment_row[active]], expected_rows)
    assert everything_padding[int(m.expert_offsets[-1]):].eq(0).all()
    nothing_padding = child_results[f"permute offsets past N {dtype}-{dim}"]
    assert torch.equal(nothing_padding[m.assignment_row[active]], expected_rows)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_unpermute_reads_rows_out_of_range_as_zeros(child_results, dtype, dim):
    _, rows, _, y, gates = _inputs(dtype, dim)
    valid = _valid(rows, N)
    picked = y.double()[rows.clamp(0, N - 1)] * valid[..., None]  # (T, k, d), zeros where masked
    assert_close(child_results[f"unpermute {dtype}-{dim}"], (gates.double()[..., None] * picked).sum(1), dtype)
    assert_close(child_results[f"permute_backward {dtype}-{dim}"], picked.sum(1), dtype)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_unpermute_backward_skips_rows_out_of_range(child_results, dtype, dim):
    _, rows, grad_y, y, gates = _inputs(dtype, dim)
    grad_sorted, grad_gates = child_results[f"unpermute_backward {dtype}-{dim}"]
    valid = _valid(rows, N)
    assert grad_gates[~valid].eq(0).all()
    for t, r in valid.nonzero().tolist():
        row = rows[t, r]
        assert_close(grad_sorted[row], gates[t, r].double() * grad_y[t].double(), dtype)
        assert_close(grad_gates[t, r], (grad_y[t].double() * y[row].double()).sum(), dtype)


@pytest.mark.parametrize("renormalize", [True, False])
def test_gating_backward_treats_bad_ids_and_runner_up_as_inactive(child_results, renormalize):
    bad = child_results[f"gating_backward bad {renormalize}"]
    assert torch.isfinite(bad).all()
    assert torch.equal(bad, child_results[f"gating_backward masked {renormalize}"])
    touched = sorted({t for t, _ in BAD_IDS} | set(BAD_RUNNERS))
    untouched = torch.ones(TOKENS, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(bad[untouched], child_results[f"gating_backward valid {renormalize}"][untouched])
