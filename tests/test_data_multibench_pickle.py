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
        assert len(load_urfunny(tmp_path / "old").splits["urfunny"]["train"]) == 6


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
