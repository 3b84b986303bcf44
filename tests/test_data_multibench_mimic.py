"""The MultiBench MIMIC loader (sm4.data.multibench.mimic) on fixture files in the published format."""

import pickle
import random

import numpy as np
import pytest

from sm4.data.bundled import SPLITS, ModalitySpec
from sm4.data.multibench import load_mimic

from .multibench_fixtures import MIMIC_N, check_items, root  # noqa: F401 (fixtures by name)


def test_mimic(root):
    data = load_mimic(root / "mimic")
    assert data.modalities == {"mimic.static": ModalitySpec("mimic.static", "tabular", (5, 1)),
                               "mimic.timeseries": ModalitySpec("mimic.timeseries", "sequence", (24, 12))}
    assert data.tasks["mimic"].num_outputs == 2
    splits = data.splits["mimic"]
    order = list(range(MIMIC_N))
    random.seed(10)  # MultiBench's own split: random.seed(10); random.shuffle(samples)
    random.shuffle(order)
    assert list(splits["val"].rows) == order[:4]
    assert list(splits["test"].rows) == order[4:8]
    assert list(splits["train"].rows) == order[8:]
    with open(root / "mimic" / "im.pk", "rb") as handle:
        raw = pickle.load(handle)
    np.testing.assert_array_equal(splits["train"].targets.numpy(), raw["y_icd9"][order[8:], 7])
    check_items(splits["train"], data.modalities, "classification")
    series = np.stack([splits[s][i][0]["mimic.timeseries"].numpy() for s in SPLITS for i in range(len(splits[s]))])
    np.testing.assert_allclose(series.mean(axis=(0, 1)), 0, atol=1e-5)  # z-scored over all samples
    mortality = load_mimic(root / "mimic" / "im.pk", task_index=-1)
    assert mortality.tasks["mimic"].num_outputs == 6
    expected = np.array([1 + i % 5 if i % 3 else 0 for i in range(MIMIC_N)])
    np.testing.assert_array_equal(mortality.splits["mimic"]["test"].targets.numpy(), expected[order[4:8]])
    with pytest.raises(ValueError, match="y_icd9"):
        load_mimic(root / "mimic", task_index=20)
