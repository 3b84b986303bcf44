"""benchmarks/gpu_roofline.py: the predicted H100 roofline fractions (pure arithmetic) and the
comparison of a GPU run's benchmark JSON with them."""

import json
from pathlib import Path

import pytest

from benchmarks import gpu_roofline as roof

ROOT = Path(__file__).resolve().parent.parent


def test_grouped_gemm_bytes_and_flops_at_the_scale_shape():
    # Down-projection h -> d at T = 16384, k = 2, E = 64, bf16: a, every expert's weight and out once.
    kernel = roof.cuda_grouped_mm(roof.SCALE, up=False)
    rows, d, h, experts = 32768, 1024, 4096, 64
    assert kernel.flops == 2 * rows * d * h
    assert kernel.bytes == 2 * (rows * h + experts * h * d + rows * d)
    assert kernel.unit == "tensor"
    # 275 GFLOP at 989 TFLOP/s is 278 us; 832 MiB at 3.35 TB/s is 260 us: compute-bound, barely.
    assert kernel.bound(roof.H100) == "compute"
    assert kernel.roofline_s(roof.H100) == pytest.approx(2 * rows * d * h / 989e12)


@pytest.mark.parametrize("gpu", [roof.H100, roof.H200], ids=["h100", "h200"])
def test_every_prediction_is_no_faster_than_its_roofline(gpu):
    kernels = roof.kernel_table(gpu)
    assert len(kernels) > 40
    for k in kernels:
        assert k.roofline_s(gpu) == max(k.flops / k.peak(gpu), k.bytes / gpu.hbm), k.name
        assert k.predicted_s(gpu) > k.roofline_s(gpu), k.name
        assert 0 < k.fraction(gpu) < 1, k.name
    for p in roof.benchmark_predictions(gpu):
        assert p.predicted_s(gpu) >= p.roofline_s(gpu) > 0, (p.op, p.shape, p.backend)


def test_h200_bandwidth_speeds_up_memory_bound_kernels_only():
    permute = roof.triton_permute(roof.SCALE)
    gemm = roof.triton_grouped_mm(roof.GEMM_GPU_E8)
    assert permute.bound(roof.H100) == "memory" and gemm.bound(roof.H100) == "compute"
    assert permute.predicted_s(roof.H200) < 0.8 * permute.predicted_s(roof.H100)
    assert gemm.predicted_s(roof.H200) == pytest.approx(gemm.predicted_s(roof.H100), rel=0.05)


def test_cuda_gating_forward_cannot_reach_the_copy_roofline():
    # 2 E FLOPs per x element in fp32 SIMT: above the fp32 ridge (67 / 3.35 = 20 FLOP/B) at E = 64,
    # so the kernel is compute-bound however well it streams x; the tensor-core Triton path is not.
    cuda = roof.cuda_gating_forward(roof.GATING_GPU)
    triton = roof.triton_gating_forward(roof.GATING_GPU)
    copy_s = roof.GATING_GPU.T * roof.GATING_GPU.d * 2 / roof.H100.hbm
    assert cuda.bound(roof.H100) == "compute" and cuda.unit == "fp32"
    assert cuda.predicted_s(roof.H100) > 5 * copy_s
    assert triton.bound(roof.H100) == "memory"
    assert triton.predicted_s(roof.H100) < cuda.predicted_s(roof.H100) / 3


def test_cuda_gating_forward_tiling_follows_the_kernel():
    # ForwardTiling in topk_gating.cu: 8 tokens a warp (64 a block), 4 (32) once a lane holds 8
    # experts (E > 128); the experts a lane holds are rounded up to 1, 2, 4 or 8.
    assert roof._gating_forward_tiling(64) == (2, 8)
    assert roof._gating_forward_tiling(32) == (1, 8)
    assert roof._gating_forward_tiling(96) == (4, 8)
    assert roof._gating_forward_tiling(256) == (8, 4)
    # E = 64: 16 FFMA, 2 + 8 / 2 LDS and the overhead per row, 29 instructions at 4 a clock: the
    # sm_90 SASS's 32 FFMA in 58 instructions per two rows, issue-bound at 16 / 29 of the FMA peak.
    kernel = roof.cuda_gating_forward(roof.SCALE)
    assert "55% of FMA peak" in kernel.why and "256 times" in kernel.why  # W from L2 once per 64 tokens
    assert 0.3 < kernel.fraction(roof.H100) < 16 / 29
    # Twice the feature dimension: twice the tiles, the same routing tail: nearly twice the time.
    wide = roof.Shape("wide", roof.SCALE.T, 2 * roof.SCALE.d, roof.SCALE.h, 64, 2)
    assert 1.7 < roof.cuda_gating_forward(wide).predicted_s(roof.H100) / kernel.predicted_s(roof.H100) < 2


def test_cuda_row_kernels_use_a_lane_group_and_16_byte_vectors():
    # permutation.cu's RowLayout: d = 64 bf16 is 8 chunks of 16 bytes on 8 lanes (32 rows a
    # block); d = 1024 bf16 is 128 chunks on a warp; an odd row falls back to elements.
    assert roof.row_layout(roof.Shape("d64", 1, 64, 1, 8, 2, "bf16")) == roof.RowLayout(8, 16, 8)
    assert roof.row_layout(roof.SCALE) == roof.RowLayout(128, 16, 32)
    odd = roof.Shape("odd", 1024, 63, 1, 8, 2, "bf16")
    assert roof.row_layout(odd) == roof.RowLayout(63, 2, 32)
    # With 16-byte vectors the row kernels keep enough bytes in flight for the HBM cap, close to
    # the Triton kernels; scalar 2-byte elements do not.
    for build in (roof.cuda_permute, roof.cuda_combine, roof.cuda_unpermute_backward):
        assert build(roof.SCALE).efficiency == pytest.approx(0.85), build.__name__
        assert build(roof.Shape("odd", roof.SCALE.T, 1023, 1, 64, 2, "bf16")).efficiency < 0.5, build.__name__
    assert roof.cuda_permute(roof.SCALE).fraction(roof.H100) > 0.9 * roof.triton_permute(roof.SCALE).fraction(roof.H100)


def test_wider_experts_move_the_gemm_weights_out_of_l2():
    # E = 8 experts of 4096 x 14336 bf16 (112 MiB each) do not fit in L2: the CUDA kernel's
    # tile-major order re-reads them per group of concurrent row tiles, Triton's GROUP_M = 8 less.
    s = roof.GEMM_GPU_E8
    once = s.E * s.d * s.h * 2
    cuda = roof._weight_reads(s, 128, 128, s.d, s.h, 2 * roof.H100.sms, None)
    triton = roof._weight_reads(s, 128, 128, s.d, s.h, roof.H100.sms, 8)
    assert cuda > triton > once
    small = roof.SCALE  # 8 MiB per expert: read once
    assert roof._weight_reads(small, 128, 128, small.d, small.h, 264, None) == small.E * small.d * small.h * 2


def _result(op, shape, backend, median, device="cuda:0"):
    return {"name": f"test_{op}[{shape}-{backend}]", "stats": {"median": median},
            "extra_info": {"op": op, "shape": shape, "backend": backend, "device": device}}


def test_compare_puts_measured_beside_predicted():
    shape = "gpu_T16384_d4096_h14336_E8"
    predicted = next(p for p in roof.benchmark_predictions(roof.H100)
                     if (p.op, p.shape, p.backend) == ("grouped_gemm", shape, "cuda"))
    measured = 2 * predicted.predicted_s(roof.H100)
    results = {"benchmarks": [
        _result("grouped_gemm", shape, "cuda", measured),
        _result("grouped_gemm", shape, "triton", 0.01, device="cpu"),  # a CPU row: not a GPU measurement
        _result("no_such_op", shape, "cuda", 1.0),
        {"name": "untimed", "stats": None, "extra_info": {"op": "grouped_gemm", "shape": shape, "backend": "triton"}},
    ]}
    text = roof.compare(results, roof.H100)
    lines = [line for line in text.splitlines() if line.startswith("grouped_gemm")]
    assert len(lines) == 1 and " cuda " in lines[0]
    assert "2.00" in lines[0]  # measured / predicted
    fraction = predicted.roofline_s(roof.H100) / measured
    assert f"{fraction:.1%}" in lines[0]
    assert "no GPU benchmark row" in roof.compare({"benchmarks": []}, roof.H100)


def test_cli_prints_the_tables(tmp_path, capsys):
    assert roof.main(["kernels", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| kernel |") and "cuda grouped_mm_tc_kernel<bf16,128>" in out
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": [_result("permute_unpermute_forward", roof.SCALE.name, "triton", 1e-4)]}))
    assert roof.main(["compare", str(path), "--gpu", "h200"]) == 0
    assert "H200" in capsys.readouterr().out


def test_predicted_rows_name_real_benchmarks():
    # The (op, shape) keys must be the ones benchmarks/*.py record, or compare() matches nothing.
    sources = {p.name: p.read_text() for p in (ROOT / "benchmarks").glob("bench_*.py")}
    text = "\n".join(sources.values()) + (ROOT / "benchmarks" / "shapes.py").read_text()
    for p in roof.benchmark_predictions(roof.H100):
        op = p.op.replace("_forward_backward", "_{mode}").replace("_forward", "_{mode}")
        assert p.op in text or op in text, p.op
        assert p.shape in text or p.shape.startswith("scale_T16384_d1024_E64_k2"), p.shape


def test_shared_memory_caps_the_wmma_warp_tiles():
    # 32 x 64 warp tile: 3 KiB of fragments per 64 KFLOP -> 2/3 of the tensor peak; 32 x 32: 1/2.
    assert roof.smem_cap(32, 64) == pytest.approx(2 / 3)
    assert roof.smem_cap(32, 32) == pytest.approx(1 / 2)
    # Fewer than 128 rows per expert on average: BM = 64 tiles, 32 x 32 warp tiles, a lower rate.
    sparse = roof.Shape("sparse", 2048, 1024, 4096, 64, 2)  # 64 rows per expert
    assert roof.cuda_grouped_mm(sparse).name.startswith("cuda grouped_mm_tc_kernel<bf16,64>")
    assert roof._wmma_efficiency(32, 1000, 264, warp_n=32) < roof._wmma_efficiency(32, 1000, 264, warp_n=64)
    # ... but 64 rows per expert make it weight-streaming (memory) bound: 64 FLOP/B < the 295 ridge.
    assert roof.cuda_grouped_mm(sparse).bound(roof.H100) == "memory"


def test_bf16_and_fp16_wmma_share_one_prediction():
    # Both 16-bit dtypes load WMMA fragments with LDSM (bf16 through SM4_WMMA_LOAD_SHARED; equal
    # HMMA / LDSM counts, no MOVM: tests/test_cuda_codegen.py): same shape, same predicted time.
    fp16 = roof.Shape(roof.SCALE.name, 16384, 1024, 4096, 64, 2, "fp16")
    assert roof.cuda_grouped_mm(roof.SCALE, up=False).predicted_s(roof.H100) == pytest.approx(
        roof.cuda_grouped_mm(fp16, up=False).predicted_s(roof.H100))
    assert roof.cuda_weight_grad(roof.SCALE).efficiency == pytest.approx(roof.cuda_weight_grad(fp16).efficiency)
    assert "MOVM" not in roof.cuda_grouped_mm(roof.SCALE).why
