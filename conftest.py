"""Top-level pytest set-up shared by tests/ and benchmarks/.

Without a CUDA device, Triton kernels run through Triton's interpreter on CPU tensors. The
interpreter must be switched on before any ``@triton.jit`` decoration runs, that is before
``sm4`` (whose Triton backend loads ``sm4.kernels`` at import) is first imported: pytest imports
this file first.
"""

import os
import tempfile

import pytest

# numpy's OpenBLAS threads spin beside torch's on this small machine and steal its time; sm4 never
# calls numpy's BLAS. Must be set before numpy is loaded (torch loads it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh torch.compile cache per test session: a persistent one can replay graphs traced against
# an older build of sm4._C (its op schemas are not part of the cache key), which fails confusingly.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="sm4-inductor-"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Benchmarks warm up before timing (pytest-benchmark's default warms up only on PyPy); an
    # explicit --benchmark-warmup on the command line wins. Runs before the plugin reads options.
    if hasattr(config.option, "benchmark_warmup") and "--benchmark-warmup" not in " ".join(config.invocation_params.args):
        config.option.benchmark_warmup = True

