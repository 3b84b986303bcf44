"""The four backends and what each supports (xformers-style capabilities).

    reference  plain PyTorch, any device, float64-capable: the ground truth and the fallback
    cpu        C++ kernels of sm4._C (csrc/cpu), CPU tensors
    cuda       CUDA C++ kernels of sm4._C (csrc/cuda), CUDA tensors
    triton     Triton kernels (sm4.kernels), CUDA tensors; CPU tensors through the Triton
               interpreter (TRITON_INTERPRET=1) only when the backend is forced, for tests

Each backend answers ``not_supported_reasons(op, tensors, forced)`` with a list of reasons (empty
when it can run the call); ``sm4.dispatch`` picks the first backend of ``PREFERENCE`` with none.
A backend gets an op when its kernel lands; until then it says so in its reasons.
"""

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _extension, reference
from ._checks import FLOAT_DTYPES

# The ops every backend may implement. The composites (moe_linear, moe_ffn, moe_attention) are
# pipelines of these, written once in sm4.ops; a backend may later claim a fused composite too.
STEP_OPS = (
    "topk_gating",
    "expert_histogram",
    "routing_metadata",
    "permute",
    "unpermute",
    "grouped_linear",
    "grouped_ffn",
    "expert_linear",
    "expert_ffn",
)

# Which issue brings each op to the kernel backends, for the "not implemented yet" reasons.
PLANNED_IN: dict[str, str] = {}


@dataclass(frozen=True)
class Backend:
    """A backend's capabilities, fixed when sm4 is imported.

    Everything is resolved at import (kernels loaded, availability decided), so that choosing a
    backend is plain dictionary and attribute reads, which torch.compile traces without breaks.
    """

    name: str
    summary: str
    device_types: frozenset[str]
    dtypes: tuple[torch.dtype, ...]
    unavailable_reason: str | None  # None when usable on this machine
    kernels: dict[str, Callable] = field(repr=False)  # op name -> implementation
    # {op: {size name: largest supported value}}, checked against the sizes each call reports.
    limits: dict[str, dict[str, int]] = field(default_factory=dict)
    # Ops whose kernels compile and are tested where the device exists, but have not yet been run
    # on one: never chosen automatically, only when forced (a wrong result must not be silent).
    unverified: frozenset[str] = frozenset()

    @classmethod
    def create(cls, name, summary, device_types, dtypes, load_kernels, availability=lambda: None, limits=None, unverified=()):
        reason = availability()
        kernels = {} if reason else load_kernels()
        return cls(name, summary, frozenset(device_types), tuple(dtypes), reason, kernels, limits or {}, frozenset(unverified))

    def implements(self, op: str) -> bool:
        return op in self.kernels

    def not_supported_reasons(self, op: str, tensors, forced: bool, sizes: dict[str, int] | None = None) -> list[str]:
        """Why this backend cannot run ``op`` on ``tensors`` (an iterable); [] if it can.

        sizes: the call's sizes by name (e.g. {"E": 64}), checked against ``limits``.
        """
        if self.unavailable_reason:
            return [self.unavailable_reason]
        if op not in self.kernels:
            planned = f"; it comes with {PLANNED_IN[op]}" if op in PLANNED_IN else ""
            return [f"{op} is not implemented on this backend yet{planned}"]
        reasons = []
        for tensor in tensors:
            device_type = tensor.device.type
            if device_type not in self.device_types:
                reasons.append(f"runs on {'/'.join(sorted(self.device_types))} tensors, got {device_type}")
                break
        float_dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        if not float_dtypes <= set(self.dtypes):
            bad = ", ".join(sorted(str(d) for d in float_dtypes - set(self.dtypes)))
            reasons.append(f"does not support dtype {bad}")
        for size_name, largest in self.limits.get(op, {}).items():
            value = (sizes or {}).get(size_name)
            if value is not None and value > largest:
                reasons.append(f"{op} supports {size_name} <= {largest}, got {size_name} = {value}")
        if self.name == "triton" and not forced and any(t.device.type == "cpu" for t in tensors):
            reasons.append("CPU tensors go through the slow Triton interpreter only when the backend is forced")
        if op in self.unverified and not forced:
            reasons.append(f"its {op} kernel has not yet been run on a GPU; it is used only when forced")
        return reasons


def _compiled_kernels(dispatch_key: str) -> Callable[[], dict[str, Callable]]:
    def load():
        from .compiled import IMPLEMENTATIONS

        return {
            op: implementation
            for op, (needs, implementation) in IMPLEMENTATIONS.items()
            if all(_extension.has_kernel(name, dispatch_key) for name in needs)
        }

    return load


def _cuda_availability() -> str | None:
    if _extension.LOAD_ERROR:
        return _extension.LOAD_ERROR
    if not any(_extension.has_kernel(op, "CUDA") for op in _extension.compiled_ops()):
        return ("sm4._C was built without CUDA kernels (CPU-only torch, no toolkit, or SM4_SKIP_CUDA=1); the test suite "
                "executes them under CPU emulation (tests/cuda_emulation)")
    if not torch.cuda.is_available():
        return "no CUDA device is available (the test suite executes these kernels under CPU emulation: tests/cuda_emulation)"
    return None


def _triton_availability() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device, and TRITON_INTERPRET=1 was not set before import to use the interpreter"
    return None


def _triton_kernels() -> dict[str, Callable]:
    from .grouped import GroupedKernels, make_backend_ops
    from .kernels import expert_histogram, grouped_gemm, permutation, topk_gating

    return {
        "expert_histogram": expert_histogram.expert_histogram,
        "topk_gating": topk_gating.topk_gating,
        "routing_metadata": permutation.routing_metadata,
        "permute": permutation.permute,
        "unpermute": permutation.unpermute,
        **make_backend_ops(GroupedKernels(grouped_gemm.grouped_mm, grouped_gemm.grouped_weight_grad)),
    }


REFERENCE = Backend.create(
    name="reference",
    summary="plain PyTorch, any device; the ground truth",
    device_types={"cpu", "cuda", "meta", "mps", "xpu"},
    dtypes=FLOAT_DTYPES,
    load_kernels=lambda: {op: getattr(reference, op) for op in STEP_OPS},
)
CPU = Backend.create(
    name="cpu",
    summary="C++ kernels in sm4._C (OpenMP), CPU tensors",
    device_types={"cpu"},
    dtypes=FLOAT_DTYPES,
    load_kernels=_compiled_kernels("CPU"),
    availability=lambda: _extension.LOAD_ERROR,
)
CUDA = Backend.create(
    name="cuda",
    summary="CUDA C++ kernels in sm4._C, CUDA tensors",
    device_types={"cuda"},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    load_kernels=_compiled_kernels("CUDA"),
    availability=_cuda_availability,
    # gating: one warp per token, at most 8 experts per lane; metadata: E + 1 bin counters in
    # 48 KiB of shared memory.
    limits={"topk_gating": {"E": 256}, "routing_metadata": {"E": 12287}},
    # Compiled for sm_80/sm_90 and executed under CPU emulation by the test suite; no GPU has run them yet.
    unverified={"expert_histogram", "topk_gating", "routing_metadata", "permute", "unpermute", "grouped_linear",
                "grouped_ffn", "expert_linear", "expert_ffn"},
)
TRITON = Backend.create(
    name="triton",
    summary="Triton kernels, CUDA tensors (CPU through the interpreter, when forced)",
    device_types={"cuda", "cpu"},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    load_kernels=_triton_kernels,
    availability=_triton_availability,
)

# Auto-dispatch order: the first backend with no reasons wins. The device filters make this
# "cuda, then triton" for GPU tensors and "cpu" for CPU tensors, with the reference last.
PREFERENCE = (CUDA, TRITON, CPU, REFERENCE)
BACKENDS = {backend.name: backend for backend in PREFERENCE}
