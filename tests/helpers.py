"""Shared test helpers: the per-dtype tolerance table and small input factories."""

import torch

# Tolerances against a float64 reference, per input dtype (one table, as in xformers' ERROR_ATOL).
# fp16/bf16 values are rounded to the dtype once on input and once on output; the compute is fp32.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close(actual, expected, dtype, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype], msg=msg or None)


def router_inputs(tokens, dim, experts, dtype=torch.float32, seed=0, scale=1.0):
    """x (T, d) and router_weight (d, E), random but reproducible."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64).to(dtype)
    w = (scale * torch.randn(dim, experts, generator=g, dtype=torch.float64)).to(dtype)
    return x, w


def expert_params(experts, d_in, d_out, dtype=torch.float64, seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(experts, d_in, d_out, generator=g, dtype=torch.float64) / d_in**0.5).to(dtype)
    b = torch.randn(experts, d_out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return weight, b


def kernel_device(backend: str) -> str:
    """The device a kernel backend's tests run on: cuda for cuda and triton when a GPU exists;
    otherwise CPU tensors (Triton through its interpreter, the CUDA kernels under the emulation of
    tests/cuda_emulation, see tests/conftest.py)."""
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def skip_unless_runs(backend: str, op: str | None = None):
    """Skip (with the reason) when the backend is unavailable here or has no kernel for op yet."""
    import pytest

    from sm4 import backends

    impl = backends.BACKENDS[backend]
    if impl.unavailable_reason:
        pytest.skip(f"{backend} backend unavailable here: {impl.unavailable_reason}")
    if op is not None and op not in impl.kernels:
        pytest.skip(f"{backend} has no {op} kernel yet")
