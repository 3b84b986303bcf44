"""sm4 beside the best torch-native peer, interleaved in one process (issue #13).

For ``moe_linear``, ``moe_ffn`` and ``moe_qkv`` at every shape of benchmarks/shapes.py (the
papers' small/medium/large, and the scale-up shape(s)), fp32 and bf16, forward (no_grad) and
forward+backward, at 1 thread and at the machine's threads. Each round runs, back to back:

- ``torch_grouped_mm``: the transformers-style peer (benchmarks/peers/torch_grouped_mm.py);
- ``torch_grouped_mm_compiled``: the same under ``torch.compile`` (opt-in: ``--sm4-compile`` or
  SM4_BENCH_COMPILE=1, as each case compiles for ~30 s here; where it does not compile, the row
  says why);
- ``torch_grouped_mm_fp32`` (bf16 rows, where sm4 computes bf16 in fp32 on this CPU, see
  sm4/compute_dtype.py): the peer on fp32 copies of the tensors, cast back to bf16, the casts in
  the call: what a user who knows torch's bf16 CPU matmul is slow would run;
- ``dense_floor``: dense matmuls with the same useful FLOPs, on fp32 operands where sm4 upcasts
  (the router GEMM(s) and one (T*k, d_in) @ (d_in, d_out) per expert layer; forward+backward adds
  the two gradient GEMMs);
- then sm4 (``backend="cpu"``), the row pytest-benchmark times.

The peers and the floor are timed in the round's untimed set-up, so all paths alternate under the
same machine load; the row's extra_info holds each path's median, sm4 / best peer, sm4 / floor
and whether sm4 was the fastest. The terminal summary prints the table (sm4/bench_report.py),
``python -m sm4 bench report --peers results.json`` prints it from a JSON file.

    python -m pytest benchmarks/bench_peer.py --benchmark-json results/peer.json [--sm4-compile]

Smoke (``--benchmark-disable``, part of ``make test``): the papers' shapes at the machine's
threads only, one call per path; the scale-up shapes (seconds per call) are skipped there.
"""

import os
import time

import pytest
import torch

from sm4 import ops
from sm4.compute_dtype import expert_compute_dtype

from .conftest import PEER_ROWS
from .peers import torch_grouped_mm as peer
from .shapes import PAPER, SCALE, tokens

SHAPES = {name: (tokens(s), s["d"], s["h"], s["E"], s["k"]) for name, s in {**PAPER, **SCALE}.items()}
THREADS = sorted({1, torch.get_num_threads()})
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COMPILE = os.environ.get("SM4_BENCH_COMPILE", "0") == "1"  # set by --sm4-compile (benchmarks/conftest.py)
_compiled: dict = {}  # (layer, shape, dtype, mode) -> compiled peer: one each, under dynamo's recompile limit


def _params(layer, shape, dtype, requires_grad):
    """Inputs in sm4.ops' layout: [x, router(s), weights..., biases...] for layer at shape."""
    t, d, h, e, _ = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    randn = lambda *size, scale=1.0: torch.randn(*size, generator=g) * scale  # noqa: E731
    if layer == "moe_qkv":
        tensors = [randn(t, d), randn(3, d, e, scale=d**-0.5), randn(3, e, d, d, scale=d**-0.5), randn(3, e, d) * 0.1]
    elif layer == "moe_linear":
        tensors = [randn(t, d), randn(d, e, scale=d**-0.5), randn(e, d, h, scale=d**-0.5), randn(e, h) * 0.1]
    else:
        tensors = [randn(t, d), randn(d, e, scale=d**-0.5), randn(e, d, h, scale=d**-0.5), randn(e, h) * 0.1,
                   randn(e, h, d, scale=h**-0.5), randn(e, d) * 0.1]
    return [x.to(dtype).requires_grad_(requires_grad) for x in tensors]


def _sm4(layer, tensors, k):
    if layer == "moe_qkv":
        x, routers, w, b = tensors
        return ops.moe_qkv(x, tuple(routers.unbind(0)), w, b, k, backend="cpu")[0]
    return getattr(ops, layer)(*tensors, k, backend="cpu").output


def _peer_call(fn, layer, tensors, k):
    if layer == "moe_qkv":
        x, routers, w, b = tensors
        return fn(x, routers.unbind(0), w, b, k)
    return fn(*tensors, k)


def _floor_operands(layer, shape, dtype, requires_grad):
    """[(a, b), ...]: the dense GEMMs with the layer's useful FLOPs."""
    t, d, h, e, k = SHAPES[shape]
    out = d if layer == "moe_qkv" else h
    g = torch.Generator().manual_seed(1)
    mk = lambda *size: torch.randn(*size, generator=g).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    routers = 3 if layer == "moe_qkv" else 1
    pairs = [(mk(t, d), mk(d, routers * e)), (mk(routers * t * k, d), mk(d, out))]
    if layer == "moe_ffn":
        pairs.append((mk(t * k, h), mk(h, d)))
    return pairs


def useful_flops(layer, shape):
    t, d, h, e, k = SHAPES[shape]
    if layer == "moe_qkv":
        return 3 * (2 * t * d * e + 2 * t * k * d * d)
    return 2 * t * d * e + 2 * t * k * d * h * (2 if layer == "moe_ffn" else 1)


def _runner(call, mode):
    """A no-argument function that runs call() in mode (forward: no_grad; else + backward)."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                call()
        return run

    def run():
        outputs = call()
        for out in outputs if isinstance(outputs, list) else [outputs]:
            out.backward(torch.ones_like(out))  # a dense (not expanded) gradient: grouped_mm needs strides
    return run


def _compiled_peer(case, run_once):
    """The compiled peer of case (layer, ...), or (None, reason) when torch.compile fails on it."""
    if not COMPILE:
        return None, "compiled peer not run (--sm4-compile)"
    if case not in _compiled:
        _compiled[case] = torch.compile(peer.LAYERS[case[0]], dynamic=False)
    fn = _compiled[case]
    try:
        run_once(fn)
    except Exception as error:  # noqa: BLE001 - the reason goes into the row
        message = str(error).strip().splitlines()
        # the meta kernel's own words (e.g. "Expected inputs of BF16 type ...") where there are some
        detail = next((line for line in message if "Expected" in line), message[0] if message else "")
        return None, f"torch.compile fails: {type(error).__name__}: {detail[:160]}"
    return fn, None


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", THREADS, indirect=True, ids=lambda n: f"{n}t")
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("layer", ["moe_linear", "moe_ffn", "moe_qkv"])
def test_peer(benchmark, record, request, layer, shape, dtype, mode, threads):
    smoke = request.config.getoption("benchmark_disable")
    if smoke and shape in SCALE:
        pytest.skip("smoke run: the scale-up shape takes seconds per call (timed runs include it)")
    if smoke and threads != max(THREADS):
        pytest.skip("smoke run: the machine's threads only")
    torch_dtype = DTYPES[dtype]
    k = SHAPES[shape][4]
    grad = mode != "forward"
    tensors = _params(layer, shape, torch_dtype, grad)
    # bf16 on a CPU without a bf16 matrix unit: sm4 computes in fp32 (sm4/compute_dtype.py), and so
    # may a knowledgeable user: the peer on fp32 copies (casts inside the call, output back to bf16)
    # is a second peer, and the floor's GEMMs run on fp32 operands (cast outside the timed call).
    upcast = expert_compute_dtype(torch_dtype, torch.device("cpu")) != torch_dtype
    floor = _floor_operands(layer, shape, torch.float32 if upcast else torch_dtype, grad)

    paths = {"torch_grouped_mm": _runner(lambda: _peer_call(peer.LAYERS[layer], layer, tensors, k), mode)}
    if upcast:
        paths["torch_grouped_mm_fp32"] = _runner(
            lambda: _peer_call(peer.LAYERS[layer], layer, [t.float() for t in tensors], k).to(torch_dtype), mode)
    compiled, compile_note = _compiled_peer((layer, shape, dtype, mode), lambda fn: _runner(lambda: _peer_call(fn, layer, tensors, k), mode)())
    if compiled is not None:
        paths["torch_grouped_mm_compiled"] = _runner(lambda: _peer_call(compiled, layer, tensors, k), mode)
    paths["dense_floor"] = _runner(lambda: [a @ b for a, b in floor], mode)
    seconds = {name: [] for name in paths}

    def interleaved_peers():  # untimed set-up of each round: every other path once, timed here
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
        return (), {}

    rounds = 2 if shape in SCALE else 20  # a scale-up round takes 10-60 s here
    benchmark.pedantic(_runner(lambda: _sm4(layer, tensors, k), mode), setup=interleaved_peers, rounds=rounds,
                       warmup_rounds=1)
    flops = useful_flops(layer, shape) * (3 if grad else 1)
    element = torch.tensor([], dtype=torch_dtype).element_size()
    record(f"{layer}_{mode}", f"{shape}/{dtype}/{threads}t", "cpu", flops=flops,
           bytes_moved=element * sum(t.numel() for t in tensors) * (2 if grad else 1))
    if benchmark.stats is None:
        return
    medians = {name: sorted(v)[len(v) // 2] for name, v in seconds.items() if v}
    sm4_s = benchmark.stats.stats.median
    peers = {n: s for n, s in medians.items() if n != "dense_floor"}
    best = min(peers, key=peers.get)
    row = dict(layer=layer, mode=mode, shape=shape, dtype=dtype, threads=threads, sm4_s=sm4_s, peer_s=peers,
               best_peer=best, sm4_over_best_peer=sm4_s / peers[best], floor_s=medians["dense_floor"],
               sm4_over_floor=sm4_s / medians["dense_floor"], sm4_fastest=sm4_s < peers[best],
               compile_note=compile_note or "")
    benchmark.extra_info["peer_comparison"] = row
    PEER_ROWS.append(row)
