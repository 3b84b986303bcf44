"""Shared pieces of the MultiBench loaders: constants, error helpers, HDF5 access, the dataset class."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..bundled import ModalitySpec, MultiTaskData, SPLITS, TaskSpec


TASKS = ("avmnist", "enrico", "push", "vt", "urfunny", "mosei", "mimic")
SHARED_TEXT = "affect.text"

AVMNIST_FILES = ("image/train_data.npy", "audio/train_data.npy", "train_labels.npy",
                 "image/test_data.npy", "audio/test_data.npy", "test_labels.npy")
ENRICO_CSV = "design_topics.csv"
ENRICO_IGNORED = frozenset({"50105", "50109"})  # broken wireframes; MultiBench drops them too
PUSH_FILES = {"train": "gentle_push_1000.hdf5", "val": "gentle_push_10.hdf5", "test": "gentle_push_300.hdf5"}
VT_SUBDIR = "triangle_real_data"
MOSEI_FILES = ("mosei_senti_data.pkl", "mosei_raw.pkl")
URFUNNY_FILES = ("humor.pkl",)
MIMIC_FILE = "im.pk"
AFFECT_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # ours -> the pickle's keys
AFFECT_FIELDS = ("vision", "audio", "text")
MIMIC_SPLIT_SEED = 10  # MultiBench: random.seed(10); random.shuffle(samples)
ENRICO_SPLIT_SEED = 42  # MultiBench's EnricoDataset(random_seed=42)
ENRICO_FRACTIONS = (0.65, 0.15)  # train, val; test gets the rest (0.2)

_H5_HINT = "pip install h5py"




# ------------------------------------------------------------------------------------ helpers


def patchify(image: np.ndarray, patch) -> np.ndarray:
    """(H, W, F) -> (H/ph, W/pw, ph*pw*F): non-overlapping patches of ``patch`` pixels (an int p:
    p x p squares; a pair (ph, pw): rectangles of ph rows by pw columns, as M³SAT cuts ENRICO's
    256 x 128 images into 16 x 8 ones). A patch's pixels are flattened row by row, in the order of
    ``sm4.model.tokenize.patchify`` (which does the work for squares), so a model with
    ``patch_size=1`` sees exactly what ``patch_size=p`` would make of the raw image."""
    rows, cols = _patch_sides(patch)
    if rows == cols == 1:
        return image
    if rows == cols:
        import torch

        from ...model.tokenize import patchify as patch_tokens

        tokens, grid = patch_tokens(torch.from_numpy(np.ascontiguousarray(image))[None], rows)
        return tokens[0].reshape(*grid, -1).numpy()
    height, width, features = image.shape
    cells = image.reshape(height // rows, rows, width // cols, cols, features).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(cells).reshape(height // rows, width // cols, rows * cols * features)


def _patch_sides(patch) -> tuple[int, int]:
    """An int p or a pair (rows, cols) -> (rows, cols); anything else -> (0, 0) (refused by _check_patch)."""
    if isinstance(patch, (tuple, list)) and len(patch) == 2:
        sides = tuple(patch)
    else:
        sides = (patch, patch)
    if not all(isinstance(side, int) and not isinstance(side, bool) for side in sides):
        return 0, 0
    return sides


def _check_patch(task: str, what: str, patch, height: int, width: int) -> None:
    rows, cols = _patch_sides(patch)
    if rows < 1 or cols < 1 or height % rows or width % cols:
        raise ValueError(f"MultiBench {task}: {what} patch size {patch!r} must be a positive integer or a pair "
                         f"(rows, cols) of them dividing the {height}x{width} image")


def _bad(task: str, path, field: str, what: str) -> ValueError:
    return ValueError(f"MultiBench {task} file {str(path)!r}: field {field!r} {what}")


def _missing(task: str, path, what: str = "") -> FileNotFoundError:
    return FileNotFoundError(f"MultiBench {task} file {str(path)!r} not found{what}")


def _require_file(task: str, path: Path, what: str = "") -> Path:
    if not path.is_file():
        raise _missing(task, path, what)
    return path


def _numeric(task: str, path, field: str, x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise _bad(task, path, field, f"must be a numpy array, got {type(x).__name__}")
    if x.dtype.kind not in "biuf":
        raise _bad(task, path, field, f"must be numeric, got dtype {x.dtype}")
    return x


def _class_labels(task: str, path, field: str, values: np.ndarray, classes: int) -> np.ndarray:
    """Integer-valued labels in [0, classes) as int64."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise _bad(task, path, field, f"must be numeric labels, got dtype {values.dtype}")
    if values.dtype.kind == "f" and (not np.isfinite(values).all() or (values != np.round(values)).any()):
        raise _bad(task, path, field, "must hold whole-number class labels")
    if values.size and (values.min() < 0 or values.max() >= classes):
        raise _bad(task, path, field, f"has labels outside [0, {classes}): min {values.min()}, max {values.max()}")
    return values.astype(np.int64)


def _expect_dict(task: str, path, data, what: str) -> None:
    """Bad data, so ValueError like every other format problem."""
    if not isinstance(data, dict):
        raise ValueError(f"MultiBench {task} file {str(path)!r} must hold {what}, got {type(data).__name__}")  # noqa: TRY004


def _cell(obj: dict, key: str, task: str, path, field: str):
    if not isinstance(obj, dict):
        raise _bad(task, path, field.rpartition(".")[0] or field, f"must be a dict, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"MultiBench {task} file {str(path)!r} is missing field {field!r}")
    return obj[key]


def _npy(task: str, path: Path) -> np.ndarray:
    """A .npy file memory-mapped read-only (nothing is read until an item is fetched)."""
    _require_file(task, path)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # bad magic/header, truncated data ("mmap length ..."), pickled
        raise ValueError(f"MultiBench {task} file {str(path)!r} is corrupt or truncated "
                         f"({type(error).__name__}: {error})") from error


def _h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError(f"the MultiBench PUSH and V&T files are HDF5: reading them needs h5py ({_H5_HINT})") from error
    return h5py


def _open_h5(task: str, path):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except Exception as error:  # OSError: truncated file, bad signature, ...
        raise ValueError(f"MultiBench {task} file {str(path)!r} is not a readable HDF5 file, corrupt or "
                         f"truncated ({type(error).__name__}: {error})") from error


class _H5Files:
    """Read-only HDF5 handles opened on first use and kept (at most ``limit``), per process: a
    DataLoader worker (fork) opens its own; pickling (spawn) carries no handle."""

    def __init__(self, task: str, limit: int = 64):
        self.task, self.limit = task, limit
        self._pid, self._files = None, OrderedDict()

    def get(self, path: str):
        if self._pid != os.getpid():
            self._pid, self._files = os.getpid(), OrderedDict()
        handle = self._files.pop(path, None)
        if handle is None:
            handle = _open_h5(self.task, path)
            while len(self._files) >= self.limit:
                self._files.popitem(last=False)[1].close()
        self._files[path] = handle
        return handle

    def __getstate__(self):
        return {"task": self.task, "limit": self.limit}

    def __setstate__(self, state):
        self.__init__(state["task"], state["limit"])


def _h5_read(task: str, path, field: str, read):
    try:
        return read()
    except KeyError as error:
        raise ValueError(f"MultiBench {task} file {str(path)!r} is missing field {field!r}") from error
    except Exception as error:  # a damaged chunk, a failed decompression
        raise ValueError(f"MultiBench {task} file {str(path)!r}: field {field!r} could not be read, "
                         f"corrupt or truncated ({type(error).__name__}: {error})") from error


# ------------------------------------------------------------------------------------ dataset


class MultiBenchDataset(Dataset):
    """The samples of one task and split, read and converted to float32 per item.

    ``reader(row)`` returns ``{modality: array}`` for sample ``row`` of the source; ``rows[i]`` is
    the source row of item ``i`` (its index in the file's sample order, for provenance), and
    ``targets[i]`` its target. Every fetched input is checked against its :class:`ModalitySpec`
    shape and for non-finite values (ValueError naming ``source`` and the row).

    ``sampling_weights``: None (sample uniformly) or (n,) float64 per-item weights with which
    MultiBench samples this split (ENRICO's train split: class-balanced); ``sampler()`` turns them
    into a ``WeightedRandomSampler`` that draws ``len(self)`` items per epoch with replacement, as
    MultiBench's.
    """

    sampling_weights: torch.Tensor | None = None

    def __init__(self, task: str, modalities: dict[str, ModalitySpec], reader: Callable[[int], dict],
                 rows, targets: torch.Tensor, source: str):
        self.task = task
        self.modalities = dict(modalities)
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)
        self.targets = targets
        self.source = str(source)
        if len(self.rows) != len(targets):
            raise ValueError(f"MultiBench {task}: {len(self.rows)} rows but {len(targets)} targets")

    def __len__(self) -> int:
        return len(self.rows)

    def sampler(self, generator: torch.Generator | None = None):
        """The split's sampler as MultiBench draws it, or None where it samples uniformly."""
        if self.sampling_weights is None:
            return None
        return torch.utils.data.WeightedRandomSampler(self.sampling_weights, len(self), replacement=True,
                                                      generator=generator)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        row = int(self.rows[index])
        arrays = self.reader(row)
        inputs = {}
        for name, spec in self.modalities.items():
            x = np.array(arrays[name], dtype=np.float32)  # a copy: never a view of a memory map
            if x.shape != spec.shape:
                raise ValueError(f"MultiBench {self.task} {self.source!r}: sample {row}, modality {name!r} has "
                                 f"shape {x.shape}, expected {spec.shape}")
            if not np.isfinite(x).all():
                raise ValueError(f"MultiBench {self.task} {self.source!r}: sample {row}, modality {name!r} "
                                 "has non-finite values")
            inputs[name] = torch.from_numpy(x)
        return inputs, self.targets[index]


def class_balanced_weights(targets: torch.Tensor) -> torch.Tensor:
    """(n,) float64 weights 1 / (count of the item's class): every class drawn equally often."""
    counts = torch.bincount(targets)
    return 1.0 / counts[targets].double()


def _classification(name: str, modalities, classes: int) -> TaskSpec:
    return TaskSpec(name, tuple(modalities), "classification", int(classes), "accuracy")


def _single(task: TaskSpec, modalities: dict[str, ModalitySpec], splits: dict, description: str) -> MultiTaskData:
    for split, dataset in splits.items():
        if len(dataset) == 0:
            raise ValueError(f"MultiBench {task.name}: the {split} split has no samples ({dataset.source!r})")
    sizes = "/".join(str(len(splits[s])) for s in SPLITS)
    shapes = ", ".join(f"{m.name} {m.kind} {m.shape}" for m in modalities.values())
    what = f"{task.num_outputs} classes" if task.kind == "classification" else f"{task.num_outputs} outputs"
    line = f"{task.name}: {description}; {what} ({task.metric}); train/val/test {sizes}; {shapes}"
    return MultiTaskData(modalities=dict(modalities), tasks={task.name: task},
                         splits={task.name: {s: splits[s] for s in SPLITS}}, description=line)


def combine(parts: list[MultiTaskData], description: str | None = None) -> MultiTaskData:
    """Several tasks' MultiTaskData in one. A modality named by several tasks must have the same
    spec in each (it is shared); task names must differ."""
    modalities: dict[str, ModalitySpec] = {}
    tasks: dict[str, TaskSpec] = {}
    splits: dict[str, dict] = {}
    for part in parts:
        for name, spec in part.modalities.items():
            if name in modalities and modalities[name] != spec:
                raise ValueError(f"modality {name!r} is shared but its specs differ: {modalities[name]} vs {spec} "
                                 "(for MOSEI/UR-FUNNY text pass share_text=False)")
            modalities.setdefault(name, spec)
        for name, spec in part.tasks.items():
            if name in tasks:
                raise ValueError(f"task {name!r} appears twice")
            tasks[name] = spec
            splits[name] = part.splits[name]
    if description is None:
        description = "\n".join(part.description for part in parts)
    return MultiTaskData(modalities=modalities, tasks=tasks, splits=splits, description=description)
