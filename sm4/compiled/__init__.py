"""Python side of the compiled ops in ``torch.ops.sm4`` (fake kernels, autograd, entry points).

``IMPLEMENTATIONS`` maps each public op to the compiled ops it needs and the function the cpu and
cuda backends call; a backend offers the op when all of those ops have a kernel for its dispatch
key. An op group whose schemas the loaded ``sm4._C`` lacks (an extension built from older
sources) is left out, with ``STALE`` saying which, instead of failing the import.
"""

import torch

from .. import _extension, routing

IMPLEMENTATIONS: dict = {}
STALE: list[str] = []


def _declared(*names: str) -> bool:
    present = set(_extension.compiled_ops())
    missing = [name for name in names if name not in present]
    if missing:
        STALE.extend(missing)
    return not missing


if _extension.LOAD_ERROR is None:
    if _declared("expert_histogram"):

        @torch.library.register_fake("sm4::expert_histogram")
        def _expert_histogram_fake(expert_ids: torch.Tensor, num_experts: int):
            counts = expert_ids.new_empty((num_experts,), dtype=torch.int64)
            offsets = expert_ids.new_empty((num_experts + 1,), dtype=torch.int64)
            return counts, offsets

        IMPLEMENTATIONS["expert_histogram"] = (("expert_histogram",), torch.ops.sm4.expert_histogram)

    if _declared("topk_gating_forward", "topk_gating_backward"):
        routing.register_gating("sm4::topk_gating_forward", "sm4::topk_gating_backward", torch.ops.sm4.topk_gating_backward)
        IMPLEMENTATIONS["topk_gating"] = (
            ("topk_gating_forward", "topk_gating_backward"),
            routing.make_topk_gating(torch.ops.sm4.topk_gating_forward),
        )

    if _declared("routing_metadata", "permute", "permute_backward", "unpermute", "unpermute_backward"):
        from . import permutation

        IMPLEMENTATIONS["routing_metadata"] = (("routing_metadata",), permutation.routing_metadata)
        IMPLEMENTATIONS["permute"] = (("permute", "permute_backward"), permutation.permute)
        IMPLEMENTATIONS["unpermute"] = (("unpermute", "unpermute_backward"), permutation.unpermute)

    if _declared("grouped_mm", "grouped_weight_grad"):
        from . import grouped_gemm

        for _op in ("grouped_linear", "grouped_ffn", "expert_linear", "expert_ffn"):
            IMPLEMENTATIONS[_op] = (("grouped_mm", "grouped_weight_grad"), grouped_gemm.OPS[_op])
