"""Grouped expert GEMMs: the MoE layers end to end, and the grouped GEMM against a dense matmul.

1. ``moe_ffn`` / ``moe_linear`` (gating + metadata + grouped GEMMs + combine), forward and
   forward+backward, at the papers' medium shape, beside ``plain_loop``: what a user writes
   without sm4 (softmax top-k, then for each expert ``nonzero`` -> gather -> F.linear -> GELU ->
   ``index_add``, as in common MoE code). Target (issue #5): CPU >= 5x plain_loop.
2. ``grouped_gemm``: the first FFN layer (N = T*k rows x d -> h over E experts) beside
   ``dense_mm``, one dense matmul with the same FLOPs. Target: CPU >= 60 % of dense; GPU (bf16)
   >= 75 % of dense cuBLAS, and ``torch._grouped_mm`` beside it where torch has it.
   ``scattermoe`` (ScatterMoE's MLP, where importable, on CUDA) is the public baseline beside
   ``moe_ffn``; each absent baseline is skipped with the reason.
3. ``moe_qkv``: the fused Q/K/V path (one grouped GEMM over 3E experts) against three
   ``moe_linear`` (``unfused``), to measure what the fusion gains.

FLOPs are the useful ones: gating 2*T*d*E, each assignment 2*d*h per GEMM; forward+backward
counts 3x forward. Bytes: inputs, weights and outputs once (a lower bound).
"""

import pytest
import torch
import torch.nn.functional as F

from sm4 import backends, ops

from .conftest import time_backward
from .shapes import FULL, PAPER, SCALE, tokens

# (T, d, h, E, k): the papers' three settings (benchmarks/shapes.py)
LAYER_SHAPES = {name: (tokens(s), s["d"], s["h"], s["E"], s["k"]) for name, s in PAPER.items()}
GEMM_SHAPES = {
    "cpu": {name: (s["T"], s["d"], s["h"], s["E"], s["k"]) for name, s in SCALE.items() if s["d"] == 1024},
    "cuda": {
        "gpu_T16384_d4096_h14336_E8": (16384, 4096, 14336, 8, 2),
        "gpu_T16384_d4096_h14336_E64": (16384, 4096, 14336, 64, 2),
        **({name: (s["T"], s["d"], s["h"], s["E"], s["k"]) for name, s in SCALE.items()} if FULL else {}),
    },
}
KERNEL_PATHS = ["cpu", "cuda", "triton"]


def scattermoe_mlp():
    """ScatterMoE's public FFN layer class, or the reason it cannot be used here."""
    try:
        from scattermoe.mlp import MLP
    except Exception as error:  # noqa: BLE001 - absent, or present but broken: either way, say why
        return None, f"ScatterMoE is not importable ({type(error).__name__}: {error})"
    return MLP, None


def skip_reason(path, device, op="expert_ffn"):
    if path in ("plain_loop", "dense_mm", "reference"):
        return None
    if path == "scattermoe":
        if op != "expert_ffn":
            return "ScatterMoE's public layer is the FFN (its MLP); no linear-expert layer to compare"
        if device.type != "cuda":
            return "ScatterMoE's kernels are Triton kernels for CUDA devices"
        return scattermoe_mlp()[1]
    if path == "torch_grouped_mm":
        if device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
            return "torch._grouped_mm needs a CUDA device and a torch that has it"
        return None
    if path == "triton" and device.type == "cpu":
        return "triton: CPU tensors would run through the Triton interpreter, a test tool, not a benchmark"
    reasons = backends.BACKENDS[path].not_supported_reasons(op, [torch.empty(0, device=device)], forced=True)
    return f"{path}: {'; '.join(reasons)}" if reasons else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def layer_params(tokens, dim, hidden, experts, device, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(tokens, dim, generator=g),
        torch.randn(dim, experts, generator=g) / dim**0.5,
        torch.randn(experts, dim, hidden, generator=g) / dim**0.5,
        torch.zeros(experts, hidden),
        torch.randn(experts, hidden, dim, generator=g) / hidden**0.5,
        torch.zeros(experts, dim),
    ]
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in tensors]


def plain_loop(x, router, w1, b1, w2, b2, k, ffn=True):
    """A plain per-expert PyTorch MoE layer (the baseline a user would otherwise write)."""
    probs = torch.softmax(x @ router, dim=-1)
    top_gates, top_ids = probs.topk(k, dim=-1)
    out = x.new_zeros(x.shape[0], w2.shape[2] if ffn else w1.shape[2])
    for e in range(w1.shape[0]):
        token, rank = (top_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        y = F.linear(x[token], w1[e].t(), b1[e])
        if ffn:
            y = F.linear(F.gelu(y), w2[e].t(), b2[e])
        out = out.index_add(0, token, top_gates[token, rank, None] * y)
    return out


@pytest.mark.parametrize("mode", ["forward", "backward", "forward_backward"])
@pytest.mark.parametrize("path", ["plain_loop", "reference", *KERNEL_PATHS, "scattermoe"])
@pytest.mark.parametrize("layer", ["moe_ffn", "moe_linear"])
@pytest.mark.parametrize("shape", list(LAYER_SHAPES))
def test_moe_layer(benchmark, record, device, shape, layer, path, mode):
    reason = skip_reason(path, device, op="expert_ffn" if layer == "moe_ffn" else "expert_linear")
    if reason:
        pytest.skip(reason)
    tokens, dim, hidden, experts, k = LAYER_SHAPES[shape]
    x, router, w1, b1, w2, b2 = layer_params(tokens, dim, hidden, experts, device, requires_grad=mode != "forward")
    ffn = layer == "moe_ffn"

    if path == "scattermoe":  # its MLP (no biases) behind the same softmax top-k router
        mlp = scattermoe_mlp()[0](dim, hidden, experts, k, activation=torch.nn.GELU()).to(device)

    def forward():
        if path == "plain_loop":
            return plain_loop(x, router, w1, b1, w2, b2, k, ffn=ffn)
        if path == "scattermoe":
            gates, ids = torch.softmax(x @ router, dim=-1).topk(k, dim=-1)
            return mlp(x, gates, ids)
        if ffn:
            return ops.moe_ffn(x, router, w1, b1, w2, b2, k, backend=path).output
        return ops.moe_linear(x, router, w1, b1, k, backend=path).output

    def run():
        if mode == "forward":
            with torch.no_grad():
                forward()
        else:
            forward().square().mean().backward()
        sync(device)

    if mode == "backward":
        time_backward(benchmark, forward, device)
    else:
        benchmark(run)
    gemm_flops = tokens * k * 2 * dim * hidden * (2 if ffn else 1)
    forward_flops = 2 * tokens * dim * experts + gemm_flops
    weight_bytes = 4 * experts * dim * hidden * (2 if ffn else 1)
    record(f"{layer}_{mode}", shape, path, flops=forward_flops * {"forward": 1, "backward": 2, "forward_backward": 3}[mode],
           bytes_moved=(4 * tokens * dim * 2 + weight_bytes) * (1 if mode == "forward" else 2))


@pytest.mark.parametrize("path", ["dense_mm", "torch_grouped_mm", *KERNEL_PATHS])
@pytest.mark.parametrize("shape", sorted({name for shapes in GEMM_SHAPES.values() for name in shapes}))
def test_grouped_gemm(benchmark, record, device, shape, path):
    shapes = GEMM_SHAPES[device.type]
    if shape not in shapes:
        pytest.skip(f"{shape} is a {'GPU' if device.type == 'cpu' else 'CPU'} shape")
    reason = skip_reason(path, device, op="grouped_linear")
    if reason:
        pytest.skip(reason)
    tokens, dim, hidden, experts, k = shapes[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = tokens * k
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, dim, generator=g, device=device, dtype=dtype)
    if path == "dense_mm":
        weight = torch.randn(dim, hidden, generator=g, device=device, dtype=dtype)
        benchmark(lambda: (x @ weight, sync(device)))
    else:
        weight = torch.randn(experts, dim, hidden, generator=g, device=device, dtype=dtype)
        # balanced routing with some spread: expert sizes rows/E +- 25 %
        sizes = torch.full((experts,), rows // experts)
        sizes[: experts // 2] += rows // experts // 4
        sizes[experts // 2 : experts // 2 * 2] -= rows // experts // 4
        sizes[-1] += rows - int(sizes.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(device)
        if path == "torch_grouped_mm":
            ends = offsets[1:].to(torch.int32)
            benchmark(lambda: (torch._grouped_mm(x, weight, offs=ends), sync(device)))
        else:
            benchmark(lambda: (ops.grouped_linear(x, weight, None, offsets, backend=path), sync(device)))
    element = x.element_size()
    record("grouped_gemm", shape, path, flops=2 * rows * dim * hidden,
           bytes_moved=element * (rows * dim + rows * hidden + (1 if path == "dense_mm" else experts) * dim * hidden))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", list(LAYER_SHAPES))
def test_moe_qkv(benchmark, record, device, shape, mode, path, fused):
    reason = skip_reason(path, device, op="expert_linear")
    if reason:
        pytest.skip(reason)
    tokens, dim, _, experts, k = LAYER_SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=g).to(device).requires_grad_(mode != "forward")
    routers = [(torch.randn(dim, experts, generator=g) / dim**0.5).to(device).requires_grad_(mode != "forward") for _ in range(3)]
    weights = (torch.randn(3, experts, dim, dim, generator=g) / dim**0.5).to(device).requires_grad_(mode != "forward")

    def run():
        if mode == "forward":
            with torch.no_grad():
                ops.moe_qkv(x, routers, weights, None, k, fused=fused, backend=path)
        else:
            ops.moe_qkv(x, routers, weights, None, k, fused=fused, backend=path)[0].square().mean().backward()
        sync(device)

    benchmark(run)
    forward_flops = 3 * (2 * tokens * dim * experts + tokens * k * 2 * dim * dim)
    record(f"moe_qkv_{mode}", shape, f"{path}/{'fused' if fused else 'unfused'}",
           flops=forward_flops * (1 if mode == "forward" else 3), bytes_moved=4 * (tokens * dim * 4 + weights.numel()))
