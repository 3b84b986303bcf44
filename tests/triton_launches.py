"""The Triton launches sm4's launchers really make, captured and compiled without a GPU.

A Triton kernel's machine code depends on more than its source: on the launch's ``num_warps`` /
``num_stages``, on the constexprs, and on what Triton's binder specialises from the arguments
(a pointer or an int divisible by 16 gets the "D" attribute, an int equal to 1 becomes a
constexpr). Compiling hand-written signatures misses all of that, so this module runs the public
launchers of ``sm4.kernels`` on **meta tensors** (shapes, dtypes, strides and 16-byte alignment
without storage) with every ``JITFunction.run`` replaced by a recorder that calls Triton's own
binder for a ``GPUTarget("cuda", arch, 32)``. A launcher that read a tensor on the host (a sync)
would fail on meta tensors, so the capture also shows the launch paths are sync-free.

    capture(archs) -> {arch: [Launch]}       distinct launches (kernel, signature, constexprs, attrs, options)
    covering(launches) -> [Launch]           one launch per code shape (see SWITCHES)
    compile_and_inspect(launch, arch, sass)  -> dict: registers, stack, spills, PTX and SASS instruction counts

``python -m tests.triton_launches 80 90`` prints the inspection of every covering launch as JSON
lines, compiled on two worker processes; it must run without TRITON_INTERPRET (under the
interpreter ``@triton.jit`` gives functions that cannot be lowered), so tests/test_gpu_compile.py
runs it in a fresh interpreter.
"""

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# The shapes: the layer (d = 1024, E = 64, k = 2), a small d = 64 one with many small
# experts (one K tile, one D block, E = 256), a wide router (E = 256, k = 8), an odd one (E = 13,
# nothing a power of two or divisible by 16) and d = 64 with few experts (128-row tiles, E = 8).
# Each is (tokens, d, hidden, experts, k).
SHAPES = {
    "issue": (4096, 1024, 2048, 64, 2),
    "small": (512, 64, 128, 256, 2),
    "wide": (2048, 1024, 1024, 256, 8),
    "odd": (300, 100, 200, 13, 3),
    "few": (1024, 64, 128, 8, 2),
}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One distinct compile of a kernel, as the launcher's call binds it."""

    kernel: str  # module.function
    signature: tuple  # ((name, type), ...) as Triton's binder gives it
    constexprs: tuple  # ((path, value), ...)
    attrs: tuple  # ((path, attributes), ...): divisibility specialisations
    num_warps: int
    num_stages: int
    options: tuple = dataclasses.field(compare=False)  # every option, for triton.compile
    where: str = dataclasses.field(compare=False, default="")  # the first call that made it

    def values(self) -> dict:
        """The constexprs by parameter name."""
        return {self.signature[path[0]][0]: value for path, value in self.constexprs}

    def dtype(self) -> str:
        """The data dtype: the first pointer that is not an index (i32/i64) pointer."""
        return next((kind[1:] for _, kind in self.signature if kind.startswith("*") and kind[1] != "i"), "")

    def label(self) -> str:
        keys = ",".join(f"{k}={v}" for k, v in self.values().items() if k.isupper() or k.startswith("stride"))
        return f"{self.kernel.rsplit('.', 1)[1]}[{self.dtype()} w{self.num_warps} s{self.num_stages} {keys}]"


def _kernels():
    import sm4.kernels.expert_histogram as histogram
    import sm4.kernels.grouped_gemm as grouped_gemm
    import sm4.kernels.permutation as permutation
    import sm4.kernels.topk_gating as topk_gating

    return histogram, grouped_gemm, permutation, topk_gating


@contextlib.contextmanager
def _recording(archs, sinks: dict, where: list):
    """Every Triton kernel of sm4.kernels records its launches into sinks[arch] instead of running."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    binders = {}

    def run(self, *args, grid, warmup, **kwargs):
        # The same steps as JITFunction.run up to the compile (triton/runtime/jit.py), per target.
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        for arch, backend in backends.items():
            key = (id(self), arch)
            if key not in binders:
                binders[key] = create_function_from_signature(self.signature, self.params, backend)
            bound_args, specialization, options = binders[key](*args, **kwargs)
            options, signature, constexprs, attrs = self._pack_args(backend, dict(kwargs), bound_args, specialization,
                                                                    options)
            launch = Launch(
                kernel=f"{self.fn.__module__}.{self.fn.__name__}",
                signature=tuple(signature.items()),
                constexprs=tuple(sorted((path, _plain(value)) for path, value in constexprs.items())),
                attrs=tuple(sorted((path, tuple(map(tuple, value))) for path, value in attrs.items() if value)),
                num_warps=options.num_warps, num_stages=options.num_stages,
                options=tuple(sorted((k, v) for k, v in options.__dict__.items() if _is_plain(v))),
                where=where[0],
            )
            sinks[arch].setdefault(launch, launch)

    kernels = [obj for module in _kernels() for obj in vars(module).values() if isinstance(obj, JITFunction)]
    for kernel in kernels:
        kernel.run = run.__get__(kernel)
    try:
        yield
    finally:
        for kernel in kernels:
            del kernel.run


def _plain(value):
    """A constexpr as a hashable, printable Python value."""
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def _is_plain(value):
    return isinstance(value, (bool, int, float, str, type(None))) or (
        isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value))


def _meta(*shape, dtype=torch.float32, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def _raw(op):
    """The Python body of a torch.library.custom_op (on meta tensors the op would call its fake)."""
    return getattr(op, "_init_fn", op)


@contextlib.contextmanager
def _raw_ops(module):
    """module's custom ops replaced by their bodies, so the module's wrappers launch for real."""
    from torch._library.custom_ops import CustomOpDef

    saved = {name: op for name, op in vars(module).items() if isinstance(op, CustomOpDef)}
    for name, op in saved.items():
        setattr(module, name, _raw(op))
    try:
        yield
    finally:
        for name, op in saved.items():
            setattr(module, name, op)


def _gating_calls(dtype, tokens, dim, experts, k):
    """Training (noise and per-token k, forward and backward) and inference calls of the router."""
    from sm4.kernels import topk_gating

    forward, backward = _raw(topk_gating.gating_forward), _raw(topk_gating.gating_backward)
    x, weight = _meta(tokens, dim, dtype=dtype), _meta(dim, experts, dtype=dtype)
    noise, token_k = _meta(tokens, experts), _meta(tokens, dtype=torch.int64)
    gates, ids, _entropy, _imp, _load, _counts, runner, logits = forward(x, weight, noise, token_k, k, 1.0 / experts, False)
    backward(gates, _meta(experts), _meta(experts), logits, noise, ids, runner, 1.0 / experts, False)
    forward(x, weight, None, None, k, 0.0, dtype == torch.float32)  # inference (renormalised, fp32)
    if dtype == torch.float32:  # training with noise_std = 0: the backward without noise
        backward(gates, _meta(experts), _meta(experts), logits, None, ids, runner, 0.0, True)


def _permutation_calls(dtype, tokens, dim, experts, k):
    from sm4.kernels import expert_histogram, permutation

    ids = _meta(tokens, k, dtype=torch.int64)
    _raw(expert_histogram.expert_histogram)(ids, experts)
    _raw(expert_histogram.expert_histogram)(ids.to(torch.int32), experts)
    _counts, offsets, _sa, _st, rows = _raw(permutation.routing_metadata_op)(ids, experts)
    x = _meta(tokens, dim, dtype=dtype)
    x_sorted = _raw(permutation.permute_op)(x, rows, offsets)
    gates = _meta(tokens, k, dtype=dtype)
    _raw(permutation.unpermute_op)(x_sorted, gates, rows, offsets)
    grad_sorted, _ = _raw(permutation.unpermute_backward_op)(x, x_sorted, gates, rows, offsets)
    _raw(permutation.permute_backward_op)(grad_sorted, rows)


def _grouped_calls(dtype, tokens, dim, hidden, experts, k, fused_only=False):
    """The expert layers of sm4.grouped, forward and backward (training) and forward (inference)."""
    from sm4 import grouped
    from sm4.kernels import grouped_gemm

    ops = grouped.make_backend_ops(grouped.GroupedKernels(grouped_gemm.grouped_mm, grouped_gemm.grouped_weight_grad))
    rows = tokens * k
    offsets, index = _meta(experts + 1, dtype=torch.int64), _meta(rows, dtype=torch.int64)
    from sm4.types import RoutingMetadata

    metadata = RoutingMetadata(_meta(experts, dtype=torch.int64), offsets, index, index, _meta(tokens, k, dtype=torch.int64))
    gates = _meta(tokens, k, dtype=dtype)

    def params(*shape):
        return _meta(*shape, dtype=dtype, grad=True)

    w1, b1, w2, b2 = params(experts, dim, hidden), params(experts, hidden), params(experts, hidden, dim), params(experts, dim)
    x = params(tokens, dim)
    ops["expert_ffn"](x, w1, b1, w2, b2, gates, metadata).sum().backward()
    with torch.no_grad():
        ops["expert_ffn"](x, w1, b1, w2, b2, gates, metadata, activation="gelu_tanh")
    if fused_only:
        return
    ops["expert_linear"](x, w1, None, gates, metadata).sum().backward()
    x_sorted = params(rows, dim)
    ops["grouped_ffn"](x_sorted, w1, b1, w2, b2, offsets, recompute_hidden=True).sum().backward()


def scenarios():
    """(where, call) pairs: every launcher path on the representative shapes and dtypes."""
    for shape, (tokens, dim, hidden, experts, k) in SHAPES.items():
        for dtype in DTYPES:
            name = f"{shape} {str(dtype)[6:]}"
            if dtype == torch.float16 and shape != "issue":
                continue  # fp16 follows bf16's code paths: the issue's shape is enough
            yield f"gating {name}", lambda d=dtype, s=(tokens, dim, experts, k): _gating_calls(d, *s)
            yield f"permutation {name}", lambda d=dtype, s=(tokens, dim, experts, k): _permutation_calls(d, *s)
            yield f"grouped {name}", lambda d=dtype, s=(tokens, dim, hidden, experts, k), f=dtype == torch.float16: \
                _grouped_calls(d, *s, fused_only=f)
    # TF32 for fp32 matmuls, when torch allows it.
    yield "grouped issue float32 tf32", lambda: _with_tf32(lambda: _grouped_calls(torch.float32, *SHAPES["issue"], fused_only=True))


def _with_tf32(call):
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        call()
    finally:
        matmul.allow_tf32 = previous


def capture(archs=(80, 90)) -> dict:
    """{arch: the distinct launches of every scenario for GPUTarget("cuda", arch, 32), first-seen order}."""
    from sm4.kernels import grouped_gemm, permutation

    sinks, where = {arch: {} for arch in archs}, [""]
    with _recording(archs, sinks, where), _raw_ops(grouped_gemm), _raw_ops(permutation):
        for name, call in scenarios():
            where[0] = name
            call()
    return {arch: list(sink) for arch, sink in sinks.items()}


# ---- compile and inspect -------------------------------------------------------------------

def _tool(name: str) -> str:
    """A CUDA binary tool: the one Triton ships, else the toolkit's."""
    import triton

    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(shipped):
        return shipped
    return os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)


# PTX instructions: tensor-core MMA (wgmma on sm_90, mma.sync on both), ldmatrix, cp.async.
PTX_OPS = {"wgmma": r"\bwgmma\.mma_async", "mma": r"\bmma\.sync", "ldmatrix": r"\bldmatrix\.", "cp.async": r"\bcp\.async\.(?:ca|cg)"}
# SASS opcodes: the same in machine code (HGMMA = wgmma, HMMA = mma.sync, LDSM, LDGSTS = cp.async)
# and local-memory traffic (STL / LDL: register spills).
SASS_OPS = ("HGMMA", "HMMA", "LDSM", "LDGSTS", "STL", "LDL")
PTXAS_LOG = "sm4.ptxas.log"  # kept beside the cubin in Triton's cache: warm runs need no ptxas
SASS_COUNTS = "sm4.sass.json"  # and the SASS counts: warm runs need no disassembly


def _ptxas_log(compiled, printed: str, arch: int) -> str:
    """ptxas -v's report of this compile: printed by Triton when it compiled, else from our cache
    entry, else from running ptxas -v on the PTX once (a cubin cached by another process)."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    if "registers" in printed:
        cache.put(printed, PTXAS_LOG, binary=False)
        return printed
    path = cache.get_file(PTXAS_LOG)
    if path:
        with open(path) as f:
            return f.read()
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(sm_arch_from_capability(arch)).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                              f"--gpu-name={sm_arch_from_capability(arch)}", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    cache.put(log, PTXAS_LOG, binary=False)
    return log


def _sass_counts(compiled) -> dict:
    """SASS_OPS counts of the cubin, kept beside it in Triton's cache (a disassembly costs ~0.6 s)."""
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(compiled.hash)
    path = cache.get_file(SASS_COUNTS)
    if path:
        with open(path) as f:
            return json.load(f)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in SASS_OPS}
    cache.put(json.dumps(counts), SASS_COUNTS, binary=False)
    return counts


def has_dot(launch: Launch) -> bool:
    """The kernels with a tl.dot: the ones whose tensor-core and pipelining instructions are checked."""
    return launch.kernel.endswith(("_grouped_mm_kernel", "_grouped_weight_grad_kernel", "_gating_forward_kernel"))


def compile_and_inspect(launch: Launch, arch: int, sass: bool) -> dict:
    """Compile the launch for sm_<arch> as Triton would at run time; its resources and instructions.

    registers / stack / spill_stores / spill_loads from ptxas -v; ptx: PTX_OPS counts; sass:
    SASS_OPS counts from cuobjdump (when sass is true: the disassembly costs ~0.6 s of CPU).
    """
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel_by_name(launch.kernel)
    attrs = {path: [list(a) for a in value] for path, value in launch.attrs}
    source = ASTSource(kernel, dict(launch.signature), dict(launch.constexprs), attrs)
    printed = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report when it compiles
    with contextlib.redirect_stdout(printed):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    log = _ptxas_log(compiled, printed.getvalue(), arch)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    stack, spill_stores, spill_loads = map(int, frame.groups()) if frame else (0, 0, 0)
    ptx = compiled.asm["ptx"]
    return dict(
        label=launch.label(), kernel=launch.kernel.rsplit(".", 1)[1], where=launch.where, arch=arch,
        dtype=launch.dtype(), constexprs=launch.values(), num_warps=launch.num_warps, num_stages=launch.num_stages,
        registers=int(registers.group(1)) if registers else None, stack=stack, spill_stores=spill_stores,
        spill_loads=spill_loads, shared=compiled.metadata.shared,
        args=[name for name, kind in launch.signature if kind != "constexpr"],
        divisible=sorted(launch.signature[path[0]][0] for path, value in launch.attrs if ("tt.divisibility", 16) in value),
        ptx={name: len(re.findall(pattern, ptx)) for name, pattern in PTX_OPS.items()},
        sass=_sass_counts(compiled) if sass else None,
    )


def _kernel_by_name(qualified: str):
    import importlib

    module, name = qualified.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _inspect_job(job):
    launch, arch, sass = job
    return compile_and_inspect(launch, arch, sass)


def main(argv):
    """Print one JSON line per compiled launch. SM4_TRITON_LAUNCHES=all compiles every captured
    launch instead of the covering set; SM4_TRITON_SASS=all disassembles every launch (default:
    the tl.dot kernels and any with a stack frame)."""
    import multiprocessing

    archs = [int(a) for a in argv[1:]] or [80, 90]
    everything = os.environ.get("SM4_TRITON_LAUNCHES") == "all"
    sass_all = os.environ.get("SM4_TRITON_SASS") == "all"
    jobs = []
    for arch, launches in capture(tuple(archs)).items():
        jobs += [(launch, arch, sass_all or has_dot(launch)) for launch in (launches if everything else covering(launches))]
    jobs.sort(key=lambda job: not has_dot(job[0]))  # the long compiles first: the two workers finish together
    workers = max(1, min(2, os.cpu_count() or 1))
    # fork: the workers inherit the imported kernels (no second import of torch and sm4).
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for result in pool.imap_unordered(_inspect_job, jobs):
            print(json.dumps(result), flush=True)


# ---- the covering set ----------------------------------------------------------------------

# Constexprs that switch a part of the prologue or epilogue on (an index load, a bias, a store,
# the gating's training-only noise terms) or set the routing's k; launches that differ only in
# these (and in trip counts, 1 vs more, and the divisibility of sizes) have the same tiles, warps,
# stages and main loop. The covering set keeps one launch per such shape: the one with the most
# switched on, which needs the most registers. SM4_TRITON_LAUNCHES=all compiles every launch.
SWITCHES = ("HAS_BIAS", "HAS_GATHER", "HAS_SCATTER", "HAS_SCALE", "ACTIVATION", "SAVE_PREACT", "HAS_NOISE", "HAS_TOKEN_K",
            "RENORMALIZE", "HAS_A_INDEX", "HAS_G_INDEX", "COMPUTE_BIAS", "K", "K_PAD", "NUM_RANKED")
TRIPS = ("K_TILES", "D_BLOCKS", "SEARCH_STEPS", "NUM_BLOCKS")


# The kernels without tl.dot only move rows: there the widest row tile is the heaviest of one
# element width (bf16 and fp16 move the same bytes).
ROW_SWITCHES = ("BLOCK_D", "HAS_WEIGHTS")
WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2}


def _switches(launch: Launch) -> tuple:
    return SWITCHES if has_dot(launch) else SWITCHES + ROW_SWITCHES


def shape_key(launch: Launch) -> tuple:
    values, switches = launch.values(), _switches(launch)
    kept = tuple((name, min(value, 2) if name in TRIPS else value) for name, value in values.items() if name not in switches)
    dtype = launch.dtype() if has_dot(launch) else WIDTH.get(launch.dtype(), 0)
    return launch.kernel, dtype, launch.num_warps, launch.num_stages, kept


def weight(launch: Launch) -> int:
    values = launch.values()
    return (sum(int(values[name]) for name in _switches(launch) if name in values)
            + sum(min(values[name], 64) for name in TRIPS if name in values))


def covering(launches: list) -> list:
    """One launch per shape_key (the heaviest), in first-seen order of the keys."""
    best = {}
    for launch in launches:
        key = shape_key(launch)
        if key not in best or weight(launch) > weight(best[key]):
            best[key] = launch
    return list(best.values())


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("run without TRITON_INTERPRET: interpreted kernels cannot be compiled for a GPU")
    main(sys.argv)
