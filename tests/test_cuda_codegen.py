"""Static checks of the GPU code nvcc generates for csrc/cuda (no GPU needed): every .cu file is
compiled for sm_80 and sm_90 with the flags of the real build (setup.py's CUDAExtension: torch's
common nvcc flags, -std=c++20, -O3 -lineinfo, SM4_WITH_CUDA), every warning an error, into a cubin,
and

* ptxas -v says no kernel (nor any non-inlined device function) spills registers;
* the SASS (cuobjdump -sass) of every kernel that issues tensor-core instructions (HMMA) loads its
  fragments from shared memory with LDSM (ldmatrix), with no MOVM transposes and no generic LD:
  the bf16 WMMA library load compiles to those (csrc/cuda/emulation_seams.cuh, SM4_WMMA_LOAD_SHARED);
* the tensor-core GEMMs exist in both fp16 and bf16 and the two have the same HMMA and LDSM counts.

Each (file, arch) is compiled once per session. cuobjdump is not in every toolkit's bin; Triton's
NVIDIA backend ships one, used when the toolkit has none."""

import atexit
import dataclasses
import functools
import importlib.util
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

from .test_gpu_compile import ARCHS, CUDA_SOURCES, CUDA_TOOLKIT, NVCC

# The tensor-core kernels (demangled name stem) by source file; each is instantiated for both dtypes.
TENSOR_CORE_KERNELS = {"grouped_gemm.cu": ("grouped_mm_tc_kernel", "weight_grad_tc_kernel")}
DTYPES = {"fp16": "6__half", "bf16": "13__nv_bfloat16"}  # as the dtype appears in a mangled name


def find_cuobjdump():
    """cuobjdump of the toolkit, on PATH, or the one Triton's NVIDIA backend ships; None if none."""
    candidates = [CUDA_TOOLKIT / "bin" / "cuobjdump"] if CUDA_TOOLKIT else []
    if shutil.which("cuobjdump"):
        candidates.append(pathlib.Path(shutil.which("cuobjdump")))
    triton = importlib.util.find_spec("triton")
    if triton and triton.submodule_search_locations:
        candidates += [pathlib.Path(p) / "backends" / "nvidia" / "bin" / "cuobjdump" for p in triton.submodule_search_locations]
    return next((str(p) for p in candidates if p.is_file()), None)


CUOBJDUMP = find_cuobjdump()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")
needs_cuobjdump = pytest.mark.skipif(
    NVCC is None or CUOBJDUMP is None,
    reason="nvcc or cuobjdump not found (the toolkit's bin, PATH, or Triton's backends/nvidia/bin)")


@dataclasses.dataclass
class Resources:
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1


@dataclasses.dataclass
class Compiled:
    resources: dict  # mangled function name -> Resources (ptxas -v)
    cubin: pathlib.Path


def real_build_flags(arch: str) -> list[str]:
    """nvcc flags of setup.py's CUDAExtension (torch's BuildExtension adds its common flags and -std)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    return [*COMMON_NVCC_FLAGS, "-std=c++20", "-O3", "-lineinfo", "-DSM4_WITH_CUDA=1",
            *(f"-I{p}" for p in include_paths()), f"-arch=sm_{arch}"]


_PROPERTIES = re.compile(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")
_REGISTERS = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+'\n(?:.*\n)*?.*?Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    resources = {}
    for name, stack, stores, loads in _PROPERTIES.findall(log):
        resources[name] = Resources(stack=int(stack), spill_stores=int(stores), spill_loads=int(loads))
    for name, registers in _REGISTERS.findall(log):
        resources.setdefault(name, Resources()).registers = int(registers)
    return resources


@functools.cache
def _cubin_dir() -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp(prefix="sm4-cuda-codegen-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def compiled(source: pathlib.Path, arch: str) -> Compiled:
    """One nvcc run per (file, arch) and process, for these tests and test_gpu_compile.py's
    test_nvcc_compiles: the real build's flags, every warning an error, ptxas -v."""
    cubin = _cubin_dir() / f"{source.stem}.sm_{arch}.cubin"
    result = subprocess.run([NVCC, *real_build_flags(arch), "-Werror", "all-warnings", "-Xptxas", "-warn-spills",
                             "-cubin", "-Xptxas", "-v", str(source), "-o", str(cubin)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc sm_{arch} failed on {source.name}:\n{result.stderr[-4000:]}"
    resources = parse_ptxas(result.stderr + result.stdout)
    assert resources, f"no ptxas -v report for {source.name}:\n{result.stderr[-2000:]}"
    return Compiled(resources, cubin)


@functools.cache
def sass_opcodes(cubin: pathlib.Path) -> dict:
    """{mangled kernel name: {opcode without modifiers (LDSM, HMMA, LD, ...): count}}."""
    result = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    kernels, current = {}, None
    for line in result.stdout.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = kernels.setdefault(m.group(1), {})
        elif current is not None and (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            current[m.group(1)] = current.get(m.group(1), 0) + 1
    return kernels


def _sources_and_archs():
    return [pytest.param(s, a, id=f"{s.name}-sm_{a}") for s in CUDA_SOURCES for a in ARCHS]


@needs_nvcc
@pytest.mark.parametrize("source, arch", _sources_and_archs())
def test_no_kernel_spills_registers(source, arch):
    resources = compiled(source, arch).resources
    spilling = {name: r for name, r in resources.items() if r.spill_stores or r.spill_loads}
    assert not spilling, f"{source.name} sm_{arch}: register spills (ptxas -v): {spilling}"
    kernels = [name for name, r in resources.items() if r.registers >= 0]
    assert kernels, f"ptxas reported no kernel of {source.name}"


@needs_cuobjdump
@pytest.mark.parametrize("source, arch", _sources_and_archs())
def test_tensor_core_kernels_load_fragments_with_ldmatrix(source, arch):
    """Every kernel with HMMA has LDSM and neither MOVM nor generic LD (of fragments from shared
    memory: the library's bf16 WMMA load, a generic-address wmma.load, compiles to those)."""
    kernels = sass_opcodes(compiled(source, arch).cubin)
    bad = {name: {op: ops.get(op, 0) for op in ("HMMA", "LDSM", "MOVM", "LD")}
           for name, ops in kernels.items()
           if ops.get("HMMA") and (not ops.get("LDSM") or ops.get("MOVM") or ops.get("LD"))}
    assert not bad, f"{source.name} sm_{arch}: tensor-core kernels without ldmatrix fragment loads: {bad}"


@needs_cuobjdump
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source_name, kernel", [(s, k) for s, ks in TENSOR_CORE_KERNELS.items() for k in ks])
def test_tensor_core_gemm_is_the_same_code_for_fp16_and_bf16(source_name, kernel, arch):
    """Each instantiation of a tensor-core GEMM uses HMMA and LDSM, and the bf16 instantiation
    issues as many of each as its fp16 twin (same tiles, same loads)."""
    source = next(s for s in CUDA_SOURCES if s.name == source_name)
    kernels = sass_opcodes(compiled(source, arch).cubin)
    counts = {}
    for name, ops in kernels.items():
        if f"{len(kernel)}{kernel}I" not in name:
            continue
        dtype = next(d for d, mangled in DTYPES.items() if f"{kernel}I{mangled}" in name)
        rest = name.split(DTYPES[dtype], 1)[1].split("EEv", 1)[0]  # the other template arguments, mangled
        counts[(rest, dtype)] = (ops.get("HMMA", 0), ops.get("LDSM", 0))
    assert {d for _, d in counts} == set(DTYPES), f"{kernel} sm_{arch}: instantiations {sorted(counts)}"
    for (rest, dtype), (hmma, ldsm) in counts.items():
        assert hmma > 0 and ldsm > 0, f"{kernel}<{dtype}{rest}> sm_{arch}: HMMA {hmma}, LDSM {ldsm}"
        bf16, fp16 = counts.get((rest, "bf16")), counts.get((rest, "fp16"))
        assert bf16 == fp16, f"{kernel}{rest} sm_{arch}: (HMMA, LDSM) bf16 {bf16} vs fp16 {fp16}"
