"""GPU code is compiled here even without a GPU: every CUDA source with nvcc for sm_80 and sm_90,
every Triton kernel for the cuda 80 and 90 targets. Running it needs a GPU (see README)."""

import json
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


# ---- Triton: exactly the launches the launchers make (tests/triton_launches.py) ----------------
# The capture and the compiles run in a fresh interpreter without TRITON_INTERPRET (under the
# interpreter @triton.jit gives interpreted functions, which cannot be lowered), once per session
# for both targets, on two worker processes; Triton's cache (~/.triton/cache) makes reruns fast.


@pytest.fixture(scope="session")
def triton_launches():
    """{arch: [inspection]}: every launch of the covering set compiled for sm_80 and sm_90."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.triton_launches", *ARCHS], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    inspections = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {arch: [i for i in inspections if i["arch"] == int(arch)] for arch in ARCHS}


def _listing(launches):
    return "\n".join(f"  {i['label']} ({i['where']}): {i['registers']} registers, {i['stack']} B stack, "
                     f"{i['spill_stores']}/{i['spill_loads']} B spilled, sass {i['sass']}" for i in launches)


def test_the_capture_launches_every_triton_kernel(triton_launches):
    """Every @triton.jit kernel that a launcher starts (not the jit helpers they call) is compiled."""
    import ast

    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                defined.add(node.name)
    for arch, launches in triton_launches.items():
        assert defined <= {i["kernel"] for i in launches}, (arch, sorted(defined - {i["kernel"] for i in launches}))


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_launches_do_not_spill(triton_launches, arch):
    """ptxas reports no spill and no stack frame, and the SASS has no local loads/stores (LDL/STL)."""
    bad = [i for i in triton_launches[arch] if i["spill_stores"] or i["spill_loads"] or i["stack"]
           or (i["sass"] and (i["sass"]["STL"] or i["sass"]["LDL"]))]
    assert not bad, f"sm_{arch}: {len(bad)} of {len(triton_launches[arch])} launches spill:\n{_listing(bad)}"


def _tensor_core_16bit(i):
    return i["dtype"] in ("bf16", "fp16") and (i["kernel"] != "_gating_forward_kernel" or i["constexprs"]["LOW_PRECISION_DOT"])


def _ieee_fp32(i):
    return i["dtype"] == "fp32" and (i["constexprs"].get("PRECISION") == "ieee" or i["kernel"] == "_gating_forward_kernel")


def _aligned(i):
    """Every run-time row stride (and the gating's d) is a multiple of 16 elements: Triton then
    knows the rows are 16-byte aligned and can use 16-byte copies (cp.async, ldmatrix); an odd
    d = 100 is loaded element by element, legitimately without them."""
    strides = ("stride_am", "stride_we", "stride_wk", "stride_wn", "stride_gm", "dim")
    return all(n in i["divisible"] for n in strides if n in i["args"])


def _pipelined(i):
    """An aligned GEMM whose main loop has more than one trip: Triton's pipeline uses cp.async."""
    values = i["constexprs"]
    if not _aligned(i):
        return False
    if i["kernel"] == "_grouped_mm_kernel":
        return values["K_TILES"] > 1
    if i["kernel"] == "_gating_forward_kernel":
        return values["D_BLOCKS"] > 1
    return i["kernel"] == "_grouped_weight_grad_kernel"  # a run-time row loop


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_gemms_use_tensor_cores_ldmatrix_and_cp_async(triton_launches, arch):
    """16-bit GEMMs: tensor-core MMA (wgmma = HGMMA for the grouped GEMMs on sm_90; the gating's
    16- or 32-token tiles are below wgmma's 64 rows and use mma.sync = HMMA) and ldmatrix (LDSM);
    cp.async (LDGSTS) where the K loop has more than one trip; TF32 on tensor cores too."""
    gemms = [i for i in triton_launches[arch] if i["sass"] is not None and i["kernel"] != "_gating_backward_kernel"]
    assert gemms
    problems = []
    for i in gemms:
        sass = i["sass"]
        want = []
        if _tensor_core_16bit(i) or i["constexprs"].get("PRECISION") == "tf32" and i["dtype"] == "fp32":
            wgmma_only = arch == "90" and i["kernel"] != "_gating_forward_kernel"
            mma = sass["HGMMA"] if wgmma_only else sass["HGMMA"] + sass["HMMA"]
            want += [("HGMMA" if wgmma_only else "HMMA/HGMMA", mma)]
            if _tensor_core_16bit(i) and _aligned(i):
                want += [("LDSM", sass["LDSM"])]
        if _pipelined(i):
            want += [("LDGSTS", sass["LDGSTS"])]
        missing = [name for name, count in want if not count]
        if missing:
            problems.append(f"  {i['label']} ({i['where']}): no {', '.join(missing)}; sass {sass}")
    assert not problems, f"sm_{arch}:\n" + "\n".join(problems)


# Shared memory per block: 227 KiB on sm_90 (H100/H200), 163 KiB on sm_80 (A100).
SHARED_LIMIT = {"80": 166912, "90": 232448}


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_launches_fit_in_shared_memory(triton_launches, arch):
    """A launch over the limit compiles but fails at run time (OutOfResources)."""
    big = [i for i in triton_launches[arch] if i["shared"] > SHARED_LIMIT[arch]]
    assert not big, "\n".join(f"{i['label']}: {i['shared']} B" for i in big)


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_fp32_ieee_paths_use_no_tensor_cores(triton_launches, arch):
    exact = [i for i in triton_launches[arch] if i["sass"] is not None and _ieee_fp32(i)]
    assert exact
    bad = [i for i in exact if i["sass"]["HMMA"] or i["sass"]["HGMMA"] or i["ptx"]["mma"] or i["ptx"]["wgmma"]]
    assert not bad, f"sm_{arch}: exact-fp32 GEMMs on tensor cores (TF32 rounding):\n{_listing(bad)}"


def test_no_two_cuda_sources_compile_to_the_same_object():
    # torch's ninja build names objects by path without the suffix: x.cu and x.cpp would collide
    # (a CPU-only build never compiles csrc/cuda, so only this test sees it).
    stems = [p.stem for p in (ROOT / "csrc" / "cuda").iterdir() if p.suffix in (".cu", ".cpp")]
    assert len(stems) == len(set(stems)), sorted(stems)
