"""What the machine gives a training run: cores, load and torch's thread count, and a warning when
they do not fit.

Torch starts one intra-op thread per core. When other processes already keep the cores busy (the
load average exceeds the core count), those threads wait for each other at every parallel region:
on a loaded 2-core machine a training step took 13-28 s wall for 4-9 s of CPU with 2 threads and
3 s with 1. sm4 leaves the choice to the user (``OMP_NUM_THREADS=1 python -m sm4 ...``, or
``torch.set_num_threads``) and says so when the machine is oversubscribed.
"""

import os

import torch


def cores() -> int:
    """The cores this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The one-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def describe() -> str:
    """e.g. "2 cores, load average 3.10, torch 2 threads"."""
    load = load_average()
    shown = "unknown" if load is None else f"{load:.2f}"
    return f"{cores()} cores, load average {shown}, torch {torch.get_num_threads()} threads"


def oversubscription_warning(load: float | None = None, available: int | None = None,
                             threads: int | None = None) -> str | None:
    """A one-line warning when the load average exceeds the cores and torch uses more than one
    thread (the case where fewer threads run faster); None otherwise."""
    load = load_average() if load is None else load
    available = cores() if available is None else available
    threads = torch.get_num_threads() if threads is None else threads
    if load is None or load <= available or threads <= 1:
        return None
    return (f"warning: the machine is oversubscribed (load average {load:.1f} on {available} cores) and torch runs "
            f"{threads} threads, which then wait for each other; OMP_NUM_THREADS=1 (or fewer threads) is likely faster")
