"""Shared benchmark set-up: the machine's roofline, measured once per run, and ``record()``, which
puts FLOPs, bytes, throughput, roofline fractions and the speedup over the reference into each
result's ``extra_info`` (so ``--benchmark-json`` files compare across runs and machines).

Run: ``pytest benchmarks`` (``make bench`` also saves JSON under results/). ``make test`` runs
them once with ``--benchmark-disable`` so a benchmark cannot rot unnoticed.
"""

import os
import platform

import pytest
import torch

import sm4

# Median seconds of the baselines measured earlier in the run, by "op/shape": the reference
# backend, and the other named baselines (a plain per-expert loop, a dense matmul, the torch_grouped_mm peer).
BASELINES = ("reference", "plain_loop", "dense_mm", "dense_model", "torch_grouped_mm")
_baseline_seconds: dict[str, dict[str, float]] = {name: {} for name in BASELINES}
# bench_peer.py's rows (sm4 beside the best torch-native peer), printed at the end of the run.
PEER_ROWS: list[dict] = []


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device, repeats=5):
    import time

    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def roofline(request, device):
    """Measured copy bandwidth (GB/s) and fp32 matmul throughput (TFLOP/s) of this machine."""
    if request.config.getoption("benchmark_disable"):
        return {"copy_GBps": float("nan"), "matmul_TFLOPs": float("nan")}
    source = torch.empty(64 * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    copy_s = _best_seconds(lambda: target.copy_(source), device)
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    matmul_s = _best_seconds(lambda: a @ a, device, repeats=3)
    return {"copy_GBps": 2 * source.numel() * 4 / copy_s / 1e9, "matmul_TFLOPs": 2 * n**3 / matmul_s / 1e12}


@pytest.fixture
def record(benchmark, roofline, device):
    """Call ``record(op, shape_name, backend, flops=..., bytes_moved=...)`` after ``benchmark(...)``."""

    def _record(op, shape_name, backend, *, flops, bytes_moved):
        info = benchmark.extra_info
        info.update(op=op, shape=shape_name, backend=backend, device=str(device), flops=flops, bytes=bytes_moved)
        info.update(torch=torch.__version__, sm4=sm4.__version__, machine=platform.machine(), roofline=roofline)
        if benchmark.stats is None:  # --benchmark-disable: nothing was timed
            return
        seconds = benchmark.stats.stats.median
        info.update(
            median_s=seconds,
            TFLOPs=flops / seconds / 1e12,
            GBps=bytes_moved / seconds / 1e9,
            fraction_of_matmul_roofline=flops / seconds / 1e12 / roofline["matmul_TFLOPs"],
            fraction_of_copy_roofline=bytes_moved / seconds / 1e9 / roofline["copy_GBps"],
        )
        key = f"{op}/{shape_name}"
        if backend in BASELINES:
            _baseline_seconds[backend][key] = seconds
        for name, measured in _baseline_seconds.items():
            if backend != name and key in measured:
                info[f"speedup_over_{name}"] = measured[key] / seconds

    return _record


def pytest_addoption(parser):
    parser.addoption("--sm4-full", action="store_true", help="run every scale-up shape (benchmarks/shapes.py)")
    parser.addoption("--sm4-compile", action="store_true",
                     help="bench_peer.py: also time the torch.compile'd peer (~30 s of compiling per case)")


def pytest_configure(config):
    # Read by benchmarks/shapes.py when the benchmark modules are imported (collection comes after).
    if config.getoption("--sm4-full", default=False):
        os.environ["SM4_BENCH_FULL"] = "1"
    if config.getoption("--sm4-compile", default=False):
        os.environ["SM4_BENCH_COMPILE"] = "1"


def pytest_terminal_summary(terminalreporter):
    if PEER_ROWS:
        from sm4.bench_report import render_peer_table

        terminalreporter.write_sep("-", "sm4 beside the best torch-native peer (bench_peer.py)")
        terminalreporter.write_line(render_peer_table(PEER_ROWS))


def time_backward(benchmark, forward, device, rounds=20):
    """Time only the backward: each round builds the graph with ``forward()`` (untimed setup),
    then the timed call runs ``loss.backward()`` and synchronises the device."""

    def setup():
        return (forward().square().mean(),), {}

    def backward(loss):
        loss.backward()
        _sync(device)

    benchmark.pedantic(backward, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)
