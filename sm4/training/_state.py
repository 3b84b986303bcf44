"""Checks and JSON encoding shared by the adaptive mechanisms' arguments and ``state_dict``s:
modality lists, scalar losses, modality-id tensors, non-finite floats as strings, state versions."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch

STATE_VERSION = 1


def _check_modalities(modalities, owner: str) -> tuple[str, ...]:
    if isinstance(modalities, str) or not isinstance(modalities, Iterable):
        raise TypeError(f"{owner}: modalities must be a list of str, got {type(modalities).__name__}")
    modalities = tuple(modalities)
    if not modalities:
        raise ValueError(f"{owner}: modalities must not be empty")
    for m in modalities:
        if not isinstance(m, str):
            raise TypeError(f"{owner}: modality names must be str, got {m!r}")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"{owner}: modality names must be unique, got {list(modalities)}")
    return modalities


def _to_float(value, what: str) -> float:
    """A Python number or a one-element tensor as a float (the tensor case reads it to the host)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number, got a bool")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}")
    return float(value)


def _encode_float(x: float) -> float | str:
    """JSON-safe float: finite floats as they are, others as "inf" / "-inf" / "nan"."""
    return x if math.isfinite(x) else str(x)


def _decode_float(x) -> float:
    if isinstance(x, str):
        if x not in ("inf", "-inf", "nan"):
            raise ValueError(f"not an encoded float: {x!r}")
        return float(x)
    return float(x)


def _check_modality_ids(modality_ids, owner: str):
    if not isinstance(modality_ids, torch.Tensor):
        raise TypeError(f"{owner}: modality_ids must be a tensor, got {type(modality_ids).__name__}")
    if modality_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{owner}: modality_ids must be an integer tensor, got {modality_ids.dtype}")


def _check_config(saved: Mapping, owner: str, **expected) -> None:
    version = saved.get("version")
    if version != STATE_VERSION:
        raise ValueError(f"{owner}.load_state_dict: unsupported state version {version!r} (expected {STATE_VERSION})")
    for key, value in expected.items():
        got = saved.get(key)
        if isinstance(value, tuple):
            got = tuple(got) if isinstance(got, (list, tuple)) else got
        if got != value:
            raise ValueError(f"{owner}.load_state_dict: the state has {key}={got!r} but this instance has {value!r}")


def _json_copy(value):
    """Deep copy of nested dict/list/scalars (history entries)."""
    if isinstance(value, Mapping):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    return value
