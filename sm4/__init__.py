"""sm4: fused sparse mixture-of-experts kernels and layers for multi-modal multi-task transformers.

    import sm4
    routing = sm4.ops.topk_gating(x, router_weight, k=2)
    y, routing = sm4.ops.moe_ffn(x, router_weight, w1, b1, w2, b2, k=2)
    with sm4.use_backend("reference"):   # or backend="reference", or SM4_BACKEND=reference
        ...

``sm4.ops`` is the op contract, ``sm4.reference`` its plain-PyTorch ground truth, ``sm4.dispatch``
and ``sm4.backends`` the backend selection; ``sm4.kernels`` holds the Triton kernels and
``torch.ops.sm4`` the compiled C++/CUDA ones.
"""

from . import _extension, backends, compiled, dispatch, ops, reference
from .dispatch import BackendNotSupportedError, available_backends, implemented_ops, use_backend
from ._double_backward import DoubleBackwardNotSupportedError
from .modules import MoEConfig, SM4EncoderLayer, SparseMoEAttention, SparseMoEFFN, collect_aux_loss, set_backend
from .types import MoEOutput, RoutingMetadata, RoutingResult

__version__ = "0.1.0"

__all__ = [
    "BackendNotSupportedError",
    "DoubleBackwardNotSupportedError",
    "MoEConfig",
    "MoEOutput",
    "RoutingMetadata",
    "RoutingResult",
    "SM4EncoderLayer",
    "SparseMoEAttention",
    "SparseMoEFFN",
    "available_backends",
    "backends",
    "build_info",
    "collect_aux_loss",
    "dispatch",
    "implemented_ops",
    "ops",
    "reference",
    "set_backend",
    "use_backend",
]


def build_info() -> dict:
    """What this installation has: versions, the compiled kernels, and each backend's status."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "sm4": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "extension_error": _extension.LOAD_ERROR,
        # Ops whose Python side exists but which the loaded sm4._C lacks: rebuild it.
        "stale_extension_missing_ops": list(compiled.STALE),
        "compiled_ops": {
            op: [key for key in ("CPU", "CUDA") if _extension.has_kernel(op, key)]
            for op in _extension.compiled_ops()
        },
        "backends": available_backends(),
    }
