"""MIMIC-III (MultiBench's im.pk); see sm4.data.multibench."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..bundled import ModalitySpec, MultiTaskData, SPLITS
from ._common import (MIMIC_FILE, MIMIC_SPLIT_SEED, MultiBenchDataset, _bad, _cell, _class_labels, _classification,
                      _expect_dict, _numeric, _require_file, _single)
from ._pickle import _read_pickle


class _ArrayReader:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def __call__(self, row: int) -> dict:
        return {name: x[row] for name, x in self.arrays.items()}


def _zscore(x: np.ndarray, axes) -> np.ndarray:
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def load_mimic(root, *, task_index: int = 7, allow_unsafe_pickle: bool = False) -> MultiTaskData:
    """MIMIC-III from MultiBench's ``im.pk`` (``root``: the mimic folder or the file).
    ``task_index`` 0-19: that ICD-9 group, binary; -1: the 6-class mortality label."""
    task = "mimic"
    root = Path(root)
    path = root if root.is_file() else _require_file(task, root / MIMIC_FILE)
    data = _read_pickle(task, path, allow_unsafe_pickle)
    _expect_dict(task, path, data, "a dict of arrays")
    series = _numeric(task, path, "ep_tdata", _cell(data, "ep_tdata", task, path, "ep_tdata"))
    static = _numeric(task, path, "adm_features_all", _cell(data, "adm_features_all", task, path, "adm_features_all"))
    if series.ndim != 3 or min(series.shape[1:]) < 1:
        raise _bad(task, path, "ep_tdata", f"must be (n, steps, features), got {series.shape}")
    if static.ndim != 2 or static.shape[1] < 1:
        raise _bad(task, path, "adm_features_all", f"must be (n, features), got {static.shape}")
    if not isinstance(task_index, int) or task_index < -1:
        raise ValueError(f"MultiBench {task}: task_index must be -1 (mortality) or an ICD-9 group index, got {task_index!r}")
    label_field = "adm_labels_all" if task_index < 0 else "y_icd9"
    labels = _numeric(task, path, label_field, _cell(data, label_field, task, path, label_field))
    if task_index < 0:
        if labels.ndim != 2 or labels.shape[1] < 6:
            raise _bad(task, path, label_field, f"must be (n, >=6), got {labels.shape}")
        # MultiBench: the first of columns 1..5 that is positive, else 0.
        positive = labels[:, 1:6] > 0
        targets = np.where(positive.any(axis=1), positive.argmax(axis=1) + 1, 0).astype(np.int64)
        classes = 6
    else:
        if labels.ndim != 2 or labels.shape[1] <= task_index:
            raise _bad(task, path, label_field, f"must be (n, >{task_index}) for task_index {task_index}, "
                       f"got {labels.shape}")
        targets = _class_labels(task, path, f"{label_field}[:, {task_index}]", labels[:, task_index], 2)
        classes = 2
    counts = {"ep_tdata": len(series), "adm_features_all": len(static), label_field: len(labels)}
    if len(set(counts.values())) != 1:
        raise ValueError(f"MultiBench {task} file {str(path)!r}: sample counts differ between fields: {counts}")
    series = _zscore(np.nan_to_num(series.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0), (0, 1))
    static = _zscore(np.nan_to_num(static.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0), 0)[:, :, None]
    modalities = {"mimic.static": ModalitySpec("mimic.static", "tabular", static.shape[1:]),
                  "mimic.timeseries": ModalitySpec("mimic.timeseries", "sequence", series.shape[1:])}
    n = len(targets)
    order = list(range(n))
    random.Random(MIMIC_SPLIT_SEED).shuffle(order)
    order = np.asarray(order, dtype=np.int64)
    rows = {"val": order[:n // 10], "test": order[n // 10:n // 5], "train": order[n // 5:]}
    reader = _ArrayReader({"mimic.static": static, "mimic.timeseries": series})
    splits = {split: MultiBenchDataset(task, modalities, reader, rows[split], torch.from_numpy(targets[rows[split]]), path)
              for split in SPLITS}
    what = "mortality (6 classes)" if task_index < 0 else f"ICD-9 group {task_index} (binary)"
    return _single(_classification(task, modalities, classes), modalities, splits,
                   f"MIMIC-III {what} from {str(path)!r}")
