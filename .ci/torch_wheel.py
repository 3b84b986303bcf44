#!/usr/bin/env python3
"""Print the pip arguments that install torch's CPU build, for the Makefile (stdlib only: it runs
before anything is installed).

The pin carries the ``+cpu`` local version, so it can only ever resolve to the CPU wheel: on PyPI
``torch==2.13.0`` is the CUDA build (about 20 ``nvidia-*`` packages, gigabytes). Where PyTorch's CPU
wheel index answers, the arguments name it (``--index-url``, which also serves torch's own
dependencies); where it does not (an offline machine whose pip configuration offers a local
folder of wheels, ``find-links``), the bare pin, which pip then finds there or refuses with "No
matching distribution found for torch==2.13.0+cpu".

    python3 .ci/torch_wheel.py                   # e.g. torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu
    python3 .ci/torch_wheel.py --explain         # the same, with the reason on stderr
"""

import argparse
import sys
import urllib.error
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_VERSION = "2.13.0"


def reachable(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pip_arguments(version: str = TORCH_VERSION, index: str = CPU_INDEX, timeout: float = 5.0) -> tuple[list[str], str]:
    """(pip install arguments, why)."""
    pin = f"torch=={version}+cpu"
    if reachable(index, timeout):
        return [pin, "--index-url", index], f"PyTorch's CPU wheel index {index} answers"
    return [pin], f"{index} does not answer: the pinned CPU wheel must come from pip's configured sources (find-links)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default=TORCH_VERSION)
    parser.add_argument("--index", default=CPU_INDEX)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--explain", action="store_true")
    args = parser.parse_args(argv)
    arguments, why = pip_arguments(args.version, args.index, args.timeout)
    if args.explain:
        print(f"torch: {why}", file=sys.stderr)
    print(" ".join(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
