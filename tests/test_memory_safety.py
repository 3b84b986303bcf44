"""Hand-built RoutingMetadata and offsets: a ValueError naming the field, never a crash.

Each case runs in a subprocess, so that a segfault or heap corruption (what the cpu permute and
unpermute did with assignment_row values outside [-1, N) before the bounds checks) fails the test
instead of killing pytest. Every backend that takes CPU tensors gets the same ValueError from the
Python-side check; the compiled CPU kernels also check their indices when called directly.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import skip_unless_runs

ROOT = Path(__file__).resolve().parents[1]

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


def run_cases(codes: dict[str, str], backend: str, setup: str = "") -> dict[str, str]:
    """Run each snippet in one fresh interpreter (one per call: importing torch costs a second);
    returns {case: "ExceptionClass: message" or "NO ERROR"}. A crash fails the caller's test,
    naming the case that was running."""
    lines = [SETUP, setup, f"B = {backend!r}", "import sys"]
    for name, code in codes.items():
        lines += [f"sys.stderr.write('running ' + {name!r} + chr(10)); sys.stderr.flush()",
                  "try:", f"    {code}", f"    print({name!r}, '|NO ERROR')", "except Exception as e:",
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


# Direct torch.ops.sm4.* calls, which bypass sm4.ops' Python checks: the compiled CPU kernels must
# check what they dereference themselves. One valid call per op of csrc/sm4_ops.cpp (on the
# routing of SETUP: T = 4 tokens, k = 2, E = 3, N = 8 rows), changed in one argument per case.
DIRECT_SETUP = """
S = torch.ops.sm4
w3 = torch.randn(3, 3)
gates, ids, _, _, _, _, runner, logits = S.topk_gating_forward(x, w3, torch.randn(4, 3), None, 2, 0.5, False)
rows, off = m.assignment_row, m.expert_offsets
GOOD = {
    "expert_histogram": dict(expert_ids=ids, num_experts=3),
    "routing_metadata": dict(expert_ids=ids, num_experts=3),
    "topk_gating_forward": dict(x=x, router_weight=w3, noise=torch.randn(4, 3), token_k=torch.ones(4, dtype=torch.long),
                                k=2, sigma=0.5, renormalize=False),
    "topk_gating_backward": dict(grad_gates=torch.ones(4, 2), grad_importance=torch.ones(3), grad_load=torch.ones(3),
                                 logits=logits, noise=torch.randn(4, 3), expert_ids=ids, runner_up=runner, sigma=0.5,
                                 renormalize=False),
    "permute": dict(x=x, assignment_row=rows, expert_offsets=off),
    "permute_backward": dict(grad_sorted=torch.randn(8, 3), assignment_row=rows),
    "unpermute": dict(y_sorted=torch.randn(8, 3), gates=routing.gates, assignment_row=rows),
    "unpermute_backward": dict(grad_y=torch.randn(4, 3), y_sorted=torch.randn(8, 3), gates=routing.gates,
                               assignment_row=rows),
    "grouped_mm": dict(a=x, weight=torch.randn(3, 3, 5), bias=torch.randn(3, 5), expert_offsets=off,
                       gather_index=m.sorted_token, scatter_index=m.sorted_assignment, scatter_scale=torch.ones(8),
                       num_out_rows=8, transpose_weight=False, activation=1, save_preact=True),
    "grouped_weight_grad": dict(a=x, grad=torch.randn(8, 5), expert_offsets=off, a_index=m.sorted_token,
                                grad_index=m.sorted_assignment, compute_bias=True),
    "grouped_ffn_backward": dict(grad_out=torch.randn(8, 3), x=x, w1=torch.randn(3, 3, 5), w2=torch.randn(3, 5, 3),
                                 preact=torch.randn(8, 5), expert_offsets=off, gather_index=m.sorted_token,
                                 scatter_index=m.sorted_assignment, activation=1, compute_grad_x=True,
                                 compute_bias1=True, compute_bias2=True),
}
for op, kwargs in GOOD.items():  # every baseline call is valid
    getattr(S, op)(**kwargs)
def call(op, **bad):
    return getattr(S, op)(**{**GOOD[op], **bad})
L = torch.long
"""

# Offsets that break each rule: negative, past the end, decreasing, not from 0, wrong length, dtype.
BAD_OFFSETS = [("[0, -4, 2, 8]", ValueError), ("[0, 2, 4, 12]", ValueError), ("[0, 5, 2, 8]", ValueError),
               ("[2, 5, 6, 8]", ValueError), ("[0, 8]", ValueError), ("[0., 2., 4., 8.]", TypeError)]
DIRECT = [  # (op, argument named in the message, bad keyword arguments, exception class)
    *[(op, "expert_ids", bad, error) for op in ("expert_histogram", "routing_metadata") for bad, error in [
        ("expert_ids=ids + 5", ValueError), ("expert_ids=ids - 2", ValueError), ("expert_ids=ids.float()", TypeError),
        ("expert_ids=ids[0]", ValueError)]],
    ("expert_histogram", "num_experts", "num_experts=0", ValueError),
    ("routing_metadata", "num_experts", "num_experts=-1", ValueError),
    ("topk_gating_forward", "x", "x=x.long()", TypeError), ("topk_gating_forward", "x", "x=x[0]", ValueError),
    ("topk_gating_forward", "router_weight", "router_weight=torch.randn(2, 3)", ValueError),
    ("topk_gating_forward", "router_weight", "router_weight=w3.long()", TypeError),
    ("topk_gating_forward", "k", "k=0", ValueError), ("topk_gating_forward", "k", "k=4", ValueError),
    ("topk_gating_forward", "noise", "noise=None", ValueError),
    ("topk_gating_forward", "noise", "noise=torch.randn(4, 2)", ValueError),
    ("topk_gating_forward", "noise", "noise=torch.ones(4, 3, dtype=L)", TypeError),
    ("topk_gating_forward", "token_k", "token_k=torch.ones(3, dtype=L)", ValueError),
    ("topk_gating_forward", "token_k", "token_k=torch.ones(4)", TypeError),
    ("topk_gating_backward", "expert_ids", "expert_ids=ids + 5", ValueError),
    ("topk_gating_backward", "expert_ids", "expert_ids=ids - 9", ValueError),
    ("topk_gating_backward", "expert_ids", "expert_ids=torch.full_like(ids, -1)", ValueError),
    ("topk_gating_backward", "expert_ids", "expert_ids=ids[:2]", ValueError),
    ("topk_gating_backward", "expert_ids", "expert_ids=ids.float()", TypeError),
    ("topk_gating_backward", "runner_up", "runner_up=runner + 2**40", ValueError),
    ("topk_gating_backward", "runner_up", "runner_up=runner[:2]", ValueError),
    ("topk_gating_backward", "grad_gates", "grad_gates=torch.ones(4, 1)", ValueError),
    ("topk_gating_backward", "grad_gates", "grad_gates=torch.ones(2, 2)", ValueError),
    ("topk_gating_backward", "grad_gates", "grad_gates=torch.ones(4, 2, dtype=L)", TypeError),
    ("topk_gating_backward", "grad_importance", "grad_importance=torch.ones(2)", ValueError),
    ("topk_gating_backward", "grad_load", "grad_load=torch.ones(1)", ValueError),
    ("topk_gating_backward", "logits", "logits=logits[0]", ValueError),
    ("topk_gating_backward", "logits", "logits=logits.half()", TypeError),
    ("topk_gating_backward", "noise", "noise=None", ValueError),
    ("topk_gating_backward", "noise", "noise=torch.randn(4, 2)", ValueError),
    *[("permute", "assignment_row", f"assignment_row=bad_row({v}).assignment_row", ValueError)
      for v in ("2**40", "8", "-7", "-2**40")],
    ("permute", "assignment_row", "assignment_row=rows.int()", TypeError),
    ("permute", "assignment_row", "assignment_row=rows[:2]", ValueError),
    ("permute", "assignment_row", "expert_offsets=torch.tensor([0, 2, 4, 6])", ValueError),  # rows 6, 7 inactive
    *[("permute", "expert_offsets", f"expert_offsets=torch.tensor({o})", error) for o, error in BAD_OFFSETS
      if o != "[0, 8]"],  # permute takes any E
    ("permute", "x", "x=x[0]", ValueError), ("permute", "x", "x=x.long()", TypeError),
    *[("permute_backward", "assignment_row", bad, ValueError) for bad in (
        "assignment_row=bad_row(8).assignment_row", "assignment_row=bad_row(-2).assignment_row",
        "grad_sorted=torch.randn(7, 3)", "assignment_row=rows[0]")],
    ("permute_backward", "assignment_row", "assignment_row=rows.int()", TypeError),
    ("permute_backward", "grad_sorted", "grad_sorted=torch.randn(8)", ValueError),
    ("permute_backward", "grad_sorted", "grad_sorted=torch.ones(8, 3, dtype=L)", TypeError),
    *[("unpermute", "assignment_row", bad, ValueError) for bad in (
        "assignment_row=bad_row(2**40).assignment_row", "assignment_row=bad_row(-3).assignment_row",
        "y_sorted=torch.randn(7, 3)")],
    ("unpermute", "gates", "gates=routing.gates[:, :1]", ValueError),
    ("unpermute", "gates", "gates=routing.gates.long()", TypeError),
    ("unpermute", "y_sorted", "y_sorted=torch.randn(8)", ValueError),
    ("unpermute", "y_sorted", "y_sorted=torch.ones(8, 3, dtype=L)", TypeError),
    *[("unpermute_backward", "assignment_row", bad, ValueError) for bad in (
        "assignment_row=bad_row(-5).assignment_row", "assignment_row=bad_row(8).assignment_row",
        "y_sorted=torch.randn(7, 3), grad_y=torch.randn(4, 3)")],
    ("unpermute_backward", "grad_y", "grad_y=torch.randn(3, 3)", ValueError),
    ("unpermute_backward", "grad_y", "grad_y=torch.randn(4, 2)", ValueError),
    ("unpermute_backward", "grad_y", "grad_y=torch.randn(4, 3, dtype=torch.float64)", TypeError),
    ("unpermute_backward", "gates", "gates=routing.gates[:1]", ValueError),
    ("unpermute_backward", "gates", "gates=routing.gates.long()", TypeError),
    ("unpermute_backward", "y_sorted", "y_sorted=torch.ones(8, 3, dtype=L), grad_y=torch.ones(4, 3, dtype=L)",
     TypeError),
    *[(op, "expert_offsets", f"expert_offsets=torch.tensor({o})", error) for op in ("grouped_mm", "grouped_weight_grad")
      for o, error in BAD_OFFSETS if o != "[0, 8]" or op == "grouped_mm"],  # grouped_weight_grad takes any E
    ("grouped_mm", "gather_index", "gather_index=m.sorted_token + 4", ValueError),
    ("grouped_mm", "gather_index", "gather_index=m.sorted_token - 2**40", ValueError),
    ("grouped_mm", "gather_index", "gather_index=m.sorted_token.view(2, 4)", ValueError),
    ("grouped_mm", "gather_index", "gather_index=m.sorted_token.int()", TypeError),
    ("grouped_mm", "scatter_index", "scatter_index=m.sorted_assignment + 8", ValueError),
    ("grouped_mm", "scatter_index", "num_out_rows=4", ValueError),
    ("grouped_mm", "scatter_index", "scatter_index=m.sorted_assignment.int()", TypeError),
    ("grouped_mm", "scatter_scale", "scatter_scale=torch.ones(5)", ValueError),
    ("grouped_mm", "scatter_scale", "scatter_scale=torch.ones(8, dtype=L)", TypeError),
    ("grouped_mm", "bias", "bias=torch.randn(3, 4)", ValueError),
    ("grouped_mm", "bias", "bias=torch.randn(3, 5, dtype=torch.float64)", TypeError),
    ("grouped_mm", "weight", "weight=torch.randn(3, 2, 5)", ValueError),
    ("grouped_mm", "weight", "weight=torch.randn(3, 5)", ValueError),
    ("grouped_mm", "weight", "weight=torch.randn(3, 3, 5, dtype=torch.float64)", TypeError),
    ("grouped_mm", "a", "a=x[0]", ValueError), ("grouped_mm", "a", "a=x.long(), weight=torch.ones(3, 3, 5, dtype=L), "
                                                "bias=None", TypeError),
    ("grouped_mm", "activation", "activation=3", ValueError),
    ("grouped_mm", "num_out_rows", "num_out_rows=-1", ValueError),
    ("grouped_mm", "num_out_rows", "scatter_index=None, gather_index=None, a=torch.randn(8, 3), num_out_rows=4",
     ValueError),
    ("grouped_weight_grad", "a_index", "a_index=m.sorted_token + 4", ValueError),
    ("grouped_weight_grad", "a_index", "a_index=m.sorted_token.view(2, 4)", ValueError),
    ("grouped_weight_grad", "grad_index", "grad_index=m.sorted_assignment - 1", ValueError),
    ("grouped_weight_grad", "grad_index", "grad_index=m.sorted_assignment.int()", TypeError),
    ("grouped_weight_grad", "grad", "grad=torch.randn(8, 5, dtype=torch.float64)", TypeError),
    ("grouped_weight_grad", "grad", "grad=torch.randn(8)", ValueError),
    ("grouped_weight_grad", "grad", "grad_index=None, grad=torch.randn(5, 5)", ValueError),
    ("grouped_weight_grad", "a", "a=x.long(), grad=torch.ones(8, 5, dtype=L)", TypeError),
    ("grouped_weight_grad", "a", "a=x[0]", ValueError),
    *[("grouped_ffn_backward", "expert_offsets", f"expert_offsets=torch.tensor({o})", error) for o, error in BAD_OFFSETS],
    ("grouped_ffn_backward", "gather_index", "gather_index=m.sorted_token + 4", ValueError),
    ("grouped_ffn_backward", "gather_index", "gather_index=m.sorted_token - 2**40", ValueError),
    ("grouped_ffn_backward", "gather_index", "gather_index=m.sorted_token.view(2, 4)", ValueError),
    ("grouped_ffn_backward", "gather_index", "gather_index=m.sorted_token.int()", TypeError),
    ("grouped_ffn_backward", "scatter_index", "scatter_index=m.sorted_assignment + 8", ValueError),
    ("grouped_ffn_backward", "scatter_index", "scatter_index=m.sorted_assignment - 2**40", ValueError),
    ("grouped_ffn_backward", "scatter_index", "scatter_index=m.sorted_assignment[:5]", ValueError),
    ("grouped_ffn_backward", "scatter_index", "scatter_index=m.sorted_assignment.int()", TypeError),
    ("grouped_ffn_backward", "grad_out", "grad_out=torch.randn(8, 4)", ValueError),
    ("grouped_ffn_backward", "grad_out", "grad_out=torch.randn(8, 3, dtype=torch.float64)", TypeError),
    ("grouped_ffn_backward", "grad_out", "scatter_index=None, grad_out=torch.randn(5, 3)", ValueError),
    ("grouped_ffn_backward", "x", "x=x[0]", ValueError), ("grouped_ffn_backward", "x", "x=x.double()", TypeError),
    ("grouped_ffn_backward", "x", "gather_index=None", ValueError),  # then x must have the 8 sorted rows
    ("grouped_ffn_backward", "w1", "w1=torch.randn(3, 2, 5)", ValueError),
    ("grouped_ffn_backward", "w1", "w1=torch.randn(3, 3, 5, dtype=torch.float64)", TypeError),
    ("grouped_ffn_backward", "w2", "w2=torch.randn(3, 4, 3)", ValueError),
    ("grouped_ffn_backward", "w2", "w2=torch.randn(2, 5, 3)", ValueError),
    ("grouped_ffn_backward", "w2", "w2=torch.randn(3, 5, 3).half()", TypeError),
    ("grouped_ffn_backward", "preact", "preact=torch.randn(8, 4)", ValueError),
    ("grouped_ffn_backward", "preact", "preact=torch.randn(8, 5, dtype=torch.bfloat16)", TypeError),
    ("grouped_ffn_backward", "activation", "activation=0", ValueError),
    ("grouped_ffn_backward", "activation", "activation=3", ValueError),
]
SCHEMA_OPS = sorted(set(re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "sm4_ops.cpp").read_text())))


def test_every_schema_op_has_direct_call_cases():
    assert SCHEMA_OPS and sorted({op for op, *_ in DIRECT}) == SCHEMA_OPS


@pytest.mark.parametrize("op", SCHEMA_OPS)
def test_direct_torch_ops_calls_raise_value_or_type_errors_naming_the_argument(op):
    """Each bad argument of one op in one fresh interpreter: a segfault fails this test with the
    signal (and the case that was running) instead of killing pytest."""
    skip_unless_runs("cpu", "permute")
    cases = {f"{op}-{i}": (bad, field, error) for i, (name, field, bad, error) in enumerate(DIRECT) if name == op}
    results = run_cases({case: f"call({op!r}, {bad})" for case, (bad, _, _) in cases.items()}, "cpu", DIRECT_SETUP)
    for case, (bad, field, error) in cases.items():
        assert results[case].startswith(f"{error.__name__}: ") and field in results[case], (bad, results[case])


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
