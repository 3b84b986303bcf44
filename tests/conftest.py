"""Without a GPU, the tests parametrised with backend="cuda" run sm4's CUDA kernels under the CPU
emulation of tests/cuda_emulation (compiled once, cached in build/cuda_emulation)."""

import dataclasses

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



@dataclasses.dataclass
class _ExecutedKernel:
    """One entry of the summary line's count (terminalreporter.stats holds report-like objects)."""
    name: str
    count_towards_summary: bool = True


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    """How many of csrc/cuda's kernels this run executed under the emulation, counted in the final
    summary line ("..., 17 of 17 CUDA kernels executed under CPU emulation in ...s"), with the
    launches and any kernel no test reached on a line of its own. Nothing when no test loaded it."""
    if not cuda_emulation.loaded():
        return
    executed, missing, launches = cuda_emulation.kernel_coverage()
    key = f"of {len(executed) + len(missing)} CUDA kernels executed under CPU emulation"
    terminalreporter.stats.setdefault(key, []).extend(_ExecutedKernel(name) for name in executed)
    line = f"{launches} launches of {len(executed)} kernels of csrc/cuda under the CPU emulation"
    terminalreporter.write_sep("-", line + (f"; not executed: {', '.join(missing)}" if missing else ""))
