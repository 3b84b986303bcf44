"""Fused top-k gating on each backend against the reference and torch's unfused sequence.

FLOPs (useful): the router GEMM, 2*T*d*E forward, 3x that forward+backward (dX and dW GEMMs).
Bytes (forward): x read once, the router weight once, ids (8 B) and gates (4 B) written per
(token, rank). Targets (issue #3): CPU >= 4x the reference at `medium` and `scale`, forward and
forward+backward; GPU forward >= 80 % of the copy roofline at `gpu_T16384_d4096_E64` (bf16).

Predicted on the 2-vCPU development machine: forward at `scale` is bound by the router GEMM
(~14 ms at ~150 GFLOP/s on two threads) plus the noise draw and ~5 ns per (token, expert) for the
vectorised routing pass (measured 20.8 ms); forward+backward adds grad_W (~14 ms) and grad_x
(~28 ms, it writes a 64 MiB tensor), the same GEMMs as the reference, so at most ~3x over the
reference there (measured 2.6x).
"""

import pytest
import torch

from sm4 import backends, ops

from .shapes import routing_shapes

# name: (T, d, E, k, dtype)
SHAPES = {name: (*shape, torch.float32) for name, shape in routing_shapes().items()}
if torch.cuda.is_available():
    SHAPES["gpu_T16384_d4096_E64_bf16"] = (16384, 4096, 64, 2, torch.bfloat16)
PATHS = ["reference", "cpu", "cuda", "triton", "torch_unfused"]  # reference first: speedups need it


def torch_unfused(x, w, k):
    """The plain PyTorch sequence a fused kernel replaces: matmul -> softmax -> topk."""
    probs = torch.softmax(x.float() @ w.float(), dim=-1)
    return torch.topk(probs, k, dim=-1)


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_topk_gating(benchmark, record, device, shape, path, mode):
    tokens, dim, experts, k, dtype = SHAPES[shape]
    if device.type == "cpu" and shape.startswith("gpu"):
        pytest.skip("GPU shape")
    if path == "torch_unfused" and mode != "forward":
        pytest.skip("the unfused baseline is a forward-only comparison")
    if path == "triton" and device.type == "cpu":
        pytest.skip("triton: CPU tensors would run through the Triton interpreter, which is a test tool, not a benchmark")
    if path not in ("reference", "torch_unfused"):
        reasons = backends.BACKENDS[path].not_supported_reasons(
            "topk_gating", [torch.empty(0, device=device, dtype=dtype)], forced=True, sizes={"E": experts})
        if reasons:
            pytest.skip(f"{path}: {'; '.join(reasons)}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=g).to(device, dtype)
    w = (torch.randn(dim, experts, generator=g) / dim**0.5).to(device, dtype)
    params = [x.requires_grad_(mode != "forward"), w.requires_grad_(mode != "forward")]

    def run():
        if path == "torch_unfused":
            out = torch_unfused(x, w, k)
        else:
            out = ops.topk_gating(*params, k, training=True, backend=path)
            if mode != "forward":
                (out.gates.sum() + out.balance_loss(0.1)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark(run)
    forward_flops = 2 * tokens * dim * experts
    bytes_moved = x.numel() * x.element_size() + w.numel() * w.element_size() + tokens * k * 12
    record(f"topk_gating_{mode}", shape, path, flops=forward_flops * (1 if mode == "forward" else 3),
           bytes_moved=bytes_moved * (1 if mode == "forward" else 3))
