"""The affect pickles' reader, shared by CMU-MOSEI and UR-FUNNY."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..bundled import ModalitySpec, MultiTaskData
from ._common import (AFFECT_FIELDS, AFFECT_SPLITS, MultiBenchDataset, SHARED_TEXT, _bad, _cell, _classification,
                      _expect_dict, _numeric, _single)
from ._pickle import _read_pickle


def _resolve(task: str, root: Path, names: tuple[str, ...]) -> Path:
    if root.is_file():
        return root
    for name in names:
        if (root / name).is_file():
            return root / name
    expected = " or ".join(repr(str(root / name)) for name in names)
    raise FileNotFoundError(f"MultiBench {task} file not found: expected {expected}")


def _nonzero_rows(x: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Indices of samples whose (L, F) array does not sum to zero (MultiBench's drop_entry keeps
    those: ``k.sum() == 0`` is dropped, which is no text, or values that cancel), in chunks
    (bounded memory)."""
    keep = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start:start + chunk])
        keep[start:start + chunk] = block.reshape(len(block), -1).sum(axis=1) != 0
    return np.flatnonzero(keep)


class _AffectReader:
    def __init__(self, arrays: dict[str, np.ndarray], names: dict[str, str], seq_len: dict[str, int], align: bool,
                 znorm: bool):
        self.arrays, self.names = arrays, names
        self.seq_len, self.align, self.znorm = seq_len, align, znorm

    def __call__(self, row: int) -> dict:
        start = 0
        if self.align:  # the data is front-padded with zeros: start at the first step with text
            steps = np.flatnonzero((np.asarray(self.arrays["text"][row]) != 0).any(axis=1))
            start = int(steps[0]) if len(steps) else 0
        out = {}
        for field, name in self.names.items():
            length = self.seq_len[field]
            # z-scored over the whole aligned sequence, then cut to length (MultiBench's / HighMMT's order)
            x = np.asarray(self.arrays[field][row][start:] if self.znorm else self.arrays[field][row][start:start + length],
                           dtype=np.float32)
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            if self.znorm:
                if len(x) > 1:
                    std = x.std(axis=0, ddof=1, keepdims=True)
                    centred = x - x.mean(axis=0, keepdims=True)
                    x = np.divide(centred, std, out=np.zeros_like(x), where=std > 0)
                else:
                    x = np.zeros_like(x)
                x = x[:length]
            if len(x) < length:
                x = np.concatenate([x, np.zeros((length - len(x), x.shape[1]), np.float32)])
            out[name] = x
        return out


def _load_affect(task: str, root, names: tuple[str, ...], positive: Callable[[np.ndarray], np.ndarray], *,
                 seq_len: int | dict, align: bool, znorm: bool, drop_empty_text: bool, share_text: bool,
                 allow_unsafe_pickle: bool, description: str) -> MultiTaskData:
    lengths = seq_len if isinstance(seq_len, dict) else dict.fromkeys(AFFECT_FIELDS, seq_len)
    if set(lengths) != set(AFFECT_FIELDS) or any(not isinstance(n, int) or n < 1 for n in lengths.values()):
        raise ValueError(f"MultiBench {task}: seq_len must be a positive integer or {{field: positive integer}} "
                         f"for the fields {list(AFFECT_FIELDS)}, got {seq_len!r}")
    path = _resolve(task, Path(root), names)
    data = _read_pickle(task, path, allow_unsafe_pickle)
    _expect_dict(task, path, data, "a dict of splits")
    text_name = SHARED_TEXT if share_text else f"{task}.text"
    modality_of = {"vision": f"{task}.vision", "audio": f"{task}.audio", "text": text_name}
    widths: dict[str, int] = {}
    splits_raw = {}
    for split, key in AFFECT_SPLITS.items():
        block = _cell(data, key, task, path, key)
        arrays = {}
        for field in AFFECT_FIELDS:
            x = _numeric(task, path, f"{key}.{field}", _cell(block, field, task, path, f"{key}.{field}"))
            if x.ndim != 3 or x.shape[2] < 1:
                raise _bad(task, path, f"{key}.{field}", f"must be (n, steps, features), got {x.shape}")
            if widths.setdefault(field, x.shape[2]) != x.shape[2]:
                raise _bad(task, path, f"{key}.{field}", f"has {x.shape[2]} features, the train split {widths[field]}")
            arrays[field] = x
        labels = _numeric(task, path, f"{key}.labels", _cell(block, "labels", task, path, f"{key}.labels"))
        counts = {f"{key}.{f}": len(a) for f, a in arrays.items()} | {f"{key}.labels": len(labels)}
        if len(set(counts.values())) != 1:
            raise ValueError(f"MultiBench {task} file {str(path)!r}: sample counts differ between fields: {counts}")
        if labels.size != len(labels):
            raise _bad(task, path, f"{key}.labels", f"must hold one value per sample, got shape {labels.shape}")
        labels = labels.reshape(-1).astype(np.float64)
        if not np.isfinite(labels).all():
            raise _bad(task, path, f"{key}.labels", "has non-finite values")
        rows = _nonzero_rows(arrays["text"]) if drop_empty_text else np.arange(len(labels))
        targets = torch.from_numpy(positive(labels[rows]).astype(np.int64))
        splits_raw[split] = (arrays, rows, targets)
    modalities = {modality_of[f]: ModalitySpec(modality_of[f], "sequence", (lengths[f], widths[f])) for f in AFFECT_FIELDS}
    splits = {split: MultiBenchDataset(task, modalities, _AffectReader(arrays, modality_of, lengths, align, znorm),
                                       rows, targets, f"{path}[{AFFECT_SPLITS[split]}]")
              for split, (arrays, rows, targets) in splits_raw.items()}
    spec = _classification(task, modalities, 2)
    return _single(spec, modalities, splits, f"{description} from {str(path)!r}, {seq_len} steps, "
                   f"align={align}, znorm={znorm}")
