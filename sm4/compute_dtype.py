"""In which dtype the expert GEMMs of bf16 / fp16 layers run on a CPU.

On a CPU without a native bf16 (fp16) matrix unit, torch's bf16 matmul is far slower than its
fp32 one: on the development machine (AMD Zen 3, AVX2 + FMA, no AVX-512 BF16 / AMX) a
48 x 64 @ 64 x 128 product took 385 us in bf16 and 22 us in fp32 (36 us with the casts there
and back), 768 x 64 @ 64 x 128 7.6 ms against 0.26 ms. So on such CPUs sm4's expert layers cast
bf16 / fp16 inputs and parameters to fp32, run the fp32 kernels (the fused FFN backward
included) and cast the output back: ~10x faster and more accurate (fp32 accumulation, no
rounding of the hidden layer), at the price of keeping the saved activations (x, the FFN
pre-activation) in fp32, twice the bf16 bytes.

``SM4_CPU_LOW_PRECISION``: ``auto`` (default; fp32 unless the CPU has AVX-512 BF16 / AMX for
bf16, AMX-FP16 for fp16), ``fp32`` (always upcast) or ``native`` (never: bf16 kernels, as torch).
Read at each call, so tests and users can switch it at run time. GPUs and fp32 / fp64: unchanged.
"""

import functools
import os

import torch

POLICIES = ("auto", "fp32", "native")


@functools.lru_cache(maxsize=None)
def _native_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU has a matrix unit for dtype (torch's private probes; absent -> no)."""
    probe = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731
    if dtype == torch.bfloat16:
        return probe("_is_avx512_bf16_supported") or probe("_is_amx_tile_supported")
    return probe("_is_amx_fp16_supported")


def policy() -> str:
    value = os.environ.get("SM4_CPU_LOW_PRECISION", "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ValueError(f"SM4_CPU_LOW_PRECISION must be one of {', '.join(POLICIES)}, got {value!r}")
    return value


def expert_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype sm4's expert GEMMs compute in for tensors of dtype on device (see module doc)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    choice = policy()
    if choice == "native" or (choice == "auto" and _native_matmul(dtype)):
        return dtype
    return torch.float32
