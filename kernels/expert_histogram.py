"""Triton kernel of ``expert_histogram``: per-expert assignment counts and int64 offsets.

Pipeline position: after gating, before the grouped GEMMs; the offsets tell each GEMM tile which
expert's rows it works on.

    expert_ids: (T, k_max) int32/int64, -1 = no assignment  ->  counts (E,) int64,
                                                                offsets (E + 1,) int64

Pass 1 adds one per assignment with integer atomics (exact whatever the order: deterministic).
Pass 2 is one program that scans the counts in blocks of ``BLOCK_E`` with a running carry.
Ids outside [-1, E) are not counted: checking them would need a host sync.
"""

import torch
import triton
import triton.language as tl

# 1024 assignments per program: enough work per program to hide the atomics' latency on a GPU,
# and few programs for the interpreter (~0.5 ms each) in tests.
BLOCK_ASSIGNMENTS = 1024


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_assignments, num_experts, BLOCK: tl.constexpr):
    # int64 positions: T * k_max may exceed 2^31.
    start = tl.program_id(0).to(tl.int64) * BLOCK
    positions = start + tl.arange(0, BLOCK).to(tl.int64)
    in_range = positions < num_assignments
    ids = tl.load(ids_ptr + positions, mask=in_range, other=-1).to(tl.int64)
    counted = in_range & (ids >= 0) & (ids < num_experts)
    ones = tl.full((BLOCK,), 1, tl.int64)
    tl.atomic_add(counts_ptr + tl.where(counted, ids, 0), ones, mask=counted)


@triton.jit
def _exclusive_scan_kernel(counts_ptr, offsets_ptr, num_experts, BLOCK_E: tl.constexpr, NUM_BLOCKS: tl.constexpr):
    # NUM_BLOCKS = cdiv(E, BLOCK_E) is a compile-time constant: E is fixed for a model, and a
    # loop bound taken from a runtime scalar breaks Triton 3.6's interpreter.
    lanes = tl.arange(0, BLOCK_E).to(tl.int64)
    carry = tl.zeros((1,), tl.int64)
    tl.store(offsets_ptr + tl.arange(0, 1), carry)
    for block in range(NUM_BLOCKS):
        experts = block * BLOCK_E + lanes
        counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
        inclusive = tl.cumsum(counts, 0) + carry
        tl.store(offsets_ptr + 1 + experts, inclusive, mask=experts < num_experts)
        carry += tl.sum(counts, 0)


def _launch(expert_ids: torch.Tensor, num_experts: int):
    ids = expert_ids.contiguous()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=ids.device)
    num_assignments = ids.numel()
    if num_assignments:
        grid = (triton.cdiv(num_assignments, BLOCK_ASSIGNMENTS),)
        _count_kernel[grid](ids, counts, num_assignments, num_experts, BLOCK=BLOCK_ASSIGNMENTS)
    block_e = min(triton.next_power_of_2(num_experts), 1024)
    _exclusive_scan_kernel[(1,)](counts, offsets, num_experts, BLOCK_E=block_e, NUM_BLOCKS=triton.cdiv(num_experts, block_e))
    return counts, offsets


@torch.library.custom_op("sm4::triton_expert_histogram", mutates_args=(), device_types=("cuda", "cpu"))
def expert_histogram(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (E,) int64 and offsets (E + 1,) int64 of expert_ids (T, k_max), -1 = none.

    CPU tensors run only under TRITON_INTERPRET=1 (tests); the GPU is the real target.
    """
    return _launch(expert_ids, num_experts)


@expert_histogram.register_fake
def _(expert_ids, num_experts):
    return (
        expert_ids.new_empty((num_experts,), dtype=torch.int64),
        expert_ids.new_empty((num_experts + 1,), dtype=torch.int64),
    )

