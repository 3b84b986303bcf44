"""Every benchmark's shapes, in one place, named so that ``-k small|medium|large`` selects a
setting of the papers and ``-k scale`` the scale-up shapes.

PAPER: the layer-level shapes of the three published settings (SM4_SPEC §4): T = batch x tokens,
where a task's tokens are its modalities' latents (two modalities: 2 x N), width d = C = 64, FFN
hidden h = 2C, 8 heads, k = 2. SCALE: scale-up shapes (T = 16384, d = 1024 to 4096, E = 8 to
64, k = 1 to 4); a default run keeps one per benchmark (a default CPU run takes a few minutes),
``pytest benchmarks --sm4-full`` (or SM4_BENCH_FULL=1) runs them all.
"""

import os

FULL = os.environ.get("SM4_BENCH_FULL", "0") == "1"  # set by --sm4-full (benchmarks/conftest.py)

# name: dict(batch, tokens, d, h, E, k, heads)
PAPER = {
    "small": dict(batch=28, tokens=2 * 20, d=64, h=128, E=16, k=2, heads=8),
    "medium": dict(batch=32, tokens=2 * 12, d=64, h=128, E=32, k=2, heads=8),
    "large": dict(batch=32, tokens=2 * 12, d=64, h=128, E=16, k=2, heads=8),
}

# name: dict(T, d, h, E, k)
_SCALE_ALL = {
    f"scale_T16384_d{d}_E{e}_k{k}": dict(T=16384, d=d, h=4 * d, E=e, k=k)
    for d in (1024, 4096) for e in (8, 64) for k in (1, 2, 4)
}
SCALE = _SCALE_ALL if FULL else {"scale_T16384_d1024_E64_k2": _SCALE_ALL["scale_T16384_d1024_E64_k2"]}


def tokens(shape: dict) -> int:
    return shape["T"] if "T" in shape else shape["batch"] * shape["tokens"]


def routing_shapes() -> dict[str, tuple[int, int, int, int]]:
    """{name: (T, d, E, k)} for the routing benchmarks (gating, histogram, permutation)."""
    shapes = {name: (tokens(s), s["d"], s["E"], s["k"]) for name, s in PAPER.items()}
    shapes.update({name: (s["T"], s["d"], s["E"], s["k"]) for name, s in SCALE.items()})
    return shapes
