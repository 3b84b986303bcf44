"""Property-based fuzzing of the ops (Hypothesis): random shapes (0 included), dtypes, k,
token_k, routings and hand-corrupted metadata, on the cpu and reference backends (triton through
its interpreter on small shapes). Every call either raises a clear exception (TypeError,
ValueError, sm4.BackendNotSupportedError: never another class, never a crash) or returns what
the float64 reference returns, within the per-dtype tolerance.

Fixed seed (derandomize) and a small budget in ``make test``; ``SM4_FUZZ_EXAMPLES=2000`` runs
longer.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sm4
from sm4 import ops, reference

from .helpers import TOLERANCES, skip_unless_runs

EXAMPLES = int(os.environ.get("SM4_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAR = (TypeError, ValueError, sm4.BackendNotSupportedError)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
BACKENDS = ("cpu", "reference")


def tolerance(dtype):
    # Two roundings of the inputs/outputs in the dtype plus fp32 accumulation over small sizes.
    return {key: 4 * value for key, value in TOLERANCES[dtype].items()}


@st.composite
def routings(draw, max_tokens=12):
    tokens = draw(st.integers(0, max_tokens))
    experts = draw(st.integers(1, 6))
    k = draw(st.integers(1, experts))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.int64)
    token_k = torch.randint(1, k + 1, (tokens,), generator=g) if draw(st.booleans()) else None
    return ids, experts, k, token_k, g


CORRUPTIONS = ("none", "row_big", "row_past_end", "row_below", "token_negative", "assignment_big", "offsets_past_end",
               "offsets_decreasing", "offsets_start", "counts", "swap_rows", "duplicate_row", "dtype", "shape")


def corrupt(metadata, how: str, g):
    m = metadata
    n = m.sorted_token.shape[0]
    if how == "none" or n == 0:
        return m
    i = int(torch.randint(0, n, (), generator=g))
    row = m.assignment_row.clone().view(-1)
    if how in ("row_big", "row_past_end", "row_below", "duplicate_row"):
        row[i % row.numel()] = {"row_big": 2**40, "row_past_end": n, "row_below": -3, "duplicate_row": row.max()}[how]
        return m._replace(assignment_row=row.view_as(m.assignment_row))
    if how == "token_negative":
        return m._replace(sorted_token=m.sorted_token.clone().index_fill_(0, torch.tensor([i]), -1))
    if how == "assignment_big":
        return m._replace(sorted_assignment=m.sorted_assignment.clone().index_fill_(0, torch.tensor([i]), 2**33))
    if how == "offsets_past_end":
        return m._replace(expert_offsets=m.expert_offsets + torch.arange(m.expert_offsets.numel()))
    if how == "offsets_decreasing" and m.expert_offsets.numel() > 2:
        offsets = m.expert_offsets.clone()
        offsets[1] = offsets[-1] + 1
        return m._replace(expert_offsets=offsets)
    if how == "offsets_start":
        return m._replace(expert_offsets=m.expert_offsets + 1)
    if how == "counts":
        return m._replace(expert_counts=m.expert_counts + 1)
    if how == "swap_rows" and n > 1:
        return m._replace(sorted_token=m.sorted_token.roll(1), sorted_assignment=m.sorted_assignment.roll(1))
    if how == "dtype":
        return m._replace(assignment_row=m.assignment_row.int())
    if how == "shape":
        return m._replace(sorted_token=m.sorted_token[:-1])
    return m


def clear_or_equal(call, expected_call, dtype):
    """call() raises a clear exception, or equals expected_call() (the reference) within tolerance."""
    try:
        got = call()
    except CLEAR:
        with pytest.raises(CLEAR):  # the reference refuses too: one contract for every backend
            expected_call()
        return
    expected = expected_call()
    torch.testing.assert_close(got.double(), expected.double(), **tolerance(dtype), equal_nan=True)


def run_ops(backend, ids, experts, k, token_k, g, dtype, how, dim=3, hidden=4):
    tokens = ids.shape[0]
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64).to(dtype)
    gates = torch.rand(tokens, k, generator=g, dtype=torch.float64).to(dtype)
    w1 = torch.randn(experts, dim, hidden, generator=g, dtype=torch.float64).to(dtype)
    w2 = torch.randn(experts, hidden, dim, generator=g, dtype=torch.float64).to(dtype)
    good = reference.routing_metadata(ops._mask_ranks(ids, token_k), experts)
    metadata = corrupt(ops.routing_metadata(ids, experts, token_k=token_k, backend=backend), how, g)
    gates = torch.where(good.assignment_row >= 0, gates, 0)
    ref = dict(backend="reference")
    clear_or_equal(lambda: ops.permute(x, metadata, backend=backend), lambda: ops.permute(x, metadata, **ref), dtype)
    y_sorted = torch.randn(ids.numel(), dim, generator=g, dtype=torch.float64).to(dtype)
    clear_or_equal(lambda: ops.unpermute(y_sorted, gates, metadata, backend=backend),
                   lambda: ops.unpermute(y_sorted, gates, metadata, **ref), dtype)
    offsets = metadata.expert_offsets
    clear_or_equal(lambda: ops.grouped_linear(y_sorted, w1.transpose(1, 2), None, offsets, backend=backend),
                   lambda: ops.grouped_linear(y_sorted, w1.transpose(1, 2), None, offsets, **ref), dtype)
    clear_or_equal(lambda: ops.expert_ffn(x, w1, None, w2, None, gates, metadata, backend=backend),
                   lambda: ops.expert_ffn(x, w1, None, w2, None, gates, metadata, **ref), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(routing=routings(), dtype=st.sampled_from(DTYPES), how=st.sampled_from(CORRUPTIONS))
def test_fuzz_metadata_ops(backend, routing, dtype, how):
    skip_unless_runs(backend, "permute")
    run_ops(backend, *routing, dtype, how)


@FUZZ
@given(routing=routings(max_tokens=5), dtype=st.sampled_from(DTYPES[:3]), how=st.sampled_from(CORRUPTIONS))
def test_fuzz_metadata_ops_triton(routing, dtype, how):
    skip_unless_runs("triton", "permute")
    run_ops("triton", *routing, dtype, how, dim=2, hidden=2)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(tokens=st.integers(0, 10), dim=st.integers(0, 5), experts=st.integers(0, 6), k=st.integers(-1, 7),
       x_dtype=st.sampled_from(DTYPES), router_dtype=st.sampled_from(DTYPES), training=st.booleans(),
       per_token=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_moe_ffn(backend, tokens, dim, experts, k, x_dtype, router_dtype, training, per_token, seed):
    skip_unless_runs(backend, "expert_ffn")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64).to(x_dtype)
    router = torch.randn(dim, experts, generator=g, dtype=torch.float64).to(router_dtype)
    w1 = torch.randn(max(experts, 1), dim, 3, generator=g, dtype=torch.float64).to(x_dtype)[:experts]
    w2 = torch.randn(max(experts, 1), 3, dim, generator=g, dtype=torch.float64).to(x_dtype)[:experts]
    token_k = torch.randint(1, max(k, 1) + 1, (tokens,), generator=g) if per_token else None
    noise = torch.randn(tokens, experts, generator=g, dtype=torch.float64).to(x_dtype) if training else None
    kwargs = dict(token_k=token_k, training=training, noise=noise)
    call = lambda b: ops.moe_ffn(x, router, w1, None, w2, None, k, backend=b, **kwargs).output  # noqa: E731
    clear_or_equal(lambda: call(backend), lambda: call("reference"), x_dtype)
