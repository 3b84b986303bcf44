"""Writes tests/data/pandas-1.5.3-objects.pk: pandas objects pickled by pandas 1.5.3 / numpy 1.26
(the module paths of pandas 1.x, e.g. pandas.core.indexes.numeric.Int64Index, and numpy.core.*),
as MultiBench-era pickles hold them. Not run by the tests (it needs that old pandas):

    pip download --no-deps --only-binary=:all: pandas==1.5.3 numpy==1.26.4 pytz -d wheels
    for w in wheels/*.whl; do python -m zipfile -e $w site/; done
    PYTHONPATH=site python tests/data/make_pandas1_pickle.py

tests/test_data_multibench_pickle.py checks what it reads against EXPECTED below.
"""

import collections
import pickle
from pathlib import Path


def objects():
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"hadm_id": np.arange(3, dtype=np.int64), "age": np.array([61.5, 70.0, 45.25]),
                          "gender": ["F", "M", "F"],
                          "admit": pd.to_datetime(["2101-01-01", "2102-02-02", "2103-03-03"]),
                          "ward": pd.Categorical(["a", "b", "a"])}, index=pd.Index([10, 11, 12]))
    return {"frame": frame, "series": pd.Series([1.0, 2.0], index=["x", "y"], name="s"),
            "index": pd.Index(["a", "b"]), "range": pd.RangeIndex(4), "int_index": pd.Index([1, 2, 3]),
            "stamp": pd.Timestamp("2101-01-01"), "array": np.arange(6, dtype=np.float32).reshape(2, 3),
            "counts": collections.defaultdict(int, {"a": 1})}


if __name__ == "__main__":
    import pandas

    assert pandas.__version__ == "1.5.3", pandas.__version__
    path = Path(__file__).with_name("pandas-1.5.3-objects.pk")
    path.write_bytes(pickle.dumps(objects(), protocol=2))  # protocol 2: Python 2-compatible, as older files
