"""Predicted H100 roofline fractions of sm4's GPU kernels, from reading their code (issue #14).

Pure arithmetic: no GPU, no torch. For each kernel (CUDA in csrc/cuda/*.cu, Triton in kernels/*.py)
at a shape it gives the HBM bytes and FLOPs, the roofline time max(FLOPs / peak, bytes / HBM) on
the pipe the code uses (tensor cores for bf16/fp16 MMA, fp32 FMA for SIMT code), and a predicted
time = roofline / efficiency + launches x ``LAUNCH_S``, where ``efficiency`` is derived from the
code (tile, threads, shared-memory traffic, pipelining, occupancy, tail) and ``why`` says how.
Predicted fraction = roofline / predicted. BENCHMARKS.md ("GPU: predicted roofline fractions")
explains every assumption.

``compare`` puts the benchmark JSON of a GPU run (benchmarks/gpu_session.sh) beside the
predictions: for each benchmark row it knows (op, shape, backend) it prints the measured median,
the predicted time, and the measured and predicted fractions of the same roofline.

    python -m benchmarks.gpu_roofline                      # the prediction table (H100)
    python -m benchmarks.gpu_roofline --gpu h200 --markdown
    python -m benchmarks.gpu_roofline compare results/gpu-.../benchmarks.json --gpu auto
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Gpu:
    name: str
    tensor_flops: float  # dense bf16/fp16 tensor-core peak (wgmma), FLOP/s
    fp32_flops: float  # non-tensor fp32 FMA peak, FLOP/s
    hbm: float  # bytes/s
    l2: float  # bytes, usable L2
    l2_bw: float  # bytes/s, L2 -> SM (an assumption: microbenchmarks put the H100's at ~5.5-7 TB/s)
    sms: int
    smem_per_sm: int  # bytes of shared memory a CTA can use per SM
    clock: float = 1.83e9  # Hz under load (989 TFLOP/s = 132 SMs x 4096 FLOP/clk x 1.83 GHz)


H100 = Gpu("H100 SXM", 989e12, 67e12, 3.35e12, 50e6, 5.5e12, 132, 228 * 1024)
# The lent machines are H200s: the same GH100 compute, HBM3e at 4.8 TB/s.
H200 = Gpu("H200", 989e12, 67e12, 4.8e12, 50e6, 5.5e12, 132, 228 * 1024)
GPUS = {"h100": H100, "h200": H200}

# GPU-side cost of one kernel launch that does almost nothing (launch latency + ramp + drain).
LAUNCH_S = 2.5e-6
# Host-side costs per call on the timed path (eager PyTorch op, sm4 C++ op through the dispatcher
# with its checks and allocations, a Triton launch through torch.library.custom_op, and the
# Python of one sm4.ops call: validation and backend choice). Guesses, to be measured.
HOST_TORCH_OP_S = 5e-6
HOST_EXT_OP_S = 10e-6
HOST_TRITON_S = 20e-6
HOST_SM4_CALL_S = 15e-6
# DRAM bytes in flight an SM needs to keep HBM busy (Little's law: bandwidth x ~700 ns / SMs).
DRAM_LATENCY_S = 700e-9
# mma.sync (what nvcuda::wmma compiles to) on Hopper: microbenchmark studies report roughly two
# thirds of the wgmma dense rate; this is the ceiling of any WMMA kernel on an H100.
MMA_SYNC_CEILING = 0.65
# A load issued after a barrier and waited for before the next (no double buffering): x from HBM
# and W from L2 under load, plus the barriers, in SM cycles (~0.8 us).
TILE_LATENCY_CYCLES = 1500
# gating_forward_kernel (sm_90 SASS): integer, address and predicate instructions per row of a tile
# beside its FFMAs and LDS (58 - 32 - 12 = 14 per two rows at E = 64), and the latency of routing one
# token on a warp: softmax twice, k + 1 rounds of a 5-step shuffle argmax, the entropy sum, the noise
# row's global loads, dependent end to end (an estimate: ~30 cycles a shuffle, ~600 a global load).
ROW_OVERHEAD_INSTRUCTIONS = 7
ROUTE_CYCLES_PER_TOKEN = 2000
GATING_TILE_ROWS = 32  # kTileD in topk_gating.cu: feature rows per staged tile
# WMMA fragments come from shared memory through ldmatrix (LDSM) in both 16-bit dtypes: bf16's
# through SM4_WMMA_LOAD_SHARED (emulation_seams.cuh), fp16's through the library; the sm_90 SASS of
# the bf16 and fp16 tensor-core kernels has the same HMMA and LDSM counts and no MOVM
# (tests/test_cuda_codegen.py), so the two dtypes share one prediction.


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    d: int
    h: int
    E: int
    k: int
    dtype: str = "bf16"

    @property
    def b(self) -> int:  # element bytes of the activations / expert weights
        return 4 if self.dtype == "fp32" else 2

    @property
    def rows(self) -> int:  # N = T * k routed rows
        return self.T * self.k


SCALE = Shape("scale_T16384_d1024_E64_k2", 16384, 1024, 4096, 64, 2, "bf16")
SCALE_FP32 = Shape("scale_T16384_d1024_E64_k2", 16384, 1024, 4096, 64, 2, "fp32")  # what the routing benches run
MEDIUM = Shape("medium", 32 * 24, 64, 128, 32, 2, "fp32")  # the papers' medium setting, as benchmarked
GATING_GPU = Shape("gpu_T16384_d4096_E64_bf16", 16384, 4096, 4 * 4096, 64, 2, "bf16")
GEMM_GPU_E8 = Shape("gpu_T16384_d4096_h14336_E8", 16384, 4096, 14336, 8, 2, "bf16")
GEMM_GPU_E64 = Shape("gpu_T16384_d4096_h14336_E64", 16384, 4096, 14336, 64, 2, "bf16")


@dataclass(frozen=True)
class Kernel:
    name: str
    shape: Shape
    flops: float
    bytes: float  # HBM bytes: each input and output once, plus modelled re-reads
    unit: str  # "tensor" | "fp32": the compute peak of the roofline
    efficiency: float  # predicted fraction of the roofline reached by the work itself
    launches: int = 1
    why: str = ""
    check: str = ""

    def peak(self, gpu: Gpu) -> float:
        return gpu.tensor_flops if self.unit == "tensor" else gpu.fp32_flops

    def roofline_s(self, gpu: Gpu) -> float:
        return max(self.flops / self.peak(gpu), self.bytes / gpu.hbm)

    def bound(self, gpu: Gpu) -> str:
        return "compute" if self.flops / self.peak(gpu) >= self.bytes / gpu.hbm else "memory"

    def predicted_s(self, gpu: Gpu) -> float:
        return self.roofline_s(gpu) / self.efficiency + self.launches * LAUNCH_S

    def fraction(self, gpu: Gpu) -> float:
        return self.roofline_s(gpu) / self.predicted_s(gpu)


def _memory_efficiency(gpu: Gpu, bytes_in_flight_per_sm: float, cap: float = 0.85) -> float:
    """Fraction of HBM bandwidth reached with this many load bytes in flight per SM (Little's law)."""
    needed = gpu.hbm * DRAM_LATENCY_S / gpu.sms
    return min(cap, bytes_in_flight_per_sm / needed)


# ---- CUDA kernels (csrc/cuda) -------------------------------------------------------------------


def _gating_forward_tiling(E: int) -> tuple[int, int]:
    """(EPT, tokens per warp) of gating_forward_kernel: EPT = experts per lane rounded to 1/2/4/8,
    8 tokens a warp (4 for E > 128), so a block of 8 warps holds 64 (32) tokens (ForwardTiling)."""
    ept = next(p for p in (1, 2, 4, 8) if 32 * p >= E)
    return ept, (4 if ept >= 8 else 8)


def cuda_gating_forward(s: Shape, gpu: Gpu = H100, training: bool = True) -> Kernel:
    """gating_forward_kernel: 64 tokens (32 for E > 128) per 256-thread block share each router-weight tile.

    The router weight (d, E) fp32 is staged through shared memory in 32-row tiles (one contiguous
    run, 16-byte copies), so all of it is read from L2 once per block: T / 64 times. Lane slot j of
    a warp accumulates expert lane + 32 j of the warp's TPW tokens in registers. Per row of a tile a
    warp issues EPT shared loads of W, TPW / 2 broadcast LDS.64 of x (the row loop is unrolled by 2)
    and TPW x EPT FFMAs, plus ~ROW_OVERHEAD_INSTRUCTIONS of address and predicate work (sm_90 SASS:
    58 instructions, 32 FFMA and 12 LDS per two rows at E = 64): issue-bound at FFMA / all
    instructions of the FMA peak, the shared pipe close behind. 124 registers: 2 CTAs per SM, whose
    tile loads (x from HBM, W from L2, behind a barrier, no double buffering) are hidden by the other
    CTA's compute when it is longer than TILE_LATENCY_CYCLES. Then each warp routes its TPW tokens
    one after another (dependent shuffles: ~ROUTE_CYCLES_PER_TOKEN each, nothing left to overlap).
    """
    T, d, E, k = s.T, s.d, s.E, s.k
    ept, tpw = _gating_forward_tiling(E)
    tpb = 8 * tpw
    blocks = math.ceil(T / tpb)
    flops = 2.0 * T * d * E
    hbm = T * d * s.b + d * E * 4 + T * E * 4 * (2 if training else 1) + T * k * 12 + T * 12 + blocks * E * 16
    ffma, lds = tpw * ept, ept + tpw / 2  # warp instructions / shared wavefronts per row of a tile
    row_clocks = max((ffma + lds + ROW_OVERHEAD_INSTRUCTIONS) / 4, lds)  # 4 schedulers, 1 LDS wavefront/clk per SM
    core = (ffma / 4) / row_clocks * min(1.0, E / (32 * ept))  # padded expert slots do no useful FMAs
    compute_cycles = GATING_TILE_ROWS * 8 * row_clocks  # one tile of one CTA: 32 rows x 8 warps
    ctas_per_sm = min(2, math.ceil(blocks / gpu.sms))
    rounds = math.ceil(blocks / (2 * gpu.sms))
    tile_clocks = max(ctas_per_sm * compute_cycles, TILE_LATENCY_CYCLES + compute_cycles)
    route_clocks = tpw * ROUTE_CYCLES_PER_TOKEN
    l2_bytes = blocks * d * E * 4
    work_s = max(rounds * (math.ceil(d / GATING_TILE_ROWS) * tile_clocks + route_clocks) / gpu.clock, l2_bytes / gpu.l2_bw)
    roofline = max(flops / gpu.fp32_flops, hbm / gpu.hbm)
    return Kernel("cuda gating_forward_kernel", s, flops, hbm, "fp32", roofline / work_s,
                  why=f"SIMT fp32 router GEMM, {tpb} tokens a block sharing each W tile: issue-bound at {core:.0%} of FMA "
                      f"peak ({ffma} FFMA, {lds:g} LDS wavefronts a row), {ctas_per_sm} CTA(s)/SM; W from L2 {blocks} times "
                      f"({l2_bytes / MiB:.0f} MiB); routing {tpw} tokens a warp serially",
                  check="ncu: FMA pipe ~50 % (issue-bound), shared pipe ~80 %, lts bytes ~= T/64 x d x E x 4")


def _gating_backward_bytes(s: Shape, training: bool) -> float:
    """Saved logits (+ noise) read, d_logits written, ids / d_gates / runner-up read."""
    return s.T * s.E * 4 * (3 if training else 2) + s.T * s.k * 12 + s.T * 8


def _metadata_bytes(s: Shape, sort_block: int) -> float:
    """ids read twice, three (N,) int64 outputs, ~8 passes over the (blocks, E + 1) int64 counts."""
    return 5 * s.rows * 8 + 8 * math.ceil(s.rows / sort_block) * (s.E + 1) * 8


def _small_kernel(s: Shape, backend: str, which: str, training: bool = True) -> Kernel:
    """The latency- or launch-bound routing kernels: gating backward, histogram, metadata sort."""
    n = s.rows
    specs = {
        ("cuda", "gating_backward"): (
            "cuda gating_backward_kernel", _gating_backward_bytes(s, training), 0.45, 1,
            "coalesced (T, E) rows but a serial loop over k with dependent loads and shuffles per warp: latency-bound",
            "dram throughput ~40-50 %"),
        ("triton", "gating_backward"): (
            "triton _gating_backward_kernel", _gating_backward_bytes(s, training), 0.35, 1,
            f"{math.ceil(s.T / 64)} programs, one shot of loads each, no loop to pipeline: latency-bound",
            "dram throughput ~35 %"),
        ("cuda", "histogram"): (
            "cuda expert_histogram (zero + count + scan)", n * 8 + s.E * 24, 0.3, 3,
            f"{min(math.ceil(n / 256), 1024)} blocks of shared-memory atomics, then a one-block cub scan: launch-bound",
            "time ~3 launches, flat from medium to scale"),
        ("triton", "histogram"): (
            "triton expert_histogram (count + scan)", n * 8 + s.E * 24, 0.2, 3,
            f"{math.ceil(n / 1024)} programs of int64 global atomics onto E counters, a one-program scan",
            "launch-bound; atomics serialise on E addresses"),
        ("cuda", "metadata"): (
            "cuda routing_metadata (bin counts, 8 torch ops, scatter)", _metadata_bytes(s, 256), 0.3, 11,
            "two small sort kernels around ~8 torch reductions/cumsums on (blocks, E+1): launch-bound",
            "~11 kernels in nsys; time flat in T"),
        ("triton", "metadata"): (
            "triton routing_metadata (bin counts, torch ops, scatter)", _metadata_bytes(s, 128), 0.3, 10,
            "128-assignment programs (a 128 x 128 compare for the stable rank), torch cumsums between",
            "launch-bound"),
    }
    name, hbm, eff, launches, why, check = specs[(backend, which)]
    return Kernel(name, s, 0.0, hbm, "fp32", eff, launches=launches, why=why, check=check)


def _small(backend: str, which: str):
    def build(s: Shape, gpu: Gpu = H100, training: bool = True) -> Kernel:
        return _small_kernel(s, backend, which, training)

    build.__name__ = f"{backend}_{which}"
    return build


cuda_gating_backward, triton_gating_backward = _small("cuda", "gating_backward"), _small("triton", "gating_backward")
cuda_histogram, triton_histogram = _small("cuda", "histogram"), _small("triton", "histogram")
cuda_routing_metadata, triton_routing_metadata = _small("cuda", "metadata"), _small("triton", "metadata")


@dataclass(frozen=True)
class RowLayout:
    """permutation.cu's row layout: a row of d elements is `chunks` chunks of `chunk_bytes` (16-byte
    vectors when d x element size is a multiple of 16 and the pointers are aligned, which the
    benchmarks' contiguous tensors are; single elements otherwise), moved by a group of `lanes`
    (the smallest power of two >= chunks, at most 32) of a 256-thread block."""
    chunks: int
    chunk_bytes: int
    lanes: int

    @property
    def utilisation(self) -> float:  # lanes busy on the last pass over a row
        return self.chunks / (self.lanes * math.ceil(self.chunks / self.lanes))


def row_layout(s: Shape) -> RowLayout:
    row_bytes = s.d * s.b
    chunk = 16 if row_bytes % 16 == 0 else s.b
    chunks = row_bytes // chunk
    return RowLayout(chunks, chunk, min(32, 1 << max(0, math.ceil(math.log2(max(1, chunks))))))


# Resident threads per SM of the row kernels: 32-48 registers (ptxas, sm_90) let 5-8 blocks of 256
# threads share an SM; 6 (1536 threads, at the 40 registers of the bf16 vector kernels) is assumed.
ROW_THREADS_PER_SM = 1536


def _rows_efficiency(gpu: Gpu, layout: RowLayout, loads_in_flight: float) -> float:
    # Each thread keeps `loads_in_flight` chunk loads outstanding (from the SASS of each kernel).
    return _memory_efficiency(gpu, ROW_THREADS_PER_SM * layout.chunk_bytes * loads_in_flight * layout.utilisation)


def _rows_why(layout: RowLayout, loads: float, eff: float) -> str:
    width = "16-byte vectors" if layout.chunk_bytes == 16 else f"scalar {layout.chunk_bytes}-byte elements"
    return (f"{layout.lanes} lanes a row, {256 // layout.lanes} rows a block, {width}, {loads:g} load(s) in flight a "
            f"thread: {eff:.0%} of HBM by Little's law")


def cuda_permute(s: Shape, gpu: Gpu = H100) -> Kernel:
    """scatter_rows_kernel (a lane group per token, copying it to its k rows) + zero_rows_kernel."""
    hbm = s.T * s.d * s.b + s.rows * s.d * s.b + s.rows * 8
    layout = row_layout(s)
    # SASS: the chunk loop (unrolled by 4) keeps two 16-byte loads ahead of their stores.
    loads = min(2, math.ceil(layout.chunks / layout.lanes))
    eff = _rows_efficiency(gpu, layout, loads)
    return Kernel("cuda permute (scatter_rows + zero_rows)", s, 0.0, hbm, "fp32", eff, launches=2,
                  why=_rows_why(layout, loads, eff), check="dram throughput ~85 %; LDG.E.128 / STG.E.128")


def cuda_combine(s: Shape, gpu: Gpu = H100, weighted: bool = True) -> Kernel:
    """combine_rows_kernel (unpermute, or permute's backward unweighted): a lane group per token."""
    hbm = s.rows * s.d * s.b + s.T * s.d * s.b + s.rows * (12 if weighted else 8)
    layout = row_layout(s)
    # SASS: per chunk, the k ranks' row index and 16-byte loads follow one another (one in flight).
    eff = _rows_efficiency(gpu, layout, 1)
    name = "cuda unpermute (combine_rows)" if weighted else "cuda permute_backward (combine_rows)"
    return Kernel(name, s, 2.0 * s.rows * s.d, hbm, "fp32", eff,
                  why=_rows_why(layout, 1, eff), check="dram throughput ~85 %")


def cuda_unpermute_backward(s: Shape, gpu: Gpu = H100) -> Kernel:
    """unpermute_backward_kernel + the in-range row count (4 torch ops) + zero_rows_kernel."""
    hbm = s.T * s.d * s.b + 2 * s.rows * s.d * s.b + s.rows * 12
    layout = row_layout(s)
    eff = _rows_efficiency(gpu, layout, 2)  # grad_y and y_sorted chunks loaded together
    return Kernel("cuda unpermute_backward (+ active count, zero_rows)", s, 2.0 * s.rows * s.d, hbm, "fp32", eff,
                  launches=6,
                  why=_rows_why(layout, 2, eff) + "; the gate dot a shuffle butterfly within the group (no barriers)",
                  check="dram throughput ~85 %")


def smem_cap(warp_m: int, warp_n: int) -> float:
    """Tensor-peak fraction that shared-memory bandwidth allows a warp tile fed by fragment loads.

    Per k16 step a warp loads 32 (warp_m + warp_n) bytes of fragments for 32 warp_m warp_n FLOPs;
    an SM serves 128 B/clk of shared memory against 4096 dense bf16 FLOP/clk of tensor cores.
    """
    bytes_per_flop = (warp_m + warp_n) / (warp_m * warp_n)
    return min(1.0, 128 / (4096 * bytes_per_flop))


def _wmma_efficiency(k_steps: int, items: int, concurrent: int, warp_n: int = 64) -> float:
    # Warp tile 32 x 64 (BM = 128; 32 x 32 for BM = 64): shared memory (LDSM fragment loads) caps it
    # at 2/3 (1/2) of the tensor peak, about the mma.sync ceiling; both pipes near saturation
    # overlap imperfectly (0.8). Single shared buffer + register prefetch, 2 barriers per K step,
    # 2 CTAs/SM (122-128 registers, ptxas): ~0.75.
    # Epilogue (fp32 staging, scalar 16-bit stores, GELU): ~3 K steps per tile. Waves: tail.
    cap = smem_cap(32, warp_n)
    core = min(MMA_SYNC_CEILING, cap) * 0.8 * 0.75
    epilogue = k_steps / (k_steps + 3)
    waves = items / concurrent
    tail = waves / math.ceil(waves)
    return core * epilogue * tail


def _weight_reads(s: Shape, block_m: int, block_n: int, k: int, n: int, concurrent: int, group_m: int | None) -> float:
    """HBM bytes of the expert weights: once per expert if a row tile group shares them in L2."""
    per_expert = k * n * s.b
    tiles_e = math.ceil(s.rows / s.E / block_m)
    if per_expert * 2 <= H100.l2:
        return s.E * per_expert
    # Too big for L2: re-read by each group of row tiles that run together.
    together = group_m if group_m else max(1.0, concurrent / math.ceil(n / block_n))
    return s.E * per_expert * max(1.0, tiles_e / together)


def _gemm_bytes(s: Shape, k: int, n: int, b: int, preact: bool) -> float:
    """a rows, every expert's (k, n) weight and the output once; the pre-activation too if saved."""
    return s.rows * k * b + s.E * k * n * b + s.rows * n * b * (2 if preact else 1)


def _direction(up: bool, preact: bool | None) -> str:
    return ("d->h" if up else "h->d") + (" +preact" if (up if preact is None else preact) else "")


def cuda_grouped_mm(s: Shape, gpu: Gpu = H100, up: bool = True, preact: bool | None = None) -> Kernel:
    """grouped_mm_tc_kernel<bf16, 128>: 128 x 128 x 32 tiles, 8 warps (4 x 2, 32 x 64 each), WMMA."""
    if s.dtype == "fp32":
        return cuda_grouped_mm_simt(s, gpu, up, preact)
    k, n = (s.d, s.h) if up else (s.h, s.d)
    bm = 128 if s.rows >= 128 * s.E else 64
    flops = 2.0 * s.rows * k * n
    row_tiles = math.ceil(s.rows / bm) + (s.E if s.rows % (bm * s.E) else 0)
    items = row_tiles * math.ceil(n / 128)
    concurrent = 2 * gpu.sms
    w = _weight_reads(s, bm, 128, k, n, concurrent, None)
    ideal = _gemm_bytes(s, k, n, s.b, up if preact is None else preact)
    eff = _wmma_efficiency(math.ceil(k / 32), items, concurrent, warp_n=64 if bm == 128 else 32)
    modelled = ideal - s.E * k * n * s.b + w
    roofline = max(flops / gpu.tensor_flops, ideal / gpu.hbm)
    # Memory side: the register prefetch keeps one A and one B tile per CTA in flight, 2 CTAs per SM.
    mem_eff = _memory_efficiency(gpu, 2 * (bm + 128) * 32 * s.b)
    work = max(flops / (gpu.tensor_flops * eff), modelled / (gpu.hbm * mem_eff))
    return Kernel(f"cuda grouped_mm_tc_kernel<{s.dtype},{bm}> {_direction(up, preact)}", s, flops, ideal, "tensor",
                  roofline / work, launches=3,
                  why=f"WMMA (mma.sync) m16n16k16 fed by LDSM, smem-bound warp tile, no cp.async/multistage: {eff:.0%} of wgmma peak; "
                      f"weights {w / MiB:.0f} MiB from HBM",
                  check="tensor pipe ~35 %, stalls barrier/long-scoreboard; vs dense_mm (cuBLAS wgmma ~70 %)")


def cuda_grouped_mm_simt(s: Shape, gpu: Gpu = H100, up: bool = True, preact: bool | None = None) -> Kernel:
    """grouped_mm_simt_kernel: 64 x 64 x 16 fp32 tiles, 4 x 4 outputs per thread."""
    k, n = (s.d, s.h) if up else (s.h, s.d)
    flops = 2.0 * s.rows * k * n
    ideal = _gemm_bytes(s, k, n, 4, up if preact is None else preact)
    # 8 scalar LDS (4 of A, 4 of B, strided: not vectorisable) per 16 FMA: half the FMA peak at
    # 1 LDS wavefront/clk vs 4 FMA warp-instructions/clk; single buffer + barriers: x 0.7.
    eff = 0.5 * 0.7
    return Kernel(f"cuda grouped_mm_simt_kernel (fp32) {_direction(up, preact)}", s, flops, ideal, "fp32", eff, launches=3,
                  why="8 LDS per 16 FMA: LDS-bound at 50 % of FMA peak; register prefetch only",
                  check="fp32 pipe ~35 %")


def cuda_weight_grad(s: Shape, gpu: Gpu = H100, up: bool = True) -> Kernel:
    """weight_grad_tc_kernel: a (expert, 128 K, 128 N) output tile per block, 32 rows per step."""
    k, n = (s.d, s.h) if up else (s.h, s.d)
    flops = 2.0 * s.rows * k * n
    ideal = s.rows * (k + n) * s.b + s.E * k * n * s.b
    if s.dtype == "fp32":  # weight_grad_simt_kernel: 64 x 64 tiles, 16 rows per step, as the SIMT forward
        return Kernel("cuda weight_grad_simt_kernel (fp32)", s, flops, ideal, "fp32", 0.5 * 0.7,
                      why="8 LDS per 16 FMA: LDS-bound at 50 % of FMA peak", check="fp32 pipe ~35 %")
    items = s.E * math.ceil(k / 128) * math.ceil(n / 128)
    steps = max(1, math.ceil(s.rows / s.E / 32))
    eff = _wmma_efficiency(steps, items, 2 * gpu.sms) * steps / (steps + 1)  # first load exposed
    return Kernel("cuda weight_grad_tc_kernel", s, flops, ideal, "tensor", eff,
                  why=f"same WMMA core as the forward; {steps} row steps per tile, the first load exposed",
                  check="tensor pipe ~30 %")


# ---- Triton kernels (kernels/) ------------------------------------------------------------------


def triton_gating_forward(s: Shape, gpu: Gpu = H100, training: bool = True) -> Kernel:
    """_gating_forward_kernel: BLOCK_T tokens x BLOCK_E per program (kernels/topk_gating.py _tiles:
    64 tokens up to E = 32, 32 at E = 64, 16 from E = 128, warps for 8 values per thread, so that no
    configuration spills), tl.dot over d in 64-wide chunks (32 from BLOCK_E = 128)."""
    T, d, E, k = s.T, s.d, s.E, s.k
    block_e = max(16, 1 << max(E - 1, 0).bit_length())
    block_t = max(16, min(64, 2048 // block_e))
    programs = math.ceil(T / block_t)
    flops = 2.0 * T * d * E
    hbm = T * d * s.b + d * E * s.b + T * E * 4 * (2 if training else 1) + T * k * 12 + T * 12 + programs * E * 16
    if s.dtype == "fp32":
        unit, eff = "fp32", 0.3  # input_precision="ieee": an FMA dot; 256 programs x 4 warps = 8 warps/SM
        why = "fp32 'ieee' tl.dot is FMA-based; 8 warps per SM hide little latency"
    else:
        unit = "tensor"
        # Memory-bound on tensor cores (mma.sync: 16/32-token tiles are too small for wgmma):
        # 2 programs/SM x ~2 stages x a BLOCK_T x 64 x tile in flight.
        eff = _memory_efficiency(gpu, 2 * 2 * block_t * 64 * s.b, cap=0.75) * min(1.0, programs / (2 * gpu.sms))
        why = f"bf16 tl.dot, {block_t}-token programs ({programs}, <= 2 per SM), pipelined x loads: {eff:.0%} of HBM"
    return Kernel("triton _gating_forward_kernel", s, flops, hbm, unit, eff, why=why,
                  check="bf16: dram throughput (issue #3 asks 80 % of copy)")


def triton_permute(s: Shape, gpu: Gpu = H100) -> Kernel:
    hbm = s.T * s.d * s.b + s.rows * s.d * s.b + s.rows * 8
    return Kernel("triton permute (scatter_rows + zero_padding)", s, 0.0, hbm, "fp32", 0.8, launches=2,
                  why="16 x 256 tiles, 128-bit vector loads, many small programs: near copy rate",
                  check="dram throughput ~80 %")


def triton_combine(s: Shape, gpu: Gpu = H100, weighted: bool = True) -> Kernel:
    hbm = s.rows * s.d * s.b + s.T * s.d * s.b + s.rows * (12 if weighted else 8)
    return Kernel("triton unpermute (_combine_kernel)" if weighted else "triton permute_backward (_combine_kernel)",
                  s, 2.0 * s.rows * s.d, hbm, "fp32", 0.8,
                  why="gathered contiguous row segments, vectorised: near copy rate", check="dram throughput ~80 %")


def triton_unpermute_backward(s: Shape, gpu: Gpu = H100) -> Kernel:
    hbm = s.T * s.d * s.b + 2 * s.rows * s.d * s.b + s.rows * 12
    return Kernel("triton _unpermute_backward_kernel (+ zero_padding)", s, 2.0 * s.rows * s.d, hbm, "fp32", 0.7,
                  launches=2, why=f"{math.ceil(s.T / 16)} programs (not split over d), a pipelined d loop per rank",
                  check="dram throughput ~70 %")


def triton_grouped_mm(s: Shape, gpu: Gpu = H100, up: bool = True, preact: bool | None = None) -> Kernel:
    """_grouped_mm_kernel: 128 x 128 x 64 (bf16), 8 warps, 4 stages, GROUP_M 8."""
    k, n = (s.d, s.h) if up else (s.h, s.d)
    flops = 2.0 * s.rows * k * n
    ideal = _gemm_bytes(s, k, n, s.b, up if preact is None else preact)
    w = _weight_reads(s, 128, 128, k, n, gpu.sms, 8)
    modelled = ideal - s.E * k * n * s.b + w
    if s.dtype == "fp32":
        unit, eff = "fp32", 0.45  # BLOCK_K 32, 3 stages, 'ieee' FMA dot
    else:
        # wgmma fed by cp.async (pointer loads: no TMA) over 4 stages; 4 x 32 KiB of stages = 1 CTA per
        # SM, so the epilogue (bias, GELU, scatter through pointers) is not hidden by a second CTA.
        unit, eff = "tensor", 0.55
    roofline = max(flops / (gpu.tensor_flops if unit == "tensor" else gpu.fp32_flops), ideal / gpu.hbm)
    work = max(roofline / eff, modelled / (gpu.hbm * 0.85))
    return Kernel(f"triton _grouped_mm_kernel ({s.dtype}) {_direction(up, preact)}", s, flops, ideal, unit,
                  roofline / work, launches=12,
                  why=f"tl.dot -> wgmma, 4-stage cp.async pipeline, 1 CTA/SM (128 KiB of stages): ~{eff:.0%}; "
                      "~11 small torch ops build the tile schedule",
                  check="tensor pipe ~55 %; ncu smem per CTA; spills (i14triton)")


def triton_weight_grad(s: Shape, gpu: Gpu = H100, up: bool = True) -> Kernel:
    k, n = (s.d, s.h) if up else (s.h, s.d)
    flops = 2.0 * s.rows * k * n
    ideal = s.rows * (k + n) * s.b + s.E * k * n * s.b
    steps = max(1, math.ceil(s.rows / s.E / (64 if s.b == 2 else 32)))
    eff = (0.55 if s.b == 2 else 0.45) * steps / (steps + 2)  # 3-stage pipeline over a short row loop: fill and drain
    return Kernel(f"triton _grouped_weight_grad_kernel ({s.dtype})", s, flops, ideal, "tensor" if s.b == 2 else "fp32", eff,
                  why=f"128 x 128 output tile, 64-row steps: only {steps} steps per tile, 3-stage fill/drain",
                  check="tensor pipe ~40 %")


def dense_mm(s: Shape, gpu: Gpu = H100) -> Kernel:
    """The benchmark's dense_mm baseline (cuBLAS wgmma), for calibration: ~70 % of peak at these sizes."""
    flops = 2.0 * s.rows * s.d * s.h
    return Kernel("cuBLAS dense_mm (baseline)", s, flops, (s.rows * (s.d + s.h) + s.d * s.h) * s.b, "tensor", 0.7,
                  why="cuBLAS Hopper kernels: wgmma + TMA, warp-specialised", check="calibrates the peak actually reachable")


def kernel_table(gpu: Gpu = H100) -> list[Kernel]:
    """Every kernel at the scale-up shape (bf16) and the medium shape (fp32, as benchmarked)."""
    rows = []
    for s in (SCALE, MEDIUM):
        rows += [cuda_gating_forward(s, gpu), triton_gating_forward(s, gpu),
                 cuda_gating_backward(s, gpu), triton_gating_backward(s, gpu),
                 cuda_histogram(s, gpu), triton_histogram(s, gpu),
                 cuda_routing_metadata(s, gpu), triton_routing_metadata(s, gpu),
                 cuda_permute(s, gpu), triton_permute(s, gpu),
                 cuda_combine(s, gpu), triton_combine(s, gpu),
                 cuda_unpermute_backward(s, gpu), triton_unpermute_backward(s, gpu),
                 cuda_combine(s, gpu, weighted=False), triton_combine(s, gpu, weighted=False),
                 cuda_grouped_mm(s, gpu, up=True), triton_grouped_mm(s, gpu, up=True),
                 cuda_grouped_mm(s, gpu, up=False), triton_grouped_mm(s, gpu, up=False),
                 cuda_weight_grad(s, gpu), triton_weight_grad(s, gpu)]
    rows += [cuda_gating_forward(GATING_GPU, gpu), triton_gating_forward(GATING_GPU, gpu)]
    for s in (GEMM_GPU_E8, GEMM_GPU_E64):
        rows += [dense_mm(s, gpu), cuda_grouped_mm(s, gpu, preact=False), triton_grouped_mm(s, gpu, preact=False)]
    return rows


# ---- benchmark rows: what benchmarks/*.py time, as sums of kernels plus host overhead ------------


@dataclass(frozen=True)
class Prediction:
    op: str
    shape: str
    backend: str
    kernels: tuple[Kernel, ...]
    extra_gpu_s: float  # small torch kernels on the timed path (launch-bound), and big ones not above
    extra_bytes: float  # HBM bytes of those torch kernels (counted in the roofline)
    extra_flops: float  # FLOPs of those torch kernels (cuBLAS fp32 router GEMMs)
    host_s: float

    def roofline_s(self, gpu: Gpu) -> float:
        return sum(k.roofline_s(gpu) for k in self.kernels) + max(self.extra_bytes / gpu.hbm, self.extra_flops / gpu.fp32_flops)

    def predicted_s(self, gpu: Gpu) -> float:
        return max(sum(k.predicted_s(gpu) for k in self.kernels) + self.extra_gpu_s, self.host_s)


def _torch_s(gpu: Gpu, launches: int, bytes_=0.0, flops=0.0, flop_eff=0.6) -> float:
    return launches * LAUNCH_S + bytes_ / (gpu.hbm * 0.85) + flops / (gpu.fp32_flops * flop_eff)


def benchmark_predictions(gpu: Gpu = H100) -> list[Prediction]:
    preds = []
    for s in (SCALE_FP32, MEDIUM):
        for backend, hist, meta, perm, comb, unbwd in (
            ("cuda", cuda_histogram, cuda_routing_metadata, cuda_permute, cuda_combine, cuda_unpermute_backward),
            ("triton", triton_histogram, triton_routing_metadata, triton_permute, triton_combine, triton_unpermute_backward),
        ):
            launch_host = HOST_EXT_OP_S if backend == "cuda" else HOST_TRITON_S
            preds.append(Prediction("expert_histogram", s.name, backend, (hist(s, gpu),), 0.0, 0.0, 0.0,
                                    HOST_SM4_CALL_S + 2 * launch_host + 2 * HOST_TORCH_OP_S))
            preds.append(Prediction("routing_metadata", s.name, backend, (meta(s, gpu),), 0.0, 0.0, 0.0,
                                    HOST_SM4_CALL_S + 2 * launch_host + 10 * HOST_TORCH_OP_S))
            fwd = (perm(s, gpu), comb(s, gpu))
            preds.append(Prediction("permute_unpermute_forward", s.name, backend, fwd, 0.0, 0.0, 0.0,
                                    2 * HOST_SM4_CALL_S + 3 * launch_host + 4 * HOST_TORCH_OP_S))
            # + ones_like, both backwards, and accumulating x.grad (read grad + new, write: 3 x T*d*b).
            acc_bytes = s.T * s.d * s.b * 4
            preds.append(Prediction("permute_unpermute_forward_backward", s.name, backend,
                                    fwd + (unbwd(s, gpu), comb(s, gpu, weighted=False)),
                                    _torch_s(gpu, 6, acc_bytes), acc_bytes, 0.0,
                                    2 * HOST_SM4_CALL_S + 6 * launch_host + 20 * HOST_TORCH_OP_S + 60e-6))
        for backend, fwd_k, bwd_k in (("cuda", cuda_gating_forward, cuda_gating_backward),
                                      ("triton", triton_gating_forward, triton_gating_backward)):
            launch_host = HOST_EXT_OP_S if backend == "cuda" else HOST_TRITON_S
            small = 15  # noise draw, 3 zeros, 3 block sums, the balance terms
            noise_bytes = s.T * s.E * 4
            preds.append(Prediction("topk_gating_forward", s.name, backend, (fwd_k(s, gpu),),
                                    _torch_s(gpu, small, noise_bytes), noise_bytes, 0.0,
                                    HOST_SM4_CALL_S + launch_host + small * HOST_TORCH_OP_S))
            # Backward: two fp32 router GEMMs (2 T d E each) in torch, torch.where over x in fp32, the
            # x / W gradient accumulation, ~25 small ops of the balance terms and autograd.
            big_bytes = s.T * s.d * 4 * 2 + s.T * s.d * 4 * 2 + s.T * s.d * s.b * 3
            gemm_flops = 2 * 2.0 * s.T * s.d * s.E
            preds.append(Prediction("topk_gating_forward_backward", s.name, backend, (fwd_k(s, gpu), bwd_k(s, gpu)),
                                    _torch_s(gpu, small + 25, noise_bytes + big_bytes, gemm_flops),
                                    noise_bytes + big_bytes, gemm_flops,
                                    HOST_SM4_CALL_S + 2 * launch_host + (small + 25) * HOST_TORCH_OP_S + 80e-6))
    gpu_shape = GATING_GPU
    for backend, fwd_k in (("cuda", cuda_gating_forward), ("triton", triton_gating_forward)):
        noise_bytes = gpu_shape.T * gpu_shape.E * 4
        preds.append(Prediction("topk_gating_forward", gpu_shape.name, backend, (fwd_k(gpu_shape, gpu),),
                                _torch_s(gpu, 15, noise_bytes), noise_bytes, 0.0, 100e-6))
    for s in (GEMM_GPU_E8, GEMM_GPU_E64, SCALE):
        name = s.name if s is not SCALE else "scale_T16384_d1024_E64_k2"
        preds.append(Prediction("grouped_gemm", name, "dense_mm", (dense_mm(s, gpu),), 0.0, 0.0, 0.0, 20e-6))
        # grouped_linear (d -> h) has no activation, so no pre-activation is written.
        for backend, mm in (("cuda", cuda_grouped_mm), ("triton", triton_grouped_mm)):
            preds.append(Prediction("grouped_gemm", name, backend, (mm(s, gpu, up=True, preact=False),), 0.0, 0.0, 0.0, 100e-6))
    return preds


# ---- output -------------------------------------------------------------------------------------


def _si(seconds: float) -> str:
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _bytes(b: float) -> str:
    return f"{b / MiB:.1f} MiB" if b >= MiB else f"{b / 1024:.0f} KiB"


def _flops(f: float) -> str:
    return "0" if f == 0 else (f"{f / 1e9:.1f} GFLOP" if f >= 1e8 else f"{f / 1e6:.1f} MFLOP")


def render_kernels(gpu: Gpu = H100, markdown: bool = False) -> str:
    rows = []
    for k in kernel_table(gpu):
        intensity = k.flops / k.bytes if k.bytes else 0.0
        bound = f"{k.bound(gpu)}, {k.unit} ({intensity:.0f} FLOP/B)"
        if markdown:
            rows.append([k.name, k.shape.name, k.shape.dtype, _bytes(k.bytes), _flops(k.flops), bound,
                         f"{_si(k.predicted_s(gpu))} (roofline {_si(k.roofline_s(gpu))})", f"{k.fraction(gpu):.0%}", k.check])
        else:
            rows.append([k.name, k.shape.name, k.shape.dtype, _bytes(k.bytes), _flops(k.flops), bound,
                         _si(k.roofline_s(gpu)), _si(k.predicted_s(gpu)), f"{k.fraction(gpu):.0%}"])
    if markdown:
        head = ["kernel", "shape", "dtype", "bytes", "FLOPs", "bound", f"predicted time on {gpu.name}",
                "predicted fraction", "what the first GPU run should check"]
    else:
        head = ["kernel", "shape", "dtype", "bytes", "FLOPs", "bound", "roofline", "predicted", "fraction"]
    return _render(head, rows, markdown, f"Predicted on {gpu.name}")


def _render(head, rows, markdown, title) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([title, fmt.format(*head)] + [fmt.format(*r) for r in rows])


def compare(results: dict, gpu: Gpu = H100, markdown: bool = False) -> str:
    """Measured (a pytest-benchmark JSON of a GPU run) beside predicted, for the rows predicted."""
    preds = {(p.op, p.shape, p.backend): p for p in benchmark_predictions(gpu)}
    head = ["op", "shape", "backend", "measured", "predicted", "measured/predicted", "fraction measured", "fraction predicted"]
    rows = []
    for bench in results.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench.get("stats")
        pred = preds.get((info.get("op"), info.get("shape"), info.get("backend")))
        if pred is None or not stats or str(info.get("device", "cuda")).startswith("cpu"):
            continue
        measured = stats["median"]
        rows.append([pred.op, pred.shape, pred.backend, _si(measured), _si(pred.predicted_s(gpu)),
                     f"{measured / pred.predicted_s(gpu):.2f}", f"{pred.roofline_s(gpu) / measured:.1%}",
                     f"{pred.roofline_s(gpu) / pred.predicted_s(gpu):.1%}"])
    if not rows:
        return f"no GPU benchmark row matches a prediction ({len(preds)} predicted)"
    return _render(head, sorted(rows), markdown, f"Measured vs predicted on {gpu.name} (roofline: benchmarks/gpu_roofline.py)")


def detect_gpu(name: str) -> Gpu:
    """'h100', 'h200', or 'auto' (torch's device name; H100 when there is no CUDA device)."""
    if name != "auto":
        return GPUS[name]
    try:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except Exception:  # noqa: BLE001 - no torch or no driver: fall back to the issue's H100
        device = ""
    return H200 if "H200" in device else H100


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="kernels", choices=("kernels", "benchmarks", "compare"))
    parser.add_argument("results", nargs="?", help="compare: a --benchmark-json file of a GPU run")
    parser.add_argument("--gpu", default="h100", choices=("h100", "h200", "auto"))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    gpu = detect_gpu(args.gpu)
    if args.command == "kernels":
        print(render_kernels(gpu, args.markdown))
    elif args.command == "benchmarks":
        rows = [[p.op, p.shape, p.kernels[0].shape.dtype, p.backend, _si(p.roofline_s(gpu)), _si(p.predicted_s(gpu)),
                 f"{p.roofline_s(gpu) / p.predicted_s(gpu):.1%}"] for p in benchmark_predictions(gpu)]
        print(_render(["op", "shape", "dtype", "backend", "roofline", "predicted", "fraction"], rows, args.markdown,
                      f"Benchmark rows predicted on {gpu.name}"))
    else:
        if not args.results:
            parser.error("compare needs the benchmark JSON file")
        with open(args.results) as f:
            print(compare(json.load(f), gpu, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
