"""Python side of the compiled ops in ``torch.ops.sm4`` (fake kernels, autograd, entry points).

``IMPLEMENTATIONS`` maps each public op to the compiled ops it needs and the function the cpu and
cuda backends call; a backend offers the op when all of those ops have a kernel for its dispatch
key.
"""

import torch

from .. import _extension, routing

IMPLEMENTATIONS: dict = {}

if _extension.LOAD_ERROR is None:

    @torch.library.register_fake("sm4::expert_histogram")
    def _expert_histogram_fake(expert_ids: torch.Tensor, num_experts: int):
        counts = expert_ids.new_empty((num_experts,), dtype=torch.int64)
        offsets = expert_ids.new_empty((num_experts + 1,), dtype=torch.int64)
        return counts, offsets

    routing.register_gating("sm4::topk_gating_forward", "sm4::topk_gating_backward", torch.ops.sm4.topk_gating_backward)

    IMPLEMENTATIONS = {
        "expert_histogram": (("expert_histogram",), torch.ops.sm4.expert_histogram),
        "topk_gating": (
            ("topk_gating_forward", "topk_gating_backward"),
            routing.make_topk_gating(torch.ops.sm4.topk_gating_forward),
        ),
    }
