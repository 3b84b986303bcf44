"""Top-level pytest set-up shared by tests/ and benchmarks/.

Without a CUDA device, Triton kernels run through Triton's interpreter on CPU tensors. The
interpreter must be switched on before any ``@triton.jit`` decoration runs, that is before
``sm4`` (whose Triton backend loads ``sm4.kernels`` at import) is first imported: pytest imports
this file first.
"""

import os

# numpy's OpenBLAS threads spin beside torch's on this small machine and steal its time; sm4 never
# calls numpy's BLAS. Must be set before numpy is loaded (torch loads it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep torch.compile's cache inside the checkout (and out of the way of other projects).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache", "inductor"))
