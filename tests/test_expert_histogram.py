"""expert_histogram on every kernel backend against the reference: the one compiled op of the
foundation, exercising registration, fake kernels, opcheck, dispatch and torch.compile."""

import pytest
import torch

import sm4
from sm4 import ops, reference

from .helpers import kernel_device, skip_unless_runs

KERNEL_BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda"),
]




def random_ids(tokens, k, experts, seed=0, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, experts, (tokens, k), generator=g).to(dtype)


CASES = {
    "T=0": (torch.zeros(0, 2, dtype=torch.int64), 4),
    "T=1": (torch.tensor([[3, 0]]), 4),
    "E=1": (torch.zeros(5, 1, dtype=torch.int64), 1),
    "k=E": (torch.arange(7).repeat(9, 1), 7),
    "all to one expert, the rest empty": (torch.full((33, 2), 5), 11),
    "all inactive": (torch.full((6, 3), -1), 3),
    "E prime, T not a block multiple": (random_ids(1031, 2, 13), 13),
    "E = 251, prime": (random_ids(517, 3, 251, seed=1), 251),
    "E > 1024 scan blocks": (random_ids(300, 4, 1500, seed=2), 1500),
    "int32 ids": (random_ids(2000, 2, 64, seed=3, dtype=torch.int32), 64),
    "non-contiguous ids": (random_ids(40, 6, 9, seed=4)[:, ::2], 9),
    "several blocks of 1024": (random_ids(5000, 2, 32, seed=5), 32),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, case):
    skip_unless_runs(backend)
    ids, experts = CASES[case]
    ids = ids.to(kernel_device(backend))
    counts, offsets = ops.expert_histogram(ids, experts, backend=backend)
    want_counts, want_offsets = reference.expert_histogram(ids, experts)
    assert counts.dtype == offsets.dtype == torch.int64
    assert counts.shape == (experts,) and offsets.shape == (experts + 1,)
    assert torch.equal(counts, want_counts), case
    assert torch.equal(offsets, want_offsets), case


def test_cpu_kernel_checks_ids_itself():
    # The compiled CPU kernel raises (a ValueError, as the Python checks do) on a bad id even when
    # called directly (no Python checks).
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[-1, num_experts=3\), but entry 1 \(flat index\) is 3"):
        torch.ops.sm4.expert_histogram(torch.tensor([[0, 3]]), 3)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        torch.ops.sm4.expert_histogram(torch.tensor([[0]]), 0)


def test_extension_registers_its_ops():
    assert hasattr(torch.ops.sm4, "expert_histogram")
    assert sm4._extension.LOAD_ERROR is None
    assert "expert_histogram" in sm4._extension.compiled_ops()
    assert sm4._extension.has_kernel("expert_histogram", "CPU")
    schema = str(torch.ops.sm4.expert_histogram.default._schema)
    assert schema == "sm4::expert_histogram(Tensor expert_ids, int num_experts) -> (Tensor counts, Tensor offsets)"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    skip_unless_runs(backend)
    op = torch.ops.sm4.triton_expert_histogram.default if backend == "triton" else torch.ops.sm4.expert_histogram.default
    for ids, experts in (CASES["E prime, T not a block multiple"], CASES["T=0"], CASES["int32 ids"]):
        torch.library.opcheck(op, (ids.to(kernel_device(backend)), experts))


def test_fake_kernel_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        counts, offsets = torch.ops.sm4.expert_histogram(torch.empty(10, 2, dtype=torch.int64), 7)
    assert counts.shape == (7,) and offsets.shape == (8,) and offsets.dtype == torch.int64


def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True)
    def rows_per_expert(ids):
        counts, offsets = ops.expert_histogram(ids, 13)
        return counts.float() / ids.shape[0], offsets

    ids = random_ids(64, 2, 13, seed=6)
    share, offsets = rows_per_expert(ids)
    want_counts, want_offsets = reference.expert_histogram(ids, 13)
    assert torch.equal(offsets, want_offsets)
    torch.testing.assert_close(share, want_counts.float() / 64)
