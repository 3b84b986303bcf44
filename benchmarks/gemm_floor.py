"""The GEMM floor of the FFN experts at each bench_peer shape, interleaved with sm4 and the peer (#13).

Issue #13 asks, for a row whose target (sm4 <= 0.75x the best peer) is not met, for the measured
floor argument. This script times, on the routing sm4 itself makes for bench_peer's inputs (the
same rows per expert), the minimal per-expert GEMM set of ``moe_ffn`` and nothing else:

    forward           X_e @ W1_e (n_e x d x h), H_e @ W2_e (n_e x h x d)
    forward+backward  + dH_e = G_e @ W2_e^T, dW2_e = H_e^T G_e, dW1_e = X_e^T dP_e, dX_e = dP_e @ W1_e^T

in two ways, taking the faster as the floor: ``floor_mm`` (one ``torch.mm(out=)`` per expert and
GEMM on preallocated contiguous operands: no gather, no bias, no GELU, no allocation) and
``floor_grouped`` (one ``F.grouped_mm`` per GEMM over all experts, the peer's kernel alone).
Each round runs, back to back in one process: the two floors, the ``torch_grouped_mm`` peer
(benchmarks/peers), sm4 ``moe_ffn`` (cpu backend) with the fused FFN backward and with the layered
one (``sm4.grouped.FUSED_FFN_BACKWARD``); medians over the rounds, each round a burst of calls.

    python -m benchmarks.gemm_floor [--threads 1 2] [--rounds 15] [--burst 5] [--shapes small medium large]

fp32 only (the fused backward's dtype). Forward is timed under no_grad; forward+backward backs a
dense ones-gradient through the output, as bench_peer does.
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import sm4.grouped
from sm4 import ops

from .bench_peer import SHAPES, _params
from .peers import torch_grouped_mm as peer


def expert_rows(x, router, k, experts):
    """Rows per expert of sm4's own eval routing of these inputs (what its GEMMs see)."""
    routing = ops.topk_gating(x, router, k, backend="cpu")
    return ops.routing_metadata(routing.expert_ids, experts, backend="cpu").expert_counts.tolist()


class GemmSet:
    """Preallocated operands of the per-expert GEMM set (see the module docstring)."""

    def __init__(self, counts, d, h, g):
        mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        e = len(counts)
        self.counts = counts
        self.x = [mk(n, d) for n in counts]
        self.hid = [mk(n, h) for n in counts]
        self.grad = [mk(n, d) for n in counts]
        self.w1, self.w2 = mk(e, d, h), mk(e, h, d)
        self.out_h = [torch.empty(n, h) for n in counts]
        self.out_d = [torch.empty(n, d) for n in counts]
        self.dw1, self.dw2 = torch.empty(e, d, h), torch.empty(e, h, d)
        # the same operands, concatenated in expert order, for F.grouped_mm
        self.offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        self.x_all, self.hid_all, self.grad_all = torch.cat(self.x), torch.cat(self.hid), torch.cat(self.grad)

    def mm(self, backward):
        for e, n in enumerate(self.counts):
            if n == 0:
                continue
            torch.mm(self.x[e], self.w1[e], out=self.out_h[e])
            torch.mm(self.hid[e], self.w2[e], out=self.out_d[e])
            if backward:
                torch.mm(self.grad[e], self.w2[e].t(), out=self.out_h[e])
                torch.mm(self.hid[e].t(), self.grad[e], out=self.dw2[e])
                torch.mm(self.x[e].t(), self.hid[e], out=self.dw1[e])
                torch.mm(self.hid[e], self.w1[e].t(), out=self.out_d[e])

    def grouped(self, backward):
        F.grouped_mm(self.x_all, self.w1, offs=self.offs)
        F.grouped_mm(self.hid_all, self.w2, offs=self.offs)
        if backward:
            F.grouped_mm(self.grad_all, self.w2.transpose(1, 2), offs=self.offs)
            F.grouped_mm(self.hid_all.t(), self.grad_all, offs=self.offs)
            F.grouped_mm(self.x_all.t(), self.hid_all, offs=self.offs)
            F.grouped_mm(self.hid_all, self.w1.transpose(1, 2), offs=self.offs)


def _timed(fn, burst):
    start = time.perf_counter()
    for _ in range(burst):
        fn()
    return (time.perf_counter() - start) / burst


def measure(shape, threads, rounds, burst):
    """{path: median seconds} for forward and forward_backward at one shape and thread count."""
    torch.set_num_threads(threads)
    t, d, h, e, k = SHAPES[shape]
    results = {}
    for mode in ("forward", "forward_backward"):
        grad = mode != "forward"
        tensors = _params("moe_ffn", shape, torch.float32, grad)
        gemms = GemmSet(expert_rows(tensors[0].detach(), tensors[1].detach(), k, e), d, h, torch.Generator().manual_seed(2))

        def layer(fn):
            def run():
                if not grad:
                    with torch.no_grad():
                        fn()
                    return
                out = fn()
                out.backward(torch.ones_like(out))
            return run

        def sm4_with(flag):
            def run():
                sm4.grouped.FUSED_FFN_BACKWARD = flag
                layer(lambda: ops.moe_ffn(*tensors, k, backend="cpu").output)()
            return run

        paths = {"floor_mm": lambda: gemms.mm(grad), "floor_grouped": lambda: gemms.grouped(grad),
                 "peer": layer(lambda: peer.moe_ffn(*tensors, k)), "sm4_fused": sm4_with(True),
                 "sm4_layered": sm4_with(False)}
        if not grad:
            paths.pop("sm4_layered")  # the forward does not depend on the switch
        seconds = {name: [] for name in paths}
        for run in paths.values():  # warm-up
            run()
        for _ in range(rounds):
            for name, run in paths.items():
                seconds[name].append(_timed(run, burst))
        sm4.grouped.FUSED_FFN_BACKWARD = True
        results[mode] = {name: statistics.median(v) for name, v in seconds.items()}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["small", "medium", "large"], choices=list(SHAPES))
    args = parser.parse_args(argv)
    print(f"load: {os.getloadavg()}")
    print("shape | threads | mode | floor (ms) | peer | sm4 fused | sm4 layered | fused/peer | layered/peer | "
          "fused/floor | peer/floor")
    for threads in args.threads:
        for shape in args.shapes:
            for mode, r in measure(shape, threads, args.rounds, args.burst).items():
                floor = min(r["floor_mm"], r["floor_grouped"])
                layered = r.get("sm4_layered", r["sm4_fused"])
                ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
                print(f"{shape} | {threads} | {mode} | {ms(floor)} ({'mm' if r['floor_mm'] <= r['floor_grouped'] else 'grouped'})"
                      f" | {ms(r['peer'])} | {ms(r['sm4_fused'])} | {ms(layered)} | {r['sm4_fused'] / r['peer']:.2f} | "
                      f"{layered / r['peer']:.2f} | {r['sm4_fused'] / floor:.2f} | {r['peer'] / floor:.2f}", flush=True)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main()
