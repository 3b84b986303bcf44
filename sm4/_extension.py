"""Loading of the compiled extension ``sm4._C`` and the Python half of its op registrations.

The schemas and the CPU/CUDA kernels are registered in C++ (``csrc/``). What belongs in Python,
as in pytorch/extension-cpp, lives in ``sm4.compiled``: a fake (meta) kernel per op, so that
``torch.compile`` and ``torch.library.opcheck`` can trace it, and autograd formulas for the ops
that have gradients (``torch.library.register_autograd``).

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

