"""The two access paths of the CUDA permute / unpermute row kernels (csrc/cuda/permutation.cu),
executed under the CPU emulation: 16-byte vectors when d * element size and every base pointer
are 16-byte aligned, element by element otherwise (odd d, a misaligned view), for fp32, bf16 and
fp16, forward and backward, against the reference; each path is bit-identical whatever order the
block's threads run in (the backward reduces within a group of lanes by shuffles)."""

import pytest
import torch

from sm4 import ops

from . import cuda_emulation
from .helpers import FLOAT_DTYPES, assert_close

pytestmark = pytest.mark.skipif(not cuda_emulation.enabled(), reason=f"{cuda_emulation.ENV_SWITCH}=0")

TOKENS, K, EXPERTS = 45, 2, 5  # 45 tokens: more than one block even at 8 lanes per row (32 rows a block)
# The padding kernel zero_rows_kernel also has both paths, but one launch site (its name does not tell them apart).
KERNELS = ("scatter_rows_kernel", "combine_rows_kernel", "unpermute_backward_kernel")
# case -> (d, misaligned base pointer, whether it takes the vector path), per dtype
CASES = {
    "d=64": (64, False, True),                 # 8 (16-bit) / 16 (fp32) chunks: 8 or 16 lanes per row
    "d=520, several chunks a lane": (520, False, True),  # 65 / 130 chunks on a warp
    "odd d=7": (7, False, False),
    "d=6": (6, False, False),                  # 12 / 24 bytes a row: not a multiple of 16
    "misaligned view": (64, True, False),      # the inputs x and y_sorted start 1 element into their storage
}


def _tensor(shape, dtype, misaligned, generator):
    numel = shape[0] * shape[1]
    flat = torch.randn(numel + 1, generator=generator).to(dtype)
    return flat[1:].view(shape) if misaligned else flat[:numel].view(shape).clone()


def _run(dtype, dim, misaligned, backend):
    g = torch.Generator().manual_seed(dim)
    ids = torch.randint(-1, EXPERTS, (TOKENS, K), generator=g)
    m = ops.routing_metadata(ids, EXPERTS, backend="reference")
    x = _tensor((TOKENS, dim), dtype, misaligned, g).requires_grad_(True)
    y = _tensor((TOKENS * K, dim), dtype, misaligned, g).requires_grad_(True)
    gates = torch.rand(TOKENS, K, generator=g).to(dtype).requires_grad_(True)
    if misaligned:
        assert x.data_ptr() % 16 and y.data_ptr() % 16
    x_sorted = ops.permute(x, m, backend=backend)
    out = ops.unpermute(y, gates, m, backend=backend)
    seed = _tensor((TOKENS * K, dim), dtype, misaligned, g), _tensor((TOKENS, dim), dtype, misaligned, g)
    grads = torch.autograd.grad((x_sorted.float() * seed[0].float()).sum() + (out.float() * seed[1].float()).sum(),
                                (x, y, gates))
    return [x_sorted.detach(), out.detach(), *grads]


def _launches():
    counts = cuda_emulation.launch_counts()
    return {name: n for name, n in counts.items() if name.startswith(KERNELS)}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_row_kernels_on_both_paths_match_the_reference(dtype, case):
    dim, misaligned, vector = CASES[case]
    want = _run(dtype, dim, misaligned, "reference")
    with cuda_emulation.emulated_cuda_backend():
        before = _launches()
        runs = []
        for order, seed in ((cuda_emulation.FORWARD, 0), (cuda_emulation.REVERSE, 0), (cuda_emulation.RANDOM, 2)):
            cuda_emulation.set_schedule(order, seed)
            runs.append(_run(dtype, dim, misaligned, "cuda"))
        cuda_emulation.set_schedule(cuda_emulation.FORWARD)
        launched = {name for name, n in _launches().items() if n > before.get(name, 0)}
    for got, expected in zip(runs[0], want):
        assert_close(got, expected, dtype)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # The launch names as written in permutation.cu: the vector path's kernels take uint4 or kVec.
    vector_launches = {name for name in launched if "uint4" in name or "kVec" in name}
    if vector:
        assert vector_launches == launched and len(launched) == len(KERNELS), launched
    elif misaligned:  # what reads the misaligned x and y_sorted goes element by element (the rest is aligned)
        assert {"scatter_rows_kernel<T>", "combine_rows_kernel<T, 1>"} <= launched, launched
    else:
        assert not vector_launches and len(launched) == len(KERNELS), launched
