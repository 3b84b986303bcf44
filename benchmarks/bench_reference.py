"""The reference MoE FFN layer at the papers' medium shape: the baseline the grouped-GEMM issue
measures against (each op's own benchmark file times the reference of that op).

FLOPs are the useful ones (active experts only): gating 2*T*d*E; an FFN expert row 2*d*h*2 for
each of the T*k assignments; forward+backward counted as 3x forward.
"""

import pytest
import torch

from sm4 import ops

# (tokens, d, h, E, k): medium = 32 sequences x 24 latent tokens (two modalities of 12), d = 64.
SHAPES = {"medium": (32 * 24, 64, 128, 32, 2)}


def inputs(tokens, dim, hidden, experts, device, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=g).to(device)
    router = (torch.randn(dim, experts, generator=g) / dim**0.5).to(device)
    tensors = [x, router]
    if hidden is not None:
        tensors += [
            (torch.randn(experts, dim, hidden, generator=g) / dim**0.5).to(device),
            torch.zeros(experts, hidden, device=device),
            (torch.randn(experts, hidden, dim, generator=g) / hidden**0.5).to(device),
            torch.zeros(experts, dim, device=device),
        ]
    return [t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_reference_moe_ffn(benchmark, record, device, mode):
    tokens, dim, hidden, experts, k = SHAPES["medium"]
    params = inputs(tokens, dim, hidden, experts, device, requires_grad=(mode != "forward"))

    def run():
        out = ops.moe_ffn(*params, k, training=True, backend="reference")
        if mode != "forward":
            (out.output.square().mean() + out.routing.balance_loss(0.05)).backward()

    benchmark(run)
    forward_flops = 2 * tokens * dim * experts + tokens * k * 2 * 2 * dim * hidden
    weights = sum(p.numel() for p in params[2:]) * 4
    record(f"moe_ffn_{mode}", "medium", "reference", flops=forward_flops * (1 if mode == "forward" else 3),
           bytes_moved=2 * tokens * dim * 4 + weights)
