"""Issue 13, gating and glue: the glue of sm4's CPU MoE layers before and after, in one process.

    python -m benchmarks.glue_ab [threads] [rounds]
    python -m benchmarks.glue_ab encoder [threads] [rounds]   # the SM4EncoderLayer targets
    python -m benchmarks.glue_ab ffn [threads] [rounds]       # moe_ffn: FFN experts + combine, one node

Each round runs, back to back, the ``torch_grouped_mm`` peer, ``sm4.ops.moe_linear`` /
``moe_qkv`` as they are now (``after``), and ``before``: the same layer rebuilt from the pieces
it used before the glue changes (each sub-op's argument checks run again, the gating through its
autograd wrapper even under no_grad, the balance terms' autograd.Function, the linear experts and
the combine as separate autograd nodes). The kernels are the same, so the difference is the glue.
(The gating backward's cheaper finite check is shared by both: it is registered once.)
Printed: medians of bursts of calls, after / before, and each over the peer, forward (no_grad)
and forward+backward, at the papers' medium and large shapes. Not a pytest benchmark.
"""

import os
import statistics
import sys
import time

import torch

from sm4 import dispatch, ops
from sm4._checks import Checker, check_metadata_values, trust_metadata
from sm4.compiled import grouped_gemm as compiled_gemm
from sm4.grouped import GroupedKernels, combine, make_layers
from sm4.routing import BalanceTerms
from sm4.types import MoEOutput, RoutingResult

from . import bench_peer as bp
from .peers import torch_grouped_mm as peer

_linear_rows = make_layers(GroupedKernels(compiled_gemm.grouped_mm, compiled_gemm.grouped_weight_grad))[0]
# The FFN experts as rows (ExpertFFN, with the fused fp32 backward op) then combine: moe_ffn before
# its one-node ExpertFFNCombine.
_ffn_rows = make_layers(GroupedKernels(compiled_gemm.grouped_mm, compiled_gemm.grouped_weight_grad,
                                       compiled_gemm.ffn_backward))[1]


def _before_gating(x, router_weight, k):
    c = Checker("sm4.ops.topk_gating")
    ops._check_gating(c, x, router_weight, k, None, 1.0, False, False, None, None)
    dispatch.select("topk_gating", {"x": x, "router_weight": router_weight, "noise": None}, "cpu",
                    {"T": x.shape[0], "d": x.shape[1], "E": router_weight.shape[1], "k": k})
    gates, ids, entropy, importance, load, counts, _, _ = torch.ops.sm4.topk_gating_forward(
        x, router_weight, None, None, k, 0.0, False)
    importance_loss, load_loss = BalanceTerms.apply(importance, load)
    return RoutingResult(ids, gates, entropy.detach(), counts, importance, load, importance_loss, load_loss)


def _before_metadata(ids, experts):
    c = Checker("sm4.ops.routing_metadata")
    ops._check_expert_ids(c, ids, experts)
    _, impl = dispatch.select("routing_metadata", (ids,), "cpu", {"E": experts})
    metadata = impl(ids, experts)
    trust_metadata(metadata)
    return metadata


def _before_expert_linear(x, weight, bias, gates, metadata, check=True):
    if check:
        c = Checker("sm4.ops.expert_linear")
        ops._check_expert_inputs(c, x, gates, metadata, [("weight", weight, "(E, in, out)", "bias", bias, "(E, out)")])
        check_metadata_values(c, metadata)
    dispatch.select("expert_linear", (x, weight, bias, gates, metadata.sorted_token), "cpu")
    rows = _linear_rows(x, weight, bias, metadata.expert_offsets, metadata.sorted_token, metadata.sorted_assignment,
                        metadata.sorted_assignment.shape[0])
    return combine(rows, gates.reshape(-1, gates.shape[-1])).view(*gates.shape[:-1], rows.shape[1])


def before_moe_linear(x, router_weight, weight, bias, k):
    c = Checker("sm4.ops.moe_linear")
    ops._checked_gating_input(c, x, None, router_weight, k, None, 1.0, False, False, None, None)
    c.tensor("weight", weight, "(E, d, out)", ops.FLOAT_DTYPES)
    c.tensor("bias", bias, "(E, out)", ops.FLOAT_DTYPES, optional=True)
    routing = _before_gating(x, router_weight, k)
    metadata = _before_metadata(routing.expert_ids, router_weight.shape[1])
    return MoEOutput(_before_expert_linear(x, weight, bias, routing.gates, metadata), routing)


def before_moe_qkv(x, routers, weights, biases, k):
    c = Checker("sm4.ops.moe_qkv")
    c.tensor("x", x, "(T, d)", ops.FLOAT_DTYPES)
    for name, router in zip("qkv", routers):
        c.tensor(f"routers ({name})", router, "(d, E)", ops.FLOAT_DTYPES)
    c.tensor("weights", weights, "(3, E, d, C)", ops.FLOAT_DTYPES)
    c.tensor("biases", biases, "(3, E, C)", ops.FLOAT_DTYPES, optional=True)
    experts = weights.shape[1]
    routings = [_before_gating(x, router, k) for router in routers]
    ids = torch.cat([torch.where(r.expert_ids >= 0, r.expert_ids + g * experts, -1) for g, r in enumerate(routings)], 1)
    metadata = _before_metadata(ids, 3 * experts)
    gates = torch.stack([r.gates for r in routings], 1)
    out = _before_expert_linear(x, weights.reshape(3 * experts, *weights.shape[2:]),
                                biases.reshape(3 * experts, biases.shape[2]), gates, metadata, check=False)
    return out, routings


def before_moe_ffn(x, router_weight, w1, b1, w2, b2, k):
    """moe_ffn as it is now up to the experts, then the FFN rows and the combine as two nodes."""
    c = Checker("sm4.ops.moe_ffn")
    ops._checked_gating_input(c, x, None, router_weight, k, None, 1.0, False, False, None, None)
    for name, t, shape in (("w1", w1, "(E, d, h)"), ("b1", b1, "(E, h)"), ("w2", w2, "(E, h, out)"), ("b2", b2, "(E, out)")):
        c.tensor(name, t, shape, ops.FLOAT_DTYPES, optional=name[0] == "b")
    routing = ops._run_gating(x, router_weight, k, None, 1.0, False, False, None, None, "cpu")
    metadata = ops._run_metadata(routing.expert_ids, router_weight.shape[1], None, "cpu")
    rows = _ffn_rows(x, w1, b1, w2, b2, metadata.expert_offsets, "gelu", False, metadata.sorted_token,
                     metadata.sorted_assignment, metadata.sorted_assignment.shape[0])
    return MoEOutput(combine(rows, routing.gates), routing)


def _paths(layer, tensors, k):
    if layer == "moe_ffn":
        return {"peer": lambda: peer.LAYERS[layer](*tensors, k),
                "before": lambda: before_moe_ffn(*tensors, k).output,
                "after": lambda: ops.moe_ffn(*tensors, k, backend="cpu").output}
    if layer == "moe_qkv":
        x, routers, w, b = tensors
        return {"peer": lambda: peer.LAYERS[layer](x, routers.unbind(0), w, b, k),
                "before": lambda: before_moe_qkv(x, tuple(routers.unbind(0)), w, b, k)[0],
                "after": lambda: ops.moe_qkv(x, tuple(routers.unbind(0)), w, b, k, backend="cpu")[0]}
    return {"peer": lambda: peer.LAYERS[layer](*tensors, k),
            "before": lambda: before_moe_linear(*tensors, k).output,
            "after": lambda: ops.moe_linear(*tensors, k, backend="cpu").output}


def interleaved_medians(runs: dict, rounds: int, burst: int) -> dict:
    """{name: median seconds per call}: each round runs every path once, a burst of calls each, in
    turn (so all paths share the machine's load); the first round only warms up."""
    seconds = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(burst):
                run()
            if r:
                seconds[name].append((time.perf_counter() - start) / burst)
    return {name: statistics.median(v) for name, v in seconds.items()}


def main(threads=1, rounds=7, burst=10, layers=("moe_linear", "moe_qkv"), shapes=("medium", "large")):
    torch.set_num_threads(threads)
    print(f"threads {threads}, load average {os.getloadavg()[0]:.1f}")
    for layer in layers:
        for shape in shapes:
            for mode in ("forward", "forward_backward"):
                k = bp.SHAPES[shape][4]
                tensors = bp._params(layer, shape, torch.float32, mode != "forward")
                runs = {name: bp._runner(call, mode) for name, call in _paths(layer, tensors, k).items()}
                m = interleaved_medians(runs, rounds, burst)
                print(f"{layer:10s} {shape:6s} {mode:16s} before {m['before'] * 1e3:6.2f} ms  after {m['after'] * 1e3:6.2f} ms"
                      f"  peer {m['peer'] * 1e3:6.2f} ms  after/before {m['after'] / m['before']:.3f}"
                      f"  before/peer {m['before'] / m['peer']:.3f}  after/peer {m['after'] / m['peer']:.3f}", flush=True)


def encoder_layer(threads=1, rounds=7, burst=3, shape="medium"):
    """SM4EncoderLayer forward+backward (train mode) beside the plain-loop and torch_grouped_mm layers
    of benchmarks/bench_layers.py, interleaved (issue 13 targets: >= 5x and >= 1.5x)."""
    from sm4.modules import collect_aux_loss
    from sm4.modules.encoder import SM4EncoderLayer

    from .bench_layers import DROPOUT, SHAPES, PlainLoopEncoderLayer
    from .peers.swap import use_torch_grouped_mm_experts

    torch.set_num_threads(threads)
    batch, length, dim, heads, hidden, experts, k = SHAPES[shape]
    layers = {}
    for path in ("plain_loop", "torch_grouped_mm", "cpu"):
        torch.manual_seed(0)
        layer = SM4EncoderLayer(dim, heads, hidden, dropout=DROPOUT, batch_first=True, num_experts=experts, top_k=k,
                                balance_loss_weight=0.05, backend="cpu")
        if path == "torch_grouped_mm":
            use_torch_grouped_mm_experts(layer)
        layers[path] = (PlainLoopEncoderLayer(layer) if path == "plain_loop" else layer).train()
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(1)).requires_grad_(True)

    def runner(path, layer):
        def run():
            y = layer(x)
            aux = layer.aux_loss if path == "plain_loop" else collect_aux_loss(layer)
            (y.square().mean() + aux).backward()
        return run

    m = interleaved_medians({path: runner(path, layer) for path, layer in layers.items()}, rounds, burst)
    print(f"encoder layer {shape} fwd+bwd, threads {threads}, load {os.getloadavg()[0]:.1f}: "
          + "  ".join(f"{n} {t * 1e3:.2f} ms" for n, t in m.items())
          + f"  plain_loop/cpu {m['plain_loop'] / m['cpu']:.2f}x  torch_grouped_mm/cpu {m['torch_grouped_mm'] / m['cpu']:.2f}x",
          flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["encoder"]:
        encoder_layer(*(int(a) for a in sys.argv[2:4]))
    elif sys.argv[1:2] == ["ffn"]:  # moe_ffn: the FFN experts and combine as one node, before / after
        main(*(int(a) for a in sys.argv[2:4]), layers=("moe_ffn",), shapes=("small", "medium", "large"))
    else:
        main(*(int(a) for a in sys.argv[1:3]))
