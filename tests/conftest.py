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
    if "opcheck" in request.node.name:
        pytest.skip("opcheck checks sm4's Python registrations (fake kernels, autograd: the same for every device); under "
                    "the CPU emulation the CUDA kernels sit behind a dispatch mode that opcheck's fake and functional "
                    "tracing does not go through")
    with cuda_emulation.emulated_cuda_backend():
        yield
