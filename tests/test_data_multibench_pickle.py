"""The restricted unpickler of the MultiBench pickles (sm4.data.multibench._pickle)."""

import os
import pickle
import warnings

import numpy as np
import pytest

from sm4.data.multibench import load_mimic, load_urfunny

from .multibench_fixtures import write_affect


def test_pickles_are_read_safely(tmp_path):
    marker = tmp_path / "was-run"

    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (tmp_path / "x").mkdir()
    with open(tmp_path / "x" / "im.pk", "wb") as handle:
        pickle.dump({"ep_tdata": Exploit()}, handle)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*mkdir.*allow_unsafe_pickle=True"):
        load_mimic(tmp_path / "x")
    assert not marker.exists()
    # numpy 1.x wrote numpy.core.* globals: still read, without numpy 2's deprecation warning
    data = write_affect(tmp_path / "old" / "humor.pkl", (371, 81, 300), binary=True)
    blob = pickle.dumps(data, protocol=2)
    assert b"numpy._core.multiarray\n" in blob
    (tmp_path / "old" / "humor.pkl").write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_urfunny(tmp_path / "old").splits["urfunny"]["train"]) == 7


def test_the_unpickler_takes_defaultdicts_of_plain_types_but_no_callable_factory(tmp_path):
    """MultiBench's MIMIC / affect pickles hold collections.defaultdict (of list): read; a
    defaultdict whose factory is any other callable is still refused."""
    from collections import defaultdict

    from sm4.data.multibench import _read_pickle

    path = tmp_path / "d.pk"
    table = defaultdict(list, {"a": [1, 2]})
    path.write_bytes(pickle.dumps({"x": table, "y": np.arange(3)}, protocol=4))
    loaded = _read_pickle("mimic", path, allow_unsafe=False)
    assert isinstance(loaded["x"], defaultdict) and loaded["x"]["a"] == [1, 2] and loaded["x"]["b"] == []
    path.write_bytes(pickle.dumps(defaultdict(os.getcwd), protocol=4))
    with pytest.raises(ValueError, match=r"refusing to unpickle .*getcwd"):
        _read_pickle("mimic", path, allow_unsafe=False)


# ------------------------------------------------------------------ pandas objects

DATA = os.path.join(os.path.dirname(__file__), "data")


def _check_pandas_objects(loaded):
    pd = pytest.importorskip("pandas")
    frame = loaded["frame"]
    assert type(frame) is pd.DataFrame and list(frame.columns) == ["hadm_id", "age", "gender", "admit", "ward"]
    assert frame["age"].tolist() == [61.5, 70.0, 45.25] and frame["hadm_id"].dtype == np.int64
    assert frame["gender"].tolist() == ["F", "M", "F"] and list(frame.index) == [10, 11, 12]
    assert [str(t.date()) for t in frame["admit"]] == ["2101-01-01", "2102-02-02", "2103-03-03"]
    assert isinstance(frame["ward"].dtype, pd.CategoricalDtype) and frame["ward"].tolist() == ["a", "b", "a"]
    series = loaded["series"]
    assert type(series) is pd.Series and series.name == "s" and series.to_dict() == {"x": 1.0, "y": 2.0}
    assert type(loaded["index"]) is pd.Index and list(loaded["index"]) == ["a", "b"]
    assert loaded["range"].equals(pd.RangeIndex(4))
    assert type(loaded["int_index"]) is pd.Index and loaded["int_index"].tolist() == [1, 2, 3]  # was Int64Index
    assert loaded["stamp"] == pd.Timestamp("2101-01-01")
    np.testing.assert_array_equal(loaded["array"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert loaded["counts"]["a"] == 1 and loaded["counts"]["b"] == 0


def test_the_unpickler_reads_a_pickle_written_by_pandas_1_5():
    """A genuine pandas 1.5.3 / numpy 1.26 pickle (tests/data/make_pandas1_pickle.py): pandas 1.x
    module paths (pandas.core.indexes.numeric.Int64Index, pandas.core.frame, numpy.core.*) and
    Python 2 names (__builtin__.long) read through pandas's table of moved classes."""
    pytest.importorskip("pandas")
    from pathlib import Path

    from sm4.data.multibench import _read_pickle

    path = Path(DATA) / "pandas-1.5.3-objects.pk"
    assert b"pandas.core.indexes.numeric\nInt64Index" in path.read_bytes()
    _check_pandas_objects(_read_pickle("mimic", path, allow_unsafe=False))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_the_unpickler_reads_this_pandas_objects_and_a_mimic_file_holding_them(tmp_path, protocol):
    pytest.importorskip("pandas")
    from sm4.data.multibench import _read_pickle

    from .data.make_pandas1_pickle import objects
    from .multibench_fixtures import write_mimic

    path = tmp_path / "o.pk"
    path.write_bytes(pickle.dumps(objects(), protocol=protocol))
    _check_pandas_objects(_read_pickle("mimic", path, allow_unsafe=False))
    write_mimic(tmp_path / "mimic" / "im.pk", extra=objects(), protocol=protocol)
    assert len(load_mimic(tmp_path / "mimic").splits["mimic"]["train"]) == 32


def test_the_unpickler_falls_back_to_pandas_compat_unpickler_for_old_layouts(tmp_path):
    """pandas <= 1.2 pickled a Timestamp as Timestamp(value, freq, tz): today's Timestamp refuses
    those arguments; pandas's compat unpickler (as pandas.read_pickle) rebuilds it."""
    pd = pytest.importorskip("pandas")
    from sm4.data.multibench import _read_pickle

    value = pd.Timestamp("2101-01-01").value
    blob = (b"\x80\x02cpandas._libs.tslibs.timestamps\nTimestamp\n\x8a\x08" + value.to_bytes(8, "little", signed=True)
            + b"X\x01\x00\x00\x00DN\x87R.")
    with pytest.raises(ValueError):
        pickle.loads(blob)
    (tmp_path / "t.pk").write_bytes(blob)
    assert _read_pickle("mimic", tmp_path / "t.pk", allow_unsafe=False) == pd.Timestamp("2101-01-01")


@pytest.mark.parametrize("blob, refused", [
    (b"cpandas\neval\n(S'1+1'\ntR.", "pandas.eval"),
    (b"cpandas.io.pickle\nread_pickle\n(S'x'\ntR.", "pandas.io.pickle.read_pickle"),
    (b"cpandas.core.frame\nDataFrame.to_csv\n(S'x'\ntR.", "pandas.core.frame.DataFrame.to_csv"),
    (b"cpandas.core.computation.eval\neval\n(S'1'\ntR.", "pandas.core.computation.eval.eval"),
    (b"cposix\nsystem\n(S'true'\ntR.", "posix.system"),
    (b"c__builtin__\neval\n(S'1'\ntR.", "builtins.eval"),
    (b"cbuiltins\ngetattr\n(cpandas\nDataFrame\nS'to_pickle'\ntR.", "builtins.getattr"),
])
def test_the_unpickler_refuses_pandas_functions_and_any_other_code(tmp_path, blob, refused):
    pytest.importorskip("pandas")
    from sm4.data.multibench import _read_pickle

    (tmp_path / "m.pk").write_bytes(blob)
    with pytest.raises(ValueError, match=r"refusing to unpickle " + refused.replace(".", r"\.")):
        _read_pickle("mimic", tmp_path / "m.pk", allow_unsafe=False)


def test_a_pickle_holding_pandas_objects_without_pandas_names_the_extra(tmp_path, monkeypatch):
    import sys

    from sm4.data.multibench import _read_pickle

    (tmp_path / "p.pk").write_bytes(b"cpandas.core.frame\nDataFrame\n.")
    monkeypatch.setitem(sys.modules, "pandas.compat", None)  # import pandas.compat fails
    with pytest.raises(ImportError, match=r"holds pandas objects: reading it needs pandas .*sm4\[multibench\]"):
        _read_pickle("mimic", tmp_path / "p.pk", allow_unsafe=False)
