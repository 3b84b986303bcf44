"""expert_histogram (counts + offsets) on each backend against the reference.

Bytes: the ids are read once (T * k_max * 8 bytes); counts and offsets are negligible. FLOPs: 0
(integer counting). Prediction for this CPU: bandwidth-bound, reading 8 bytes per assignment at
a few GB/s; the reference pays for index_add_, a clamp, a compare and a cumsum, ~4 passes.
"""

import pytest
import torch

from sm4 import backends, ops

from .shapes import routing_shapes

# name: (T, k, E)
SHAPES = {name: (t, k, e) for name, (t, _, e, k) in routing_shapes().items()}
ORDER = ["reference", "cpu", "cuda", "triton"]  # reference first: the speedups need its time


@pytest.mark.parametrize("backend", ORDER)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_expert_histogram(benchmark, record, device, shape, backend):
    impl = backends.BACKENDS[backend]
    reasons = impl.not_supported_reasons("expert_histogram", [torch.empty(0, device=device)], forced=False)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")
    tokens, k, experts = SHAPES[shape]
    ids = torch.randint(-1, experts, (tokens, k), device=device, generator=None)
    counts, offsets = benchmark(lambda: ops.expert_histogram(ids, experts, backend=backend))
    assert int(offsets[-1]) == int((ids >= 0).sum())
    record("expert_histogram", shape, backend, flops=0, bytes_moved=ids.numel() * ids.element_size())
