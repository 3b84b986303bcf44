"""What the machine gives a training run: cores, load and torch's thread count, and a warning when
they do not fit.

Torch starts one intra-op thread per core. When other processes keep some of those cores busy,
the threads wait for each other at every parallel region (spinning, so the wait even shows as
CPU time). Measured with torch.profiler on the medium setting's training step, 2-core machine:
0.15 s per step with 1 thread, 3.6 s with 2 threads while one other process ran (load average
1.5); the profile of the 1-thread step is model compute (matrix products, attention, the
gating, GELU), no loader or bookkeeping of note. sm4 leaves the choice to the user
(``OMP_NUM_THREADS=1 python -m sm4 ...``, or ``torch.set_num_threads``) and warns when the
machine's load leaves torch's threads fewer free cores than they need.
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
    """A one-line warning when torch runs more than one thread and the load average (other work,
    read before training starts) leaves them fewer free cores than threads, by more than half a
    core; None otherwise."""
    load = load_average() if load is None else load
    available = cores() if available is None else available
    threads = torch.get_num_threads() if threads is None else threads
    if load is None or threads <= 1 or load <= available - threads + 0.5:
        return None
    return (f"warning: the machine is busy (load average {load:.1f} on {available} cores) and torch runs {threads} "
            f"threads, which then wait for each other (a step can take 20x longer); OMP_NUM_THREADS=1 (or fewer "
            f"threads) is likely faster")
