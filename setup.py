"""Build and install sm4 with its compiled extension ``sm4._C``.

What gets built
---------------
* The C++ CPU kernels (``csrc/cpu``) and the op schemas (``csrc/sm4_ops.cpp``): always.
* The CUDA kernels (``csrc/cuda``): when the installed torch has CUDA *and* a CUDA toolkit is
  found, or when ``FORCE_CUDA=1`` (a build box without a GPU can still build them).

Switches (environment variables)
--------------------------------
``SM4_SKIP_CUDA=1``       never build the CUDA kernels, even where they could be built.
``FORCE_CUDA=1``          build them even though no GPU is visible (needs a CUDA torch).
``TORCH_CUDA_ARCH_LIST``  GPU architectures, default ``"8.0;9.0"`` (A100, H100/H200).
``MAX_JOBS``              parallel compile jobs (read by torch's ninja build).

Install with ``pip install --no-build-isolation -e .`` *after* torch: with build isolation pip
would fetch the newest CUDA torch (gigabytes) into a throw-away build environment.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as the subpackage
``sm4.kernels`` (``package_dir`` below), so they read as their own layer of the stack but import
as part of the package.
"""

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as error:  # pragma: no cover - only hit on a machine without torch
    raise SystemExit(
        "sm4 builds against an installed torch; install it first (the CPU build: `pip install torch==2.13.0+cpu "
        "--index-url https://download.pytorch.org/whl/cpu`) and then `pip install --no-build-isolation -e .`, "
        "or run `make demo`."
    ) from error

HERE = os.path.dirname(os.path.abspath(__file__))

# What the package imports besides torch and triton (tests/test_install.py checks the list
# against the imports in sm4/ and kernels/).
RUNTIME_REQUIRES = ["numpy", "tqdm"]
EXTRAS = {
    "plots": ["matplotlib"],                     # the demo's and `report run`'s PNGs
    "multibench": ["h5py", "Pillow", "pandas==3.1.1"],  # PUSH and V&T (HDF5), ENRICO's images, pickled pandas objects
    "yaml": ["pyyaml"],                          # YAML setting files
    "data": ["scikit-learn==1.9.1", "mnist1d==0.0.2.post1"],  # regenerating the bundled benchmark
    "test": ["pytest", "pytest-benchmark", "hypothesis"],
}


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    """Return (build_cuda: bool, why: str)."""
    if _flag("SM4_SKIP_CUDA"):
        return False, "SM4_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    return False, "no GPU visible (set FORCE_CUDA=1 to build the CUDA kernels anyway)"


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extensions():
    build_cuda, why = _want_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    openmp = ["-fopenmp"]
    # No -std flag: torch's build adds the standard its headers need (C++17 up to 2.12, C++20 after).
    # -fno-trapping-math: floating-point compares may be turned into selects, so the CPU kernels'
    # branch-free loops (clamps, maxima, masks) vectorise. Results are unchanged: it neither
    # reassociates nor assumes finite values; it only stops treating FP exception flags as effects.
    cxx_flags = ["-O3", "-fno-trapping-math", *openmp]
    if not build_cuda:
        print(f"sm4: building backends: cpu (CUDA skipped: {why})")
        return [
            CppExtension(
                "sm4._C",
                sources,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=openmp,
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"sm4: building backends: cpu, cuda for {os.environ['TORCH_CUDA_ARCH_LIST']} ({why})")
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    return [
        CUDAExtension(
            "sm4._C",
            sources,
            define_macros=[("SM4_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo"],
            },
            extra_link_args=openmp,
        )
    ]


setup(
    name="sm4",
    version="0.1.0",
    description="Fused sparse mixture-of-experts kernels and layers for multi-modal multi-task transformers",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # Every subpackage of sm4/, plus kernels/ installed as sm4.kernels.
    packages=["sm4", *(f"sm4.{p}" for p in find_packages("sm4")), "sm4.kernels"],
    package_dir={"sm4": "sm4", "sm4.kernels": "kernels"},
    package_data={"sm4.data": ["*.npz"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    # torch and triton are installed first (see README): listing torch here would let pip replace a
    # working torch with the newest CUDA build. Everything else `python -m sm4` imports is here;
    # the optional parts are extras, and each says which one it needs when it is missing.
    install_requires=RUNTIME_REQUIRES,
    extras_require=EXTRAS,
    zip_safe=False,
)
