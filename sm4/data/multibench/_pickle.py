"""The restricted unpickler of the MultiBench pickles: numpy arrays, pandas data objects and plain
containers only (no code from the file runs).

A pickle names every class or function it calls (a "global"); ``find_class`` resolves each name,
and this one resolves only an allow-list. numpy 1.x pickles name ``numpy.core.*`` (numpy 2's
``numpy._core.*``). pandas objects (DataFrame, Series, Index, ..., as MultiBench's pickles may
hold them, written by pandas 1.x under module paths pandas has since moved) are read as
``pandas.read_pickle`` reads them: pandas's own table of moved classes
(``pandas.compat.pickle_compat``), the C unpickler first and, where that fails on an old layout,
pandas's compat unpickler; a pandas global is allowed only when it resolves to one of the data
classes / their reconstructors below (never ``pandas.eval``, ``read_*``, or any other function).
Like pandas 3's own ``read_pickle``, it reads pickles of pandas >= 1.0 (older module paths such as
``pandas.core.index`` are refused as unknown).
"""

from __future__ import annotations

import _compat_pickle
import importlib
import pickle
from pathlib import Path

from ._common import _require_file

PANDAS_HINT = "pip install 'sm4[multibench]' (it pins pandas==3.1.1)"

# Only what numpy arrays and plain containers need (canonical numpy 2 module names).
_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"), ("collections", "OrderedDict"),
    # MultiBench's pickles hold defaultdicts; their default_factory is a plain type (no code runs).
    ("collections", "defaultdict"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "int"),
    ("builtins", "float"), ("builtins", "set"), ("builtins", "tuple"), ("builtins", "frozenset"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "bool"), ("builtins", "str"),
    ("builtins", "bytes"),
    # pandas blocks record their rows as slices; protocol 0/1 (Python 2) pickles rebuild objects
    # through copyreg._reconstructor(cls, base, state), whose cls / base pass this list themselves.
    ("builtins", "slice"), ("builtins", "object"), ("copyreg", "_reconstructor"),
})

# pandas's data classes and the module-level functions their pickles call to rebuild them, by
# (module, name) where pandas 3 defines them. A pickle may name them through any pandas module
# that exposes the same object (``pandas.DataFrame``, pandas 1.x's ``pandas.core.frame.DataFrame``).
_PANDAS_GLOBALS = (
    ("pandas.core.frame", "DataFrame"), ("pandas.core.series", "Series"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.indexes.multi", "MultiIndex"),
    ("pandas.core.indexes.category", "CategoricalIndex"), ("pandas.core.indexes.datetimes", "DatetimeIndex"),
    ("pandas.core.indexes.timedeltas", "TimedeltaIndex"), ("pandas.core.indexes.period", "PeriodIndex"),
    ("pandas.core.indexes.interval", "IntervalIndex"), ("pandas.core.indexes.frozen", "FrozenList"),
    ("pandas.core.internals.managers", "BlockManager"), ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("pandas.core.arrays.categorical", "Categorical"), ("pandas.core.arrays.datetimes", "DatetimeArray"),
    ("pandas.core.arrays.timedeltas", "TimedeltaArray"), ("pandas.core.arrays.period", "PeriodArray"),
    ("pandas.core.arrays.interval", "IntervalArray"), ("pandas.core.arrays.string_", "StringArray"),
    ("pandas.core.arrays.integer", "IntegerArray"), ("pandas.core.arrays.floating", "FloatingArray"),
    ("pandas.core.arrays.boolean", "BooleanArray"), ("pandas.core.arrays.numpy_", "NumpyExtensionArray"),
    ("pandas.core.dtypes.dtypes", "CategoricalDtype"), ("pandas.core.dtypes.dtypes", "DatetimeTZDtype"),
    ("pandas.core.dtypes.dtypes", "PeriodDtype"), ("pandas.core.dtypes.dtypes", "IntervalDtype"),
    ("pandas.core.dtypes.dtypes", "SparseDtype"), ("pandas.core.arrays.string_", "StringDtype"),
    ("pandas.core.arrays.integer", "Int8Dtype"), ("pandas.core.arrays.integer", "Int16Dtype"),
    ("pandas.core.arrays.integer", "Int32Dtype"), ("pandas.core.arrays.integer", "Int64Dtype"),
    ("pandas.core.arrays.integer", "UInt8Dtype"), ("pandas.core.arrays.integer", "UInt16Dtype"),
    ("pandas.core.arrays.integer", "UInt32Dtype"), ("pandas.core.arrays.integer", "UInt64Dtype"),
    ("pandas.core.arrays.floating", "Float32Dtype"), ("pandas.core.arrays.floating", "Float64Dtype"),
    ("pandas.core.arrays.boolean", "BooleanDtype"),
    ("pandas._libs.tslibs.timestamps", "Timestamp"), ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"),
    ("pandas._libs.tslibs.timedeltas", "Timedelta"), ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"),
    ("pandas._libs.tslibs.nattype", "_nat_unpickle"), ("pandas._libs.tslibs.period", "Period"),
    ("pandas._libs.interval", "Interval"), ("pandas._libs.missing", "NAType"),
    ("pandas._libs.tslibs.offsets", "Day"), ("pandas._libs.tslibs.offsets", "Hour"),
    ("pandas._libs.tslibs.offsets", "Minute"), ("pandas._libs.tslibs.offsets", "Second"),
    ("pandas._libs.tslibs.offsets", "MonthEnd"), ("pandas._libs.tslibs.offsets", "YearEnd"),
    ("pandas._libs.tslibs.offsets", "Week"),
)


class _Refused(pickle.UnpicklingError):
    pass


class _NeedsPandas(ImportError):
    pass


_pandas_objects: dict[int, object] | None = None


def _allowed_pandas() -> dict[int, object]:
    """id -> object of every allowed pandas global that this pandas has (imported once)."""
    global _pandas_objects
    if _pandas_objects is None:
        objects = {}
        for module, name in _PANDAS_GLOBALS:
            try:
                target = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):  # a class this pandas version does not define
                continue
            objects[id(target)] = target
        _pandas_objects = objects
    return _pandas_objects


def _pandas_compat():
    try:
        from pandas.compat import pickle_compat
    except ImportError as error:
        raise _NeedsPandas(PANDAS_HINT) from error
    return pickle_compat


def _resolve(module: str, name: str, seen: set):
    """The object a pickle's global (module, name) names, if it is on the allow-list."""
    # Python 2's names (__builtin__.long, copy_reg), as the default find_class maps them
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core.") else module
    if (canonical, name) in _PICKLE_GLOBALS:
        for candidate in (canonical, module):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"cannot import {module}.{name}")
    if module != "pandas" and not module.startswith("pandas."):
        raise _Refused(f"{module}.{name}")
    seen.add(f"{module}.{name}")
    # pandas's table of classes that moved since pandas 1.0 (Int64Index -> Index, ...)
    moved_module, moved_name = _pandas_compat()._class_locations_map.get((module, name), (module, name))
    if "." in moved_name:  # a dotted name walks attributes (a method): never data
        raise _Refused(f"{module}.{name}")
    try:  # only pandas's own modules are imported, and only to look the name up
        target = getattr(importlib.import_module(moved_module), moved_name)
    except (ImportError, AttributeError):
        raise _Refused(f"{module}.{name} (not a pandas data class this pandas knows)") from None
    if id(target) not in _allowed_pandas():
        raise _Refused(f"{module}.{name}")
    return target


class _ArrayUnpickler(pickle.Unpickler):
    """The C unpickler, restricted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pandas_globals: set = set()

    def find_class(self, module, name):
        return _resolve(module, name, self.pandas_globals)


def _compat_unpickler(handle):
    """pandas's compat unpickler (old Timestamp / BlockManager / offset layouts), restricted."""

    class _CompatUnpickler(_pandas_compat().Unpickler):
        def find_class(self, module, name):
            return _resolve(module, name, set())

    return _CompatUnpickler(handle, encoding="latin1")


def _load_restricted(handle):
    unpickler = _ArrayUnpickler(handle, encoding="latin1")
    try:
        return unpickler.load()
    except (_Refused, _NeedsPandas, MemoryError):
        raise
    except Exception:
        if not unpickler.pandas_globals:
            raise
    # As pandas.read_pickle: an old pandas layout the current classes do not rebuild directly.
    handle.seek(0)
    return _compat_unpickler(handle).load()


def _read_pickle(task: str, path: Path, allow_unsafe: bool):
    _require_file(task, path)
    try:
        with open(path, "rb") as handle:
            if allow_unsafe:
                return pickle.load(handle, encoding="latin1")
            return _load_restricted(handle)
    except MemoryError:
        raise
    except _NeedsPandas as error:
        raise ImportError(f"MultiBench {task} file {str(path)!r} holds pandas objects: reading it needs pandas "
                          f"({error})") from error
    except _Refused as error:
        raise ValueError(
            f"MultiBench {task} file {str(path)!r}: refusing to unpickle {error} (only numpy arrays, pandas "
            "data objects and plain containers are loaded); pass allow_unsafe_pickle=True if you trust this "
            "file") from error
    except Exception as error:  # EOFError, UnpicklingError, ValueError, ... from a damaged file
        raise ValueError(f"MultiBench {task} file {str(path)!r} is corrupt or truncated "
                         f"({type(error).__name__}: {error})") from error
