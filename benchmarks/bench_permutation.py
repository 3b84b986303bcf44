"""Token permutation: routing metadata, and permute + unpermute (forward, forward+backward).

Bytes (forward): permute reads x (T*d) and writes N*d rows; unpermute reads the N*d rows and
writes T*d, plus ids/gates/rows; backward moves the same again. FLOPs: 2*N*d for the weighted
combine. Targets (issue #4): CPU >= 3x the reference at `medium` and `scale`, forward and
backward, reported in GB/s beside the measured copy bandwidth; GPU >= 80 % of the copy roofline.
"""

import pytest
import torch

from sm4 import backends, ops

from .shapes import routing_shapes

# name: (T, d, E, k)
SHAPES = routing_shapes()
PATHS = ["reference", "cpu", "cuda", "triton"]


def skip_reason(path, device):
    if path == "triton" and device.type == "cpu":
        return "triton: CPU tensors would run through the Triton interpreter, a test tool, not a benchmark"
    if path == "reference":
        return None
    reasons = backends.BACKENDS[path].not_supported_reasons("permute", [torch.empty(0, device=device)], forced=True)
    return f"{path}: {'; '.join(reasons)}" if reasons else None


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_permute_unpermute(benchmark, record, device, shape, path, mode):
    reason = skip_reason(path, device)
    if reason:
        pytest.skip(reason)
    tokens, dim, experts, k = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=g).to(device).requires_grad_(mode != "forward")
    ids = torch.randint(0, experts, (tokens, k), generator=g).to(device)
    gates = torch.rand(tokens, k, generator=g).to(device).requires_grad_(mode != "forward")
    meta = ops.routing_metadata(ids, experts, backend=path)

    def run():
        y = ops.unpermute(ops.permute(x, meta, backend=path), gates, meta, backend=path)
        if mode != "forward":
            y.backward(torch.ones_like(y))
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    rows = tokens * k
    forward_bytes = 4 * (tokens * dim + 2 * rows * dim + tokens * dim) + tokens * k * 16
    record(f"permute_unpermute_{mode}", shape, path, flops=2 * rows * dim * (1 if mode == "forward" else 3),
           bytes_moved=forward_bytes * (1 if mode == "forward" else 2))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_routing_metadata(benchmark, record, device, shape, path):
    reason = skip_reason(path, device)
    if reason:
        pytest.skip(reason)
    tokens, _, experts, k = SHAPES[shape]
    ids = torch.randint(0, experts, (tokens, k), generator=torch.Generator().manual_seed(0)).to(device)
    benchmark(lambda: ops.routing_metadata(ids, experts, backend=path))
    record("routing_metadata", shape, path, flops=0, bytes_moved=tokens * k * 8 * 5)
