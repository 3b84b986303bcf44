"""Loading of the compiled extension ``sm4._C`` and the Python half of its op registrations.

The schemas and the CPU/CUDA kernels are registered in C++ (``csrc/``). Here, as in
pytorch/extension-cpp, we add what belongs in Python: a fake (meta) kernel per op, so that
``torch.compile`` and ``torch.library.opcheck`` can trace it, and autograd formulas for the ops
that have gradients (``torch.library.register_autograd``; ``expert_histogram`` has integer
outputs only and needs none).

If the extension is missing, nothing crashes at import: ``LOAD_ERROR`` says why and how to build
it, and the backends that need it report that as their reason to refuse.
"""

import torch

try:
    from . import _C  # noqa: F401  (imported for its op registrations)

    LOAD_ERROR: str | None = None
except ImportError as error:
    LOAD_ERROR = (
        f"the compiled extension sm4._C is not importable ({error}); build it with "
        "`pip install --no-build-isolation -e .` (or `make env`) after installing torch"
    )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``sm4::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if LOAD_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sm4::{op}", dispatch_key)


def compiled_ops() -> list[str]:
    """Names of the ops the extension declares (``torch.ops.sm4.<name>``)."""
    if LOAD_ERROR is not None:
        return []
    return sorted(
        name.split("::", 1)[1].split(".", 1)[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("sm4::") and not name.startswith("sm4::triton_")
    )


if LOAD_ERROR is None:

    @torch.library.register_fake("sm4::expert_histogram")
    def _expert_histogram_fake(expert_ids: torch.Tensor, num_experts: int):
        counts = expert_ids.new_empty((num_experts,), dtype=torch.int64)
        offsets = expert_ids.new_empty((num_experts + 1,), dtype=torch.int64)
        return counts, offsets
