"""The restricted unpickler of the MultiBench pickles: numpy arrays and plain containers only (no code runs)."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

from ._common import _require_file


# Only what numpy arrays and plain containers need; numpy 1.x pickles name numpy.core.*.
_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"), ("collections", "OrderedDict"),
    # MultiBench's pickles hold defaultdicts; their default_factory is a plain type (no code runs).
    ("collections", "defaultdict"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "int"),
    ("builtins", "float"), ("builtins", "set"), ("builtins", "tuple"),
})


class _Refused(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core.") else module
        if (canonical, name) not in _PICKLE_GLOBALS:
            raise _Refused(f"{module}.{name}")
        for candidate in (canonical, module):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot import {module}.{name}")


def _read_pickle(task: str, path: Path, allow_unsafe: bool):
    _require_file(task, path)
    try:
        with open(path, "rb") as handle:
            if allow_unsafe:
                return pickle.load(handle, encoding="latin1")
            return _ArrayUnpickler(handle, encoding="latin1").load()
    except MemoryError:
        raise
    except _Refused as error:
        raise ValueError(
            f"MultiBench {task} file {str(path)!r}: refusing to unpickle {error} (only numpy arrays and "
            "plain containers are loaded); pass allow_unsafe_pickle=True if you trust this file") from error
    except Exception as error:  # EOFError, UnpicklingError, ValueError, ... from a damaged file
        raise ValueError(f"MultiBench {task} file {str(path)!r} is corrupt or truncated "
                         f"({type(error).__name__}: {error})") from error
