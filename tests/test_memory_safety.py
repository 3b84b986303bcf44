"""Hand-built RoutingMetadata and offsets: a ValueError naming the field, never a crash.

Each case runs in a subprocess, so that a segfault or heap corruption (what the cpu permute and
unpermute did with assignment_row values outside [-1, N) before the bounds checks) fails the test
instead of killing pytest. Every backend that takes CPU tensors gets the same ValueError from the
Python-side check; the compiled CPU kernels also check their indices when called directly.
"""

import os
import subprocess
import sys

import pytest

from .helpers import skip_unless_runs

SETUP = """
import torch, sm4
from sm4 import ops
x = torch.randn(4, 3)
routing = ops.topk_gating(x, torch.randn(3, 3), 2)
m = ops.routing_metadata(routing.expert_ids, 3)
def bad_row(value):
    row = m.assignment_row.clone()
    row[0, 0] = value
    return m._replace(assignment_row=row)
"""

CASES = {
    "permute_row_2**40": ("ops.permute(x, bad_row(2**40), backend=B)", "metadata.assignment_row"),
    "permute_row_past_end": ("ops.permute(x, bad_row(8), backend=B)", "metadata.assignment_row"),
    "permute_row_below_-1": ("ops.permute(x, bad_row(-7), backend=B)", "metadata.assignment_row"),
    "unpermute_row_2**40": ("ops.unpermute(torch.randn(8, 3), routing.gates, bad_row(2**40), backend=B)",
                            "metadata.assignment_row"),
    "unpermute_row_past_end": ("ops.unpermute(torch.randn(8, 3), routing.gates, bad_row(8), backend=B)",
                               "metadata.assignment_row"),
    "expert_linear_token_negative": (
        "ops.expert_linear(x, torch.randn(3, 3, 5), None, routing.gates, "
        "m._replace(sorted_token=torch.full_like(m.sorted_token, -1)), backend=B)", "metadata.sorted_token"),
    "expert_linear_assignment_past_end": (
        "ops.expert_linear(x, torch.randn(3, 3, 5), None, routing.gates, "
        "m._replace(sorted_assignment=m.sorted_assignment + 2**33), backend=B)", "metadata.sorted_assignment"),
    "metadata_offsets_past_end": (
        "ops.permute(x, m._replace(expert_offsets=torch.tensor([0, 4, 6, 9]), expert_counts=torch.tensor([4, 2, 3])), "
        "backend=B)", "metadata.expert_offsets"),
    "metadata_rows_swapped": (
        "ops.permute(x, m._replace(sorted_token=m.sorted_token.flip(0), sorted_assignment=m.sorted_assignment.flip(0)), "
        "backend=B)", "metadata.sorted_assignment"),
    "metadata_counts_wrong": ("ops.permute(x, m._replace(expert_counts=m.expert_counts + 1), backend=B)",
                              "metadata.expert_counts"),
    "metadata_modified_in_place": ("m.assignment_row[0, 0] = 2**40; ops.permute(x, m, backend=B)",
                                   "metadata.assignment_row"),
    "grouped_linear_offsets_negative": (
        "ops.grouped_linear(torch.randn(8, 3), torch.randn(3, 3, 5), None, torch.tensor([0, -4, 2, 8]), backend=B)",
        "expert_offsets"),
    "grouped_linear_offsets_past_end": (
        "ops.grouped_linear(torch.randn(8, 3), torch.randn(3, 3, 5), None, torch.tensor([0, 2, 4, 12]), backend=B)",
        "expert_offsets"),
    "grouped_linear_offsets_decreasing": (
        "ops.grouped_linear(torch.randn(8, 3), torch.randn(3, 3, 5), None, torch.tensor([0, 5, 2, 8]), backend=B)",
        "expert_offsets"),
    "grouped_linear_offsets_not_from_0": (
        "ops.grouped_linear(torch.randn(8, 3), torch.randn(3, 3, 5), None, torch.tensor([2, 5, 6, 8]), backend=B)",
        "expert_offsets"),
    "expert_ffn_offsets_past_end": (
        "ops.expert_ffn(x, torch.randn(3, 3, 4), None, torch.randn(3, 4, 3), None, routing.gates, "
        "m._replace(expert_offsets=torch.tensor([0, 4, 8, 12]), expert_counts=torch.tensor([4, 4, 4])), backend=B)",
        "metadata.expert_offsets"),
}


def run_cases(codes: dict[str, str], backend: str) -> dict[str, str]:
    """Run each snippet in one fresh interpreter (one per call: importing torch costs a second);
    returns {case: "ExceptionClass: message" or "NO ERROR"}. A crash fails the caller's test."""
    lines = [SETUP, f"B = {backend!r}"]
    for name, code in codes.items():
        lines += ["try:", f"    {code}", f"    print({name!r}, '|NO ERROR')", "except Exception as e:",
                  f"    print({name!r}, '|' + type(e).__name__ + ': ' + str(e).replace(chr(10), ' '))"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"the process died (return code {done.returncode}): {done.stderr[-3000:]}"
    return dict(line.split(" |", 1) for line in done.stdout.strip().splitlines())


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_bad_metadata_raises_value_error_in_a_subprocess(backend):
    skip_unless_runs(backend)
    results = run_cases({case: code for case, (code, _) in CASES.items()}, backend)
    for case, (_, field) in CASES.items():
        assert results[case].startswith("ValueError: ") and field in results[case], (case, results[case])


DIRECT_CALLS = {
    "permute": "torch.ops.sm4.permute(x, bad_row(2**40).assignment_row, m.expert_offsets)",
    "unpermute": "torch.ops.sm4.unpermute(torch.randn(8, 3), routing.gates, bad_row(2**40).assignment_row)",
    "permute_backward": "torch.ops.sm4.permute_backward(torch.randn(8, 3), bad_row(8).assignment_row)",
    "unpermute_backward": "torch.ops.sm4.unpermute_backward(torch.randn(4, 3), torch.randn(8, 3), routing.gates, "
                          "bad_row(-5).assignment_row)",
    "unpermute_short_rows": "torch.ops.sm4.unpermute(torch.randn(7, 3), routing.gates, bad_row(7).assignment_row)",
}


def test_compiled_cpu_kernels_check_rows_themselves():
    skip_unless_runs("cpu", "permute")
    for case, result in run_cases(DIRECT_CALLS, "cpu").items():
        assert result.startswith("ValueError: ") and "assignment_row values must lie in [-1, " in result, (case, result)


def test_metadata_from_routing_metadata_is_trusted_until_modified():
    import torch

    from sm4 import _checks, ops

    routing = ops.topk_gating(torch.randn(6, 4), torch.randn(4, 5), 2)
    metadata = ops.routing_metadata(routing.expert_ids, 5)
    assert _checks._trusted(metadata)
    assert not _checks._trusted(metadata._replace(sorted_token=metadata.sorted_token.clone()))
    metadata.expert_counts.add_(0)  # an in-place write bumps the version counter
    assert not _checks._trusted(metadata)
    ops.permute(torch.randn(6, 4), metadata)  # checked in full, and still valid
