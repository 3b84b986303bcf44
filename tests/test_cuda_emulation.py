"""The CPU emulation of the CUDA kernels (tests/cuda_emulation): each hazard check fires on a
deliberately broken kernel and stays quiet on a correct one, wmma multiplies correctly, and every
sm4 CUDA kernel gives bit-identical results whatever order each block's threads run in.

Out of the emulation's reach (the kernels use none of them): inline PTX, TMA, wgmma, cp.async."""

import pytest
import torch

from sm4 import ops

from . import cuda_emulation

pytestmark = pytest.mark.skipif(not cuda_emulation.enabled(), reason=f"{cuda_emulation.ENV_SWITCH}=0")


@pytest.fixture(scope="module", autouse=True)
def emulation():
    cuda_emulation.load()
    yield
    cuda_emulation.set_schedule(cuda_emulation.FORWARD)


HAZARDS = {
    "divergent_shuffle": r"reaches __shfl_xor_sync at hazard_kernels.cpp:\d+ while lanes of its warp wait at __shfl_xor_sync",
    "shuffle_reads_exited_lane": r"__shfl_sync: lane 0 reads lane 16",
    "mask_names_exited_lane": r"exited while its warp waits for it at __shfl_xor_sync",
    "divergent_barrier": r"is at __syncthreads at hazard_kernels.cpp:\d+ while others wait at hazard_kernels.cpp:\d+",
    "barrier_against_collective": r"deadlock: no thread can proceed",
    "shared_out_of_bounds": r"a write past the end of the dynamic shared memory \(256 bytes",
    "static_shared_out_of_bounds": r"hazard_kernels.cpp:\d+: index 64 out of bounds for type 'float \[64\]'",
    "wmma_misaligned": r"wmma pointer is not 256-bit aligned",
}


@pytest.mark.parametrize("name", sorted(HAZARDS))
def test_each_hazard_check_fires_on_its_broken_kernel(name):
    import re

    message = torch.ops.cuda_emulation.run_hazard_kernel(name)
    assert re.search(HAZARDS[name], message), message


def test_a_correct_kernel_raises_no_hazard():
    assert torch.ops.cuda_emulation.run_hazard_kernel("shared_in_bounds") == ""


def test_schedule_perturbation_exposes_a_missing_barrier():
    results = {}
    for order in (cuda_emulation.FORWARD, cuda_emulation.REVERSE, cuda_emulation.RANDOM):
        cuda_emulation.set_schedule(order, seed=3)
        results[order] = (torch.ops.cuda_emulation.neighbour_exchange(64, False),
                          torch.ops.cuda_emulation.neighbour_exchange(64, True))
    cuda_emulation.set_schedule(cuda_emulation.FORWARD)
    expected = torch.roll(torch.arange(1, 65, dtype=torch.int32), -1)
    for racy, fenced in results.values():
        assert torch.equal(fenced, expected)
    assert not torch.equal(results[cuda_emulation.FORWARD][0], results[cuda_emulation.REVERSE][0])


def test_wmma_product_matches_torch():
    i = torch.arange(256)
    a = ((i % 7) - 3.0).reshape(16, 16)
    b_col_major = ((i % 5) * 0.5).reshape(16, 16)  # stored column-major: element (k, n) at n * 16 + k
    torch.testing.assert_close(torch.ops.cuda_emulation.wmma_product(), a @ b_col_major.t(), rtol=0, atol=0)


def _all_kernels_once():
    """One small call through every CUDA kernel: gating forward/backward (with noise), histogram,
    metadata sort, permute/unpermute and their backwards, the grouped GEMMs (fp32 SIMT and 16-bit
    wmma paths, forward and weight gradient). Returns every output and gradient."""
    g = torch.Generator().manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(37, 24, generator=g).to(dtype).requires_grad_(True)
        w = (torch.randn(24, 13, generator=g) / 5).requires_grad_(True)
        noise = torch.randn(37, 13, generator=g)
        r = ops.topk_gating(x, w, 3, training=True, noise=noise, backend="cuda")
        experts = torch.randn(13, 24, 16, generator=g).to(dtype).requires_grad_(True)
        metadata = ops.routing_metadata(r.expert_ids, 13, backend="cuda")
        y = ops.expert_linear(x, experts, None, r.gates.to(dtype), metadata, backend="cuda")
        x_sorted = ops.permute(x, metadata, backend="cuda")
        back = ops.unpermute(x_sorted, r.gates.to(dtype), metadata, backend="cuda")
        loss = r.gates.sum() + r.load_loss + r.importance_loss + y.float().square().sum() + back.float().sum()
        loss.backward()
        results += [r.gates, r.expert_ids, r.load, r.importance, x.grad, w.grad, experts.grad, y, x_sorted, back]
        results += list(ops.expert_histogram(r.expert_ids, 13, backend="cuda"))
    return [t.detach() for t in results if isinstance(t, torch.Tensor)]


def test_every_kernel_is_bit_identical_under_schedule_perturbation():
    with cuda_emulation.emulated_cuda_backend():
        runs = []
        for order, seed in ((cuda_emulation.FORWARD, 0), (cuda_emulation.REVERSE, 0), (cuda_emulation.RANDOM, 1)):
            cuda_emulation.set_schedule(order, seed)
            runs.append(_all_kernels_once())
        cuda_emulation.set_schedule(cuda_emulation.FORWARD)
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                               b.view(torch.uint8) if b.is_floating_point() else b)
    launched = cuda_emulation.launch_counts()
    assert any("gating_forward_kernel" in name for name in launched), launched
    assert any("grouped_mm_tc_kernel" in name for name in launched), launched


def _histogram_launches() -> int:
    return sum(n for name, n in cuda_emulation.launch_counts().items() if name.startswith("histogram_kernel"))


def test_the_emulated_kernels_stand_in_at_the_cpu_key_for_the_block_only():
    """emulated_cuda_backend() puts the emulated kernels at the dispatcher's CPU key of sm4's ops, so
    torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) runs the CUDA
    kernels; leaving the block gives sm4's CPU kernels back."""
    ids = torch.tensor([[0, 4], [2, 2], [4, 1]])
    before = _histogram_launches()
    torch.ops.sm4.expert_histogram(ids, 5)
    assert _histogram_launches() == before  # sm4's CPU kernel: no emulated launch
    with cuda_emulation.emulated_cuda_backend():
        torch.library.opcheck(torch.ops.sm4.expert_histogram.default, (ids, 5))
        during = _histogram_launches()
        assert during > before
    counts, _ = torch.ops.sm4.expert_histogram(ids, 5)
    assert _histogram_launches() == during
    assert counts.tolist() == [1, 1, 2, 0, 2]


def test_info_and_readme_say_the_cuda_kernels_are_executed_under_cpu_emulation(capsys):
    from sm4.__main__ import main

    assert main(["info"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "executed under CPU emulation" in line]
    assert len(lines) == 1 and "topk_gating" in lines[0], lines  # names the ops dispatch keeps off them
    readme = " ".join((cuda_emulation.ROOT / "README.md").read_text().replace(">", " ").split())
    assert "executed under CPU emulation" in readme


def test_every_kernel_of_csrc_cuda_is_counted():
    # The summary line counts these (tests/conftest.py); one name per __global__ template.
    kernels = cuda_emulation.cuda_kernels()
    assert {"gating_forward_kernel", "grouped_mm_tc_kernel", "scatter_rows_kernel", "exclusive_scan_kernel"} <= set(kernels)
    assert len(kernels) == len(set(kernels)) >= 17
