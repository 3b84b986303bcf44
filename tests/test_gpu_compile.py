"""GPU code is compiled here even without a GPU: every CUDA source with nvcc for sm_80 and sm_90,
every Triton kernel for the cuda 80 and 90 targets. Running it needs a GPU (see README)."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ["80", "90"]


def find_cuda_toolkit():
    """The CUDA toolkit root with bin/nvcc and include/cuda_runtime.h, or None."""
    nvcc_on_path = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc_on_path:
        candidates.append(str(pathlib.Path(nvcc_on_path).resolve().parents[1]))
    for root in filter(None, candidates):
        root = pathlib.Path(root)
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return root
    return None


CUDA_TOOLKIT = find_cuda_toolkit()
NVCC = str(CUDA_TOOLKIT / "bin" / "nvcc") if CUDA_TOOLKIT else None


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, "csrc/cuda has no .cu files"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, arch):
    # The real build's flags, -Werror all-warnings, ptxas -warn-spills: the same nvcc run as
    # test_cuda_codegen.py's checks of the generated code (cached, so each file compiles once per arch).
    from .test_cuda_codegen import compiled

    compiled(source, arch)


BINDINGS = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))


@pytest.mark.skipif(NVCC is None, reason="no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
@pytest.mark.parametrize("source", BINDINGS, ids=lambda p: p.name)
def test_cuda_bindings_compile_against_torch_headers(source, tmp_path):
    """The CUDA-key bindings (.cpp) are only built by a CUDA torch; check their C++ here anyway.

    A CPU torch wheel ships the c10/cuda headers but not the one that CMake generates for CUDA
    builds; a one-line stand-in lets g++ check the binding code against the real headers.
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = CUDA_TOOLKIT / "include"
    includes = [f"-I{p}" for p in (*include_paths(), str(cuda_include), sysconfig.get_paths()["include"])]
    result = subprocess.run(
        ["c++", "-std=c++20", "-fsyntax-only", "-Werror", f"-I{tmp_path}", *includes, "-DSM4_WITH_CUDA=1", str(source)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"{source.name} does not compile:\n{result.stderr[-4000:]}"


# The compile runs in a fresh interpreter without TRITON_INTERPRET, where @triton.jit gives real
# JIT functions (under the interpreter it gives interpreted ones, which cannot be lowered).
TRITON_COMPILE = """
import importlib, pkgutil, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sm4.kernels
arch = int(sys.argv[1])
count = 0
for info in pkgutil.iter_modules(sm4.kernels.__path__):
    module = importlib.import_module("sm4.kernels." + info.name)
    for kernel, signature, constexprs in getattr(module, "GPU_COMPILE_CHECKS", []):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))
        assert compiled.asm["ptx"], kernel
        count += 1
print("compiled", count)
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_kernels_compile_for_gpu(arch):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", TRITON_COMPILE, arch], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert int(result.stdout.split()[-1]) >= 1, "no Triton kernel declared GPU_COMPILE_CHECKS"


def test_no_two_cuda_sources_compile_to_the_same_object():
    # torch's ninja build names objects by path without the suffix: x.cu and x.cpp would collide
    # (a CPU-only build never compiles csrc/cuda, so only this test sees it).
    stems = [p.stem for p in (ROOT / "csrc" / "cuda").iterdir() if p.suffix in (".cu", ".cpp")]
    assert len(stems) == len(set(stems)), sorted(stems)
