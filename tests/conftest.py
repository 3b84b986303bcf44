"""Without a GPU, the tests parametrised with backend="cuda" run sm4's CUDA kernels under the CPU
emulation of tests/cuda_emulation (compiled once, cached in build/cuda_emulation)."""

import pytest
import torch

from . import cuda_emulation


@pytest.fixture(autouse=True)
def _cuda_kernels_under_emulation(request):
    callspec = getattr(request.node, "callspec", None)
    if torch.cuda.is_available() or callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    if not cuda_emulation.enabled():
        pytest.skip(f"no GPU, and the CUDA emulation is switched off ({cuda_emulation.ENV_SWITCH}=0)")
    with cuda_emulation.emulated_cuda_backend():
        yield
