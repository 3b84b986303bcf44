"""Choosing the backend of each op call.

Order of precedence for what the caller asks:
    1. the op's ``backend=`` argument ("auto" or None defers to the next rule);
    2. the innermost ``with sm4.use_backend(name):`` block;
    3. the ``SM4_BACKEND`` environment variable (read at each call);
    4. automatic: the first backend of ``sm4.backends.PREFERENCE`` that supports the inputs.

A forced backend is strict: if it cannot run the call, ``BackendNotSupportedError`` says why,
and nothing falls back silently to another backend.
"""

import contextlib
import os
from collections.abc import Callable, Iterable

import torch

from .backends import BACKENDS, PREFERENCE

BACKEND_ENV = "SM4_BACKEND"
_forced: list[str] = []  # the use_backend() stack


class BackendNotSupportedError(NotImplementedError):
    """No backend (or not the forced one) can run this call; the message lists each reason."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{source}: unknown sm4 backend {name!r}; choose from {['auto', *BACKENDS]}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force every sm4 op in the block onto backend ``name`` ("auto" restores auto-dispatch)."""
    _forced.append(_check_name(name, "sm4.use_backend"))
    try:
        yield
    finally:
        _forced.pop()


def requested_backend(argument: str | None) -> tuple[str, str]:
    """(backend name or "auto", where that choice came from)."""
    if argument not in (None, "auto"):
        return _check_name(argument, "backend="), "the backend= argument"
    if _forced and _forced[-1] != "auto":
        return _forced[-1], "sm4.use_backend()"
    env = os.environ.get(BACKEND_ENV, "auto") or "auto"
    if env != "auto":
        return _check_name(env, BACKEND_ENV), BACKEND_ENV
    return "auto", "auto"


def _named_dtypes(backend, named: dict) -> list[str]:
    """Which arguments have a float dtype the backend refuses, e.g. ["noise is torch.float64"]."""
    return [f"{arg} is {t.dtype}" for arg, t in named.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in backend.dtypes]


def select(
    op: str, tensors: Iterable[torch.Tensor] | dict, backend: str | None = None, sizes: dict[str, int] | None = None
) -> tuple[str, Callable]:
    """Return (backend name, implementation) for one call of ``op`` on ``tensors``.

    tensors: the call's tensors, or {argument name: tensor}, so that a refusal names the argument
    whose dtype the backend refuses. sizes: the call's sizes by name (e.g. {"E": 64}) for the
    backends' size limits.
    """
    named = tensors if isinstance(tensors, dict) else {}
    tensors = [t for t in (tensors.values() if named else tensors) if isinstance(t, torch.Tensor)]
    name, source = requested_backend(backend)
    if name != "auto":
        reasons = BACKENDS[name].not_supported_reasons(op, tensors, forced=True, sizes=sizes)
        if reasons:
            reasons += _named_dtypes(BACKENDS[name], named)
            raise BackendNotSupportedError(
                f"sm4.ops.{op}: backend {name!r} (forced by {source}) cannot run this call: "
                + "; ".join(reasons)
            )
        return name, BACKENDS[name].kernels[op]
    refusals = []
    for candidate in PREFERENCE:
        reasons = candidate.not_supported_reasons(op, tensors, forced=False, sizes=sizes)
        if not reasons:
            return candidate.name, candidate.kernels[op]
        refusals.append(f"  {candidate.name}: " + "; ".join(reasons + _named_dtypes(candidate, named)))
    raise BackendNotSupportedError(f"sm4.ops.{op}: no backend can run this call:\n" + "\n".join(refusals))


def available_backends() -> dict[str, str | None]:
    """{backend name: None if usable on this machine, else why not}."""
    return {name: backend.unavailable_reason for name, backend in BACKENDS.items()}


def implemented_ops() -> dict[str, list[str]]:
    """{backend name: ops it implements on this machine}."""
    return {name: sorted(backend.kernels) for name, backend in BACKENDS.items()}
