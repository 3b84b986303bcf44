"""Loaders for the real MultiBench data sets the SM4 / M³SAT papers train on (SM4_SPEC §4).

Each loader reads the files in the layout that MultiBench's own ``datasets/*/get_data.py`` (and
HighMMT's copies of them, which the papers' code builds on) read, and returns the same
:class:`~sm4.data.bundled.MultiTaskData` as :func:`~sm4.data.bundled.load_bundled`, so
:func:`~sm4.data.bundled.task_loader`, :func:`sm4.experiment.build_model` and the trainer work
unchanged. Every item is ``(inputs, target)``: ``inputs[m]`` a float32 tensor of modality ``m``'s
:class:`ModalitySpec` shape (``(L, F)`` sequences, ``(H, W, F)`` images, ``(F, 1)`` tabular),
``target`` an int64 scalar (classification) or a float32 ``(num_outputs,)`` tensor (regression).

    from sm4.data.multibench import load_multibench
    data = load_multibench("/data/multibench", tasks=["avmnist", "mosei"])

Directory layout under ``root`` (each task's folder can be moved with ``paths={task: PATH}``)::

    avmnist/  image/train_data.npy image/test_data.npy audio/train_data.npy audio/test_data.npy
              train_labels.npy test_labels.npy          (MultiBench's avmnist data_dir)
    enrico/   design_topics.csv screenshots/<id>.jpg wireframes/<id>.png   (ENRICO's own zips)
    push/     gentle_push_1000.hdf5 gentle_push_10.hdf5 gentle_push_300.hdf5  (fannypack
              TrajectoriesFiles; fannypack's cache names ``<drive id>-gentle_push_*.hdf5`` work too)
    vt/       *.h5, one robot episode each, or vt/triangle_real_data/*.h5   (MultiBench robotics)
    urfunny/  humor.pkl                                  (MultiBench's processed UR-FUNNY)
    mosei/    mosei_senti_data.pkl or mosei_raw.pkl      (MultiBench's processed CMU-MOSEI)
    mimic/    im.pk                                      (MultiBench's MIMIC-III pickle)

PUSH and V&T are HDF5 files and need ``h5py`` (imported only when those tasks load; ENRICO's
images need Pillow). The pickles are read by a restricted unpickler that builds numpy arrays and
plain containers only; ``allow_unsafe_pickle=True`` lifts that for a file you trust.

Tasks, modalities and the choices made (each configurable through the loader's keywords). Images
are cut into patches here, per modality (``patchify``), so keep the model's own ``patch_size`` at 1:
it would apply to every image modality alike.

avmnist (10 classes): ``avmnist.image`` image (7, 7, 16), ``avmnist.audio`` image (7, 7, 256).
    ``image/*_data.npy`` (n, 784) or (n, 28, 28) digits and ``audio/*_data.npy`` (n, 112, 112)
    spectrograms, both divided by 255 as MultiBench does; ``*_labels.npy`` (n,) digits 0-9. Each
    image is cut into ``image_patch`` (4) and ``audio_patch`` (16) pixel square patches whose pixels
    become the features: HighMMT's ``to4by4`` layout; patch 1 keeps (28, 28, 1) / (112, 112, 1).
    val = the last n // 12 train samples (MultiBench's 55000:60000); test = the test files.
enrico (20 classes, in sorted topic order): ``enrico.screenshot``, ``enrico.wireframe`` images
    (32, 16, 192). ``design_topics.csv`` (screen_id, topic), screenshots/<id>.jpg and
    wireframes/<id>.png as RGB, resized to ``image_size`` (256, 128) (MultiBench's), /255, cut into
    ``patch`` (8) patches. Screens 50105 and 50109 are dropped (broken wireframes; MultiBench too).
    Splits 65/15/20 from ``random.Random(42)``, screen for screen MultiBench's (whose test loaders
    read its train split by mistake; test here is the held-out 20 %). MultiBench samples ENRICO's
    train split class-balanced; sampling belongs to the trainer, which samples uniformly.
push (regression, 32 outputs, MSE): ``push.gripper_pos`` sequence (16, 3), ``push.gripper_sensors``
    (16, 7), ``push.control`` (16, 7), ``push.image`` image (32, 32, 16). Gentle Push (MuJoCo)
    trajectories ``trajectory<i>`` with ``eef_pos`` (T, 3), ``force`` (T, 6), ``contact`` (T,),
    ``image`` (T, 32, 32), ``Cylinder0_pos`` (T, >=2), cut into ``seq_len`` (16) step subsequences
    at offsets 0 and 8 (as MultiBench). sensors = force + contact; control = the previous eef
    position, its change and contact (as MultiBench). The 16 frames become the image's features
    (the model has no video kind); ``image_patch`` 1. Target: the object's (x, y) at each step,
    flattened. All but the image is standardised with MultiBench's published per-feature
    constants (``normalization="train"``: the train file's mean / std); images are fed unscaled
    as MultiBench does (``rescale_images=True``: uint8 / 255).
    train/val/test = the 1000/10/300-trajectory files.
vt (2 classes): ``vt.image`` image (16, 16, 192), ``vt.depth`` image (16, 16, 64), ``vt.force``
    sequence (6, 32), ``vt.proprio`` sequence (1, 8), ``vt.action`` (1, 4) (``layout="multibench"``,
    as MultiBench / HighMMT; ``"sm4"``: force (32, 6), proprio (8, 1), action (4, 1)). MultiBench's
    robotics episodes: ``image`` (T, H, W, 3) or (T, 3, W, H), ``depth_data`` (T, H, W[, 1]),
    ``proprio`` (T, >=8), ``ee_forces_continuous`` (T, >=32, 6), ``action`` (T, A), ``contact``
    (T, ...). Sample t < T - 1: image, depth, proprio[:8] and the last ``force_window`` (32) force
    readings (tanh, as MultiBench) at t, the action at t + 1; target: contact at t + 1
    (MultiBench's ``contact_next``). uint8 images /255; ``image_patch`` / ``depth_patch`` 8.
    Episodes are split by file with a seeded permutation: val ``val_fraction`` (0.2); MultiBench
    and HighMMT have no test split and report val, so test is val unless ``test_fraction`` > 0.
mosei (2 classes): ``mosei.vision`` sequence (50, 35), ``mosei.audio`` (50, 74), ``affect.text``
    (50, 300). A pickle {'train', 'valid', 'test'} of {'vision' (n, L, 35), 'audio' (n, L, 74),
    'text' (n, L, 300) GloVe, 'labels' (n, 1, 1) sentiment}. Samples with all-zero text are
    dropped (MultiBench); ``align`` (on): start at the first step with text (the data is
    front-padded); ``znorm`` (on): per-sample, per-feature z-score (HighMMT's MOSEI pipeline);
    then cut / zero-pad at the end to ``seq_len`` (50); non-finite values (-inf audio) -> 0.
    Label: sentiment >= 0 (HighMMT; ``zero_is_positive=False``: > 0, MultiBench's).
urfunny (2 classes): ``urfunny.vision`` sequence (20, 371), ``urfunny.audio`` (20, 81),
    ``affect.text`` (50, 300). humor.pkl, the same layout; labels 0/1, class = label > 0.
    ``align`` and ``znorm`` default off: HighMMT feeds humor.pkl's arrays as they are. Steps per
    field (``seq_len``): vision and audio 20, text 50 (Table 15; not padded to 50).
mimic (2 classes, or 6): ``mimic.static`` tabular (5, 1), ``mimic.timeseries`` sequence (24, 12).
    im.pk {'ep_tdata' (n, 24, 12), 'adm_features_all' (n, 5), 'adm_labels_all' (n, 6), 'y_icd9'
    (n, 20)}; non-finite -> 0, z-scored with all samples' mean / std (as MultiBench). Label:
    ``task_index`` 0-19 = that ICD-9 group, binary (default 7, the group HighMMT's scripts use),
    or -1 = MultiBench's 6-class mortality. Splits: MultiBench's own (``random.Random(10)``
    shuffle; val = the first n // 10, test = the next n // 10, train = the rest).

``affect.text`` (300-d GloVe word vectors) is the one modality shared between tasks (MOSEI and
UR-FUNNY, as HighMMT shares it); ``share_text=False`` names it ``mosei.text`` / ``urfunny.text``.
The shapes above are those of the published files; the loaders take feature widths, sequence and
image sizes from the files themselves and check them for consistency.

Memory: ``.npy`` files are memory-mapped, HDF5 images and ENRICO's pictures are read per item, and
every item is converted to float32 only when it is fetched; the pickles (MOSEI, UR-FUNNY, MIMIC)
must be read whole (pickle cannot be mapped). Loading writes nothing.

Errors: a missing file raises FileNotFoundError naming the expected path; a corrupt or truncated
file, a missing key or field, a wrong shape or differing sample counts raise ValueError naming the
file and the field. Problems only visible when an item is read (a truncated JPEG, a damaged HDF5
chunk, non-finite values) raise ValueError naming the file and the sample when it is fetched.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import importlib
import os
import pickle
import random
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .bundled import SPLITS, ModalitySpec, MultiTaskData, TaskSpec

__all__ = [
    "TASKS",
    "MultiBenchDataset",
    "combine",
    "load_avmnist",
    "load_enrico",
    "load_mimic",
    "load_mosei",
    "load_multibench",
    "load_push",
    "load_urfunny",
    "load_vt",
    "patchify",
]

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


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """(H, W, F) -> (H/p, W/p, p*p*F): non-overlapping p x p patches, in the order of
    ``sm4.model.tokenize.patchify`` (which does the work), so a model with ``patch_size=1`` sees
    exactly what ``patch_size=p`` would make of the raw image."""
    if patch == 1:
        return image
    import torch

    from ..model.tokenize import patchify as patch_tokens

    tokens, grid = patch_tokens(torch.from_numpy(np.ascontiguousarray(image))[None], patch)
    return tokens[0].reshape(*grid, -1).numpy()


def _check_patch(task: str, what: str, patch: int, height: int, width: int) -> None:
    if not isinstance(patch, int) or patch < 1 or height % patch or width % patch:
        raise ValueError(f"MultiBench {task}: {what} patch size {patch!r} must be a positive integer "
                         f"dividing the {height}x{width} image")


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
    """

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


# ------------------------------------------------------------------------------------ AV-MNIST


def _square(task: str, path, field: str, x: np.ndarray) -> int:
    """The side S of (n, S*S) or (n, S, S) image arrays."""
    if x.ndim == 3 and x.shape[1] == x.shape[2]:
        side = x.shape[1]
    elif x.ndim == 2 and round(x.shape[1] ** 0.5) ** 2 == x.shape[1]:
        side = round(x.shape[1] ** 0.5)
    else:
        raise _bad(task, path, field, f"must be (n, S*S) or (n, S, S) square images, got {x.shape}")
    if side < 1:
        raise _bad(task, path, field, f"has empty images {x.shape}")
    return side


class _AvmnistReader:
    def __init__(self, image, audio, image_side, audio_side, image_patch, audio_patch, scale):
        self.image, self.audio = image, audio
        self.image_side, self.audio_side = image_side, audio_side
        self.image_patch, self.audio_patch, self.scale = image_patch, audio_patch, scale

    def __call__(self, row: int) -> dict:
        image = np.asarray(self.image[row], dtype=np.float32).reshape(self.image_side, self.image_side, 1)
        audio = np.asarray(self.audio[row], dtype=np.float32).reshape(self.audio_side, self.audio_side, 1)
        return {"avmnist.image": patchify(image * self.scale, self.image_patch),
                "avmnist.audio": patchify(audio * self.scale, self.audio_patch)}


def load_avmnist(root, *, image_patch: int = 4, audio_patch: int = 16, val_size: int | None = None,
                 scale: float = 1 / 255) -> MultiTaskData:
    """AV-MNIST from MultiBench's avmnist folder ``root`` (see the module docstring). ``val_size``:
    the last train samples held out for validation (default n // 12: MultiBench's 5000 of 60000)."""
    task, root = "avmnist", Path(root)
    for name in AVMNIST_FILES:  # every missing file is reported before any is read
        _require_file(task, root / name, " (expected MultiBench's AV-MNIST layout: " + ", ".join(AVMNIST_FILES) + ")")
    parts, sides = {}, {}
    for split in ("train", "test"):
        image = _numeric(task, root / f"image/{split}_data.npy", "image", _npy(task, root / f"image/{split}_data.npy"))
        audio = _numeric(task, root / f"audio/{split}_data.npy", "audio", _npy(task, root / f"audio/{split}_data.npy"))
        labels_path = root / f"{split}_labels.npy"
        labels = _npy(task, labels_path)
        if labels.ndim != 1 and not (labels.ndim == 2 and labels.shape[1] == 1):
            raise _bad(task, labels_path, "labels", f"must be (n,), got {labels.shape}")
        for field, x in (("image", image), ("audio", audio)):
            side = _square(task, root / f"{field}/{split}_data.npy", field, x)
            if sides.setdefault(field, side) != side:
                raise _bad(task, root / f"{field}/{split}_data.npy", field,
                           f"has {side}x{side} images but the train file {sides[field]}x{sides[field]}")
        counts = {f"image/{split}_data.npy": len(image), f"audio/{split}_data.npy": len(audio),
                  f"{split}_labels.npy": len(labels)}
        if len(set(counts.values())) != 1:
            raise ValueError(f"MultiBench {task} folder {str(root)!r}: sample counts differ between files: {counts}")
        parts[split] = (image, audio, _class_labels(task, labels_path, "labels", labels.reshape(-1), 10))
    _check_patch(task, "image", image_patch, sides["image"], sides["image"])
    _check_patch(task, "audio", audio_patch, sides["audio"], sides["audio"])
    modalities = {
        "avmnist.image": ModalitySpec("avmnist.image", "image", (sides["image"] // image_patch,) * 2 + (image_patch**2,)),
        "avmnist.audio": ModalitySpec("avmnist.audio", "image", (sides["audio"] // audio_patch,) * 2 + (audio_patch**2,)),
    }
    n_train = len(parts["train"][2])
    n_val = n_train // 12 if val_size is None else int(val_size)
    if not 0 < n_val < n_train:
        raise ValueError(f"MultiBench {task}: val_size {n_val} must be in [1, {n_train - 1}] for {n_train} train samples")
    splits = {}
    for split, (source, rows) in {"train": ("train", np.arange(n_train - n_val)),
                                  "val": ("train", np.arange(n_train - n_val, n_train)),
                                  "test": ("test", np.arange(len(parts["test"][2])))}.items():
        image, audio, labels = parts[source]
        reader = _AvmnistReader(image, audio, sides["image"], sides["audio"], image_patch, audio_patch, scale)
        splits[split] = MultiBenchDataset(task, modalities, reader, rows, torch.from_numpy(labels[rows]),
                                          root / f"{{image,audio}}/{source}_data.npy")
    spec = _classification(task, modalities, 10)
    return _single(spec, modalities, splits, f"AV-MNIST digits from {str(root)!r}, image {sides['image']}px in "
                   f"{image_patch}px patches, spectrogram {sides['audio']}px in {audio_patch}px patches")


# ------------------------------------------------------------------------------------ MOSEI / UR-FUNNY


def _resolve(task: str, root: Path, names: tuple[str, ...]) -> Path:
    if root.is_file():
        return root
    for name in names:
        if (root / name).is_file():
            return root / name
    expected = " or ".join(repr(str(root / name)) for name in names)
    raise FileNotFoundError(f"MultiBench {task} file not found: expected {expected}")


def _nonzero_rows(x: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Indices of samples whose (L, F) array has a non-zero entry, in chunks (bounded memory)."""
    keep = np.zeros(len(x), dtype=bool)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        keep[start:start + chunk] = (block != 0).reshape(len(block), -1).any(axis=1)
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
            x = np.asarray(self.arrays[field][row][start:start + length], dtype=np.float32)
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            if self.znorm:
                if len(x) > 1:
                    std = x.std(axis=0, ddof=1, keepdims=True)
                    centred = x - x.mean(axis=0, keepdims=True)
                    x = np.divide(centred, std, out=np.zeros_like(x), where=std > 0)
                else:
                    x = np.zeros_like(x)
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


def load_mosei(root, *, seq_len: int = 50, align: bool = True, znorm: bool = True, zero_is_positive: bool = True,
               drop_empty_text: bool = True, share_text: bool = True, allow_unsafe_pickle: bool = False) -> MultiTaskData:
    """CMU-MOSEI sentiment as binary classification; ``root`` is the mosei folder or the .pkl file."""
    positive = (lambda y: y >= 0) if zero_is_positive else (lambda y: y > 0)
    return _load_affect("mosei", root, MOSEI_FILES, positive, seq_len=seq_len, align=align, znorm=znorm,
                        drop_empty_text=drop_empty_text, share_text=share_text,
                        allow_unsafe_pickle=allow_unsafe_pickle,
                        description=f"CMU-MOSEI sentiment {'>=' if zero_is_positive else '>'} 0")


URFUNNY_LENGTHS = {"vision": 20, "audio": 20, "text": 50}  # M³SAT Table 15 / HighMMT's humorloader


def load_urfunny(root, *, seq_len: int | dict = URFUNNY_LENGTHS, align: bool = False, znorm: bool = False, drop_empty_text: bool = True,
                 share_text: bool = True, allow_unsafe_pickle: bool = False) -> MultiTaskData:
    """UR-FUNNY humour detection (binary); ``root`` is the urfunny folder or humor.pkl itself.
    seq_len: steps per field, default Table 15's (vision and audio 20, text 50: not padded to 50);
    an integer gives every field that length (50: sm4's earlier choice)."""
    return _load_affect("urfunny", root, URFUNNY_FILES, lambda y: y > 0, seq_len=seq_len, align=align, znorm=znorm,
                        drop_empty_text=drop_empty_text, share_text=share_text,
                        allow_unsafe_pickle=allow_unsafe_pickle, description="UR-FUNNY humour")


# ------------------------------------------------------------------------------------ MIMIC


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


# ------------------------------------------------------------------------------------ ENRICO


def _pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("the MultiBench ENRICO screenshots are JPEG/PNG files: reading them needs Pillow "
                          "(pip install pillow)") from error
    return Image


class _EnricoReader:
    def __init__(self, files: list[tuple[Path, Path]], size: tuple[int, int], patch: int):
        self.files, self.size, self.patch = files, size, patch

    def _image(self, path: Path) -> np.ndarray:
        Image = _pil()
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
                x = np.asarray(image, dtype=np.float32) / 255.0
        except Exception as error:  # truncated or damaged image data
            raise ValueError(f"MultiBench enrico file {str(path)!r} is corrupt or truncated "
                             f"({type(error).__name__}: {error})") from error
        return patchify(x, self.patch)

    def __call__(self, row: int) -> dict:
        screenshot, wireframe = self.files[row]
        return {"enrico.screenshot": self._image(screenshot), "enrico.wireframe": self._image(wireframe)}


def load_enrico(root, *, image_size: tuple[int, int] = (256, 128), patch: int = 8) -> MultiTaskData:
    """ENRICO UI design topics from the ENRICO folder ``root`` (design_topics.csv, screenshots/,
    wireframes/). ``image_size`` (height, width) of both images before cutting into patches."""
    task, root = "enrico", Path(root)
    csv_path = _require_file(task, root / ENRICO_CSV)
    height, width = (int(s) for s in image_size)
    _check_patch(task, "image", patch, height, width)
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for column in ("screen_id", "topic"):
                if column not in columns:
                    raise ValueError(f"MultiBench {task} file {str(csv_path)!r} is missing field {column!r} "
                                     f"(columns: {columns})")
            examples = [(str(row["screen_id"]).strip(), row["topic"]) for row in reader]
    except UnicodeDecodeError as error:
        raise ValueError(f"MultiBench {task} file {str(csv_path)!r} is not a UTF-8 CSV ({error})") from error
    for line, (screen, topic) in enumerate(examples, start=2):
        if not screen or topic is None or not topic.strip():
            raise _bad(task, csv_path, "screen_id" if not screen else "topic", f"is empty on line {line}")
    examples = [(screen, topic.strip()) for screen, topic in examples if screen not in ENRICO_IGNORED]
    if len(examples) < 3:
        raise ValueError(f"MultiBench {task} file {str(csv_path)!r} lists {len(examples)} usable screens; "
                         "at least 3 are needed for train/val/test")
    topics = sorted({topic for _, topic in examples})
    index = {topic: i for i, topic in enumerate(topics)}
    Image = _pil()
    files = []
    for screen, _ in examples:
        pair = (root / "screenshots" / f"{screen}.jpg", root / "wireframes" / f"{screen}.png")
        for path in pair:
            _require_file(task, path, f" (screen {screen} of {str(csv_path)!r})")
            try:  # reads the header only; damage further in shows when the item is fetched
                with Image.open(path):
                    pass
            except Exception as error:
                raise ValueError(f"MultiBench {task} file {str(path)!r} is not a readable image "
                                 f"({type(error).__name__}: {error})") from error
        files.append(pair)
    targets = np.array([index[topic] for _, topic in examples], dtype=np.int64)
    n = len(examples)
    keys = list(range(n))
    random.Random(ENRICO_SPLIT_SEED).shuffle(keys)  # MultiBench's EnricoDataset split, screen for screen
    train_split, val_split = ENRICO_FRACTIONS
    cut1, cut2 = int(n * train_split), int(n * (train_split + val_split))
    rows = {"train": keys[:cut1], "val": keys[cut1:cut2], "test": keys[cut2:]}
    shape = (height // patch, width // patch, patch * patch * 3)
    modalities = {name: ModalitySpec(name, "image", shape) for name in ("enrico.screenshot", "enrico.wireframe")}
    reader = _EnricoReader(files, (height, width), patch)
    splits = {split: MultiBenchDataset(task, modalities, reader, rows[split],
                                       torch.from_numpy(targets[np.asarray(rows[split], dtype=np.int64)]), root)
              for split in SPLITS}
    return _single(_classification(task, modalities, len(topics)), modalities, splits,
                   f"ENRICO design topics ({len(topics)}) from {str(root)!r}, images {height}x{width} in {patch}px patches")


# ------------------------------------------------------------------------------------ PUSH


def _push_file(root: Path, name: str) -> Path | None:
    if (root / name).is_file():
        return root / name
    cached = sorted(glob.glob(os.path.join(glob.escape(str(root)), f"*-{name}")))  # fannypack's cache names
    return Path(cached[0]) if cached else None


def _trajectory_groups(task: str, path, handle) -> list[str]:
    keys = [key for key in handle if re.fullmatch(r"trajectory\d+", key)]
    if not keys:
        raise ValueError(f"MultiBench {task} file {str(path)!r} is missing field 'trajectory0' "
                         "(no fannypack trajectory groups)")
    return sorted(keys, key=lambda key: int(key[len("trajectory"):]))


def _h5_array(task: str, path, group, field: str, key: str, ndim: int, last: tuple = ()) -> np.ndarray:
    """Read ``group[key]`` (numeric, ``ndim`` dims, trailing dims ``last`` where not None)."""
    where = f"{field}.{key}"
    if key not in group:
        raise ValueError(f"MultiBench {task} file {str(path)!r} is missing field {where!r}")
    x = _h5_read(task, path, where, lambda: np.asarray(group[key][()]))
    if x.dtype.kind not in "biuf" or x.ndim != ndim or any(e is not None and s != e for s, e in zip(x.shape[1:], last)):
        want = ", ".join(["T"] + ["*" if e is None else str(e) for e in last])
        raise _bad(task, path, where, f"must be numeric ({want}), got {x.dtype} {x.shape}")
    return x


class _PushReader:
    def __init__(self, path: str, trajectories: list[dict], samples: np.ndarray, seq_len: int, patch: int,
                 scale: float, files: _H5Files):
        self.path, self.trajectories, self.samples = path, trajectories, samples
        self.seq_len, self.patch, self.scale, self.files = seq_len, patch, scale, files

    def __call__(self, row: int) -> dict:
        index, start = (int(v) for v in self.samples[row])
        trajectory = self.trajectories[index]
        stop = start + self.seq_len
        group = trajectory["group"]
        where = f"{group}.image"
        frames = _h5_read("push", self.path, where,
                          lambda: np.asarray(self.files.get(self.path)[group]["image"][start:stop], dtype=np.float32))
        image = np.moveaxis(frames * self.scale, 0, -1)  # (L, H, W) -> (H, W, L): frames as features
        return {"push.gripper_pos": trajectory["gripper_pos"][start:stop],
                "push.gripper_sensors": trajectory["gripper_sensors"][start:stop],
                "push.control": trajectory["control"][start:stop],
                "push.image": patchify(image, self.patch)}


def _read_push(task: str, path: Path) -> tuple[list[dict], tuple[int, int], bool]:
    try:
        return _read_push_file(task, path)
    except (KeyError, TypeError, AttributeError) as error:  # e.g. a dataset where a group belongs
        raise ValueError(f"MultiBench {task} file {str(path)!r} is not a fannypack trajectories file "
                         f"({type(error).__name__}: {error})") from error


def _read_push_file(task: str, path: Path) -> tuple[list[dict], tuple[int, int], bool]:
    with _open_h5(task, path) as handle:
        trajectories, image_size, uint8 = [], None, None
        for group in _trajectory_groups(task, path, handle):
            g = handle[group]
            if not isinstance(g, _h5py().Group):
                raise _bad(task, path, group, "must be a group of per-step arrays (a fannypack trajectory)")
            eef = _h5_array(task, path, g, group, "eef_pos", 2, (3,)).astype(np.float64)
            force = _h5_array(task, path, g, group, "force", 2, (6,)).astype(np.float64)
            one_d = "contact" in g and getattr(g["contact"], "ndim", 0) == 1  # (T,) or (T, 1)
            contact = _h5_array(task, path, g, group, "contact", 1 if one_d else 2, () if one_d else (1,))
            contact = contact.reshape(len(contact), 1).astype(np.float64)
            states = _h5_array(task, path, g, group, "Cylinder0_pos", 2, (None,))
            if states.shape[1] < 2:
                raise _bad(task, path, f"{group}.Cylinder0_pos", f"must be (T, >=2), got {states.shape}")
            if "image" not in g:
                raise ValueError(f"MultiBench {task} file {str(path)!r} is missing field {group + '.image'!r}")
            image = g["image"]
            if image.ndim != 3 or image.dtype.kind not in "biuf":
                raise _bad(task, path, f"{group}.image", f"must be numeric (T, H, W), got {image.dtype} {image.shape}")
            lengths = {f"{group}.{k}": len(v) for k, v in (("eef_pos", eef), ("force", force), ("contact", contact),
                                                           ("Cylinder0_pos", states), ("image", image))}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"MultiBench {task} file {str(path)!r}: step counts differ between fields: {lengths}")
            if image_size is None:
                image_size, uint8 = tuple(image.shape[1:]), image.dtype == np.uint8
            elif tuple(image.shape[1:]) != image_size:
                raise _bad(task, path, f"{group}.image", f"has {image.shape[1:]} frames, the first trajectory {image_size}")
            previous = np.concatenate([eef[:1], eef[:-1]])  # the previous end-effector position (first: itself)
            trajectories.append({
                "group": group,
                "gripper_pos": eef,
                "gripper_sensors": np.concatenate([force, contact], axis=1),
                "control": np.concatenate([previous, eef - previous, contact], axis=1),
                "states": states[:, :2].astype(np.float64),
            })
    return trajectories, image_size, bool(uint8)


# MultiBench's (and HighMMT's) Gentle Push normalisation: (mean, std) per feature, as published in
# its datasets/gentle_push/data_loader.py (MuJoCo data).
PUSH_MULTIBENCH_STATS = {
    "gripper_pos": ((0.46806443, -0.0017836, 0.88028437), (0.02410769, 0.02341035, 0.04018243)),
    "gripper_sensors": ((4.9182904e-01, 4.5039989e-02, -3.2791464e00, -3.3874984e-03, 1.1552566e-02, -8.4817986e-04,
                         2.1303751e-01),
                        (1.6152629, 1.666905, 1.9186896, 0.14219016, 0.14232528, 0.01675198, 0.40950698)),
    "states": ((0.4970164, -0.00916641), (0.0572766, 0.06118315)),
    "control": ((4.6594709e-01, -2.5247163e-03, 8.8094306e-01, 1.2939950e-04, -5.4364675e-05, -6.1112235e-04,
                 2.2041667e-01),
                (0.02239027, 0.02356066, 0.0405312, 0.00054858, 0.0005754, 0.00046352, 0.41451886)),
}


def load_push(root, *, seq_len: int = 16, image_patch: int = 1, normalization: str = "multibench",
              rescale_images: bool = False) -> MultiTaskData:
    """Gentle Push from the folder ``root`` holding MultiBench's gentle_push_{1000,10,300}.hdf5
    (train/val/test). Needs h5py. Regression of the object's (x, y) over ``seq_len`` steps.

    normalization: "multibench" (default: MultiBench's published constants,
    ``PUSH_MULTIBENCH_STATS``) or "train" (the train file's per-feature mean / std: sm4's earlier
    choice, right for data other than MultiBench's). rescale_images: divide uint8 images by 255
    (MultiBench feeds them unscaled; default False)."""
    task, root = "push", Path(root)
    if normalization not in ("multibench", "train"):
        raise ValueError(f"MultiBench {task}: normalization must be 'multibench' or 'train', got {normalization!r}")
    paths = {}
    for split, name in PUSH_FILES.items():
        found = _push_file(root, name)
        if found is None:
            raise _missing(task, root / name, f" (nor a fannypack cache file {str(root / ('*-' + name))!r})")
        paths[split] = found
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"MultiBench {task}: seq_len must be an integer >= 2, got {seq_len!r}")
    loaded = {split: _read_push(task, path) for split, path in paths.items()}
    sizes = {split: size for split, (_, size, _) in loaded.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"MultiBench {task}: image sizes differ between files: "
                         + ", ".join(f"{paths[s]} {sizes[s]}" for s in SPLITS))
    height, width = sizes["train"]
    _check_patch(task, "image", image_patch, height, width)
    if normalization == "multibench":  # the statistics MultiBench's loader subtracts and divides by
        stats = {key: (np.asarray(mean), np.asarray(std)) for key, (mean, std) in PUSH_MULTIBENCH_STATS.items()}
    else:  # the train file's per-feature mean / std
        stats = {}
        for key in ("gripper_pos", "gripper_sensors", "control", "states"):
            values = np.concatenate([t[key] for t in loaded["train"][0]])
            std = values.std(axis=0)
            stats[key] = (values.mean(axis=0), np.where(std > 0, std, 1.0))
    modalities = {
        "push.gripper_pos": ModalitySpec("push.gripper_pos", "sequence", (seq_len, 3)),
        "push.gripper_sensors": ModalitySpec("push.gripper_sensors", "sequence", (seq_len, 7)),
        "push.control": ModalitySpec("push.control", "sequence", (seq_len, 7)),
        "push.image": ModalitySpec("push.image", "image", (height // image_patch, width // image_patch,
                                                             image_patch * image_patch * seq_len)),
    }
    files = _H5Files(task)
    splits = {}
    for split in SPLITS:
        trajectories, _, uint8 = loaded[split]
        samples = []
        for index, trajectory in enumerate(trajectories):
            for key, (mean, std) in stats.items():
                trajectory[key] = ((trajectory[key] - mean) / std).astype(np.float32)
            steps = len(trajectory["states"])
            for offset in (0, seq_len // 2):  # MultiBench's overlapping subsequences
                samples += [(index, offset + k * seq_len) for k in range((steps - offset) // seq_len)]
        samples = np.asarray(samples, dtype=np.int64).reshape(-1, 2)
        targets = torch.from_numpy(np.stack([trajectories[i]["states"][s:s + seq_len].reshape(-1) for i, s in samples])
                                   if len(samples) else np.zeros((0, seq_len * 2), np.float32))
        for trajectory in trajectories:
            del trajectory["states"]
        reader = _PushReader(str(paths[split]), trajectories, samples, seq_len, image_patch,
                             1 / 255 if uint8 and rescale_images else 1.0, files)
        splits[split] = MultiBenchDataset(task, modalities, reader, np.arange(len(samples)), targets, paths[split])
    spec = TaskSpec(task, tuple(modalities), "regression", seq_len * 2, "mse")
    return _single(spec, modalities, splits, f"Gentle Push object position over {seq_len} steps from {str(root)!r}")


# ------------------------------------------------------------------------------------ V&T


class _VTReader:
    def __init__(self, episodes: list[dict], samples: np.ndarray, image_patch: int, depth_patch: int,
                 force_window: int, files: _H5Files, layout: str = "multibench"):
        self.episodes, self.samples, self.layout = episodes, samples, layout
        self.image_patch, self.depth_patch, self.force_window, self.files = image_patch, depth_patch, force_window, files

    def __call__(self, row: int) -> dict:
        index, t = (int(v) for v in self.samples[row])
        episode = self.episodes[index]
        path = episode["path"]
        handle = self.files.get(path)

        def read(key, step):
            return _h5_read("vt", path, f"{key}[{step}]", lambda: np.asarray(handle[key][step]))

        image = read("image", t).astype(np.float32)
        if episode["chw"]:
            image = np.transpose(image, (2, 1, 0))  # as MultiBench does for (3, ., .) frames
        if episode["image_uint8"]:
            image = image / 255.0
        depth = read("depth_data", t).astype(np.float32).reshape(episode["depth_shape"])
        force = np.tanh(read("ee_forces_continuous", t).astype(np.float32)[-self.force_window:])
        proprio = read("proprio", t).astype(np.float32)[:8]
        action = read("action", t + 1).astype(np.float32)
        if self.layout == "multibench":  # MultiBench / HighMMT: force (6, window), one proprio / action token
            return {"vt.image": patchify(image, self.image_patch), "vt.depth": patchify(depth, self.depth_patch),
                    "vt.force": np.ascontiguousarray(force.T), "vt.proprio": proprio[None], "vt.action": action[None]}
        return {"vt.image": patchify(image, self.image_patch),
                "vt.depth": patchify(depth, self.depth_patch),
                "vt.force": force,
                "vt.proprio": proprio[:, None],
                "vt.action": action[:, None]}


def _vt_files(root: Path) -> list[Path]:
    for folder in (root, root / VT_SUBDIR):
        files = sorted(folder.glob("*.h5")) if folder.is_dir() else []
        if files:
            return files
    return []


def _read_vt_episode(path: Path, force_window: int) -> dict:
    task = "vt"
    with _open_h5(task, path) as handle:
        shapes = {}
        for key in ("image", "depth_data", "proprio", "ee_forces_continuous", "action", "contact"):
            if key not in handle:
                raise ValueError(f"MultiBench {task} file {str(path)!r} is missing field {key!r}")
            dataset = handle[key]
            if not hasattr(dataset, "shape") or dataset.dtype.kind not in "biuf" or dataset.ndim < 1:
                raise _bad(task, path, key, "must be a numeric array with a leading step axis")
            shapes[key] = tuple(dataset.shape)
        steps = {key: shape[0] for key, shape in shapes.items()}
        if len(set(steps.values())) != 1:
            raise ValueError(f"MultiBench {task} file {str(path)!r}: step counts differ between fields: {steps}")
        count = shapes["image"][0]
        if count < 2:
            raise _bad(task, path, "image", f"needs at least 2 steps (inputs at t, targets at t + 1), got {count}")
        image = shapes["image"][1:]
        chw = len(image) == 3 and image[0] == 3 and image[-1] != 3
        if len(image) != 3 or (image[-1] != 3 and not chw):
            raise _bad(task, path, "image", f"must be (T, H, W, 3) or (T, 3, W, H), got {shapes['image']}")
        size = (image[2], image[1]) if chw else image[:2]
        depth = shapes["depth_data"][1:]
        if depth not in (size, size + (1,)):
            raise _bad(task, path, "depth_data", f"must be (T, {size[0]}, {size[1]}[, 1]) like the image, got "
                       f"{shapes['depth_data']}")
        if len(shapes["proprio"]) != 2 or shapes["proprio"][1] < 8:
            raise _bad(task, path, "proprio", f"must be (T, >=8), got {shapes['proprio']}")
        forces = shapes["ee_forces_continuous"]
        if len(forces) != 3 or forces[1] < force_window or forces[2] != 6:
            raise _bad(task, path, "ee_forces_continuous", f"must be (T, >={force_window}, 6), got {forces}")
        if len(shapes["action"]) != 2 or shapes["action"][1] < 1:
            raise _bad(task, path, "action", f"must be (T, A), got {shapes['action']}")
        contact = _h5_read(task, path, "contact", lambda: np.asarray(handle["contact"][()]))
        contact_next = (contact.reshape(count, -1)[1:].sum(axis=1) > 0).astype(np.int64)
        return {"path": str(path), "steps": count, "size": tuple(size), "chw": chw,
                "image_uint8": handle["image"].dtype == np.uint8, "depth_shape": tuple(size) + (1,),
                "actions": shapes["action"][1], "contact_next": contact_next}


def load_vt(root, *, image_patch: int = 8, depth_patch: int = 8, force_window: int = 32, val_fraction: float = 0.2,
            test_fraction: float = 0.0, seed: int = 0, layout: str = "multibench") -> MultiTaskData:
    """Vision & touch (MultiBench robotics) from a folder of episode .h5 files. Needs h5py. Predicts
    contact at the next step (2 classes). Episodes are split by file (seeded); test is val unless
    ``test_fraction`` > 0 (MultiBench evaluates on val). layout "multibench" (default, as MultiBench
    and HighMMT feed them): force (6, force_window), 6 tokens of the window's readings; proprio
    (1, 8) and action (1, A), one token each. "sm4" (earlier): force (force_window, 6), proprio
    (8, 1) and action (A, 1) tables of one feature per token."""
    task, root = "vt", Path(root)
    if layout not in ("multibench", "sm4"):
        raise ValueError(f"MultiBench {task}: layout must be 'multibench' or 'sm4', got {layout!r}")
    files = _vt_files(root)
    if not files:
        raise FileNotFoundError(f"MultiBench {task} files not found: expected episode files "
                                f"{str(root / '*.h5')!r} or {str(root / VT_SUBDIR / '*.h5')!r}")
    if not isinstance(force_window, int) or force_window < 1:
        raise ValueError(f"MultiBench {task}: force_window must be a positive integer, got {force_window!r}")
    episodes = [_read_vt_episode(path, force_window) for path in files]
    first = episodes[0]
    for episode in episodes[1:]:
        for key in ("size", "actions"):
            if episode[key] != first[key]:
                raise _bad(task, episode["path"], "image" if key == "size" else "action",
                           f"has {key} {episode[key]}, the first episode ({first['path']}) {first[key]}")
    height, width = first["size"]
    _check_patch(task, "image", image_patch, height, width)
    _check_patch(task, "depth", depth_patch, height, width)
    n = len(episodes)
    n_val = max(1, round(val_fraction * n))
    n_test = round(test_fraction * n)
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or n - n_val - n_test < 1:
        raise ValueError(f"MultiBench {task}: {n} episode files cannot be split with val_fraction {val_fraction} "
                         f"and test_fraction {test_fraction} (each split needs a file; train at least one)")
    order = np.random.default_rng(seed).permutation(n)
    chosen = {"val": order[:n_val], "test": order[n_val:n_val + n_test] if n_test else order[:n_val],
              "train": order[n_val + n_test:]}
    modalities = {
        "vt.image": ModalitySpec("vt.image", "image", (height // image_patch, width // image_patch, image_patch**2 * 3)),
        "vt.depth": ModalitySpec("vt.depth", "image", (height // depth_patch, width // depth_patch, depth_patch**2)),
    }
    if layout == "multibench":
        modalities.update({"vt.force": ModalitySpec("vt.force", "sequence", (6, force_window)),
                           "vt.proprio": ModalitySpec("vt.proprio", "sequence", (1, 8)),
                           "vt.action": ModalitySpec("vt.action", "sequence", (1, first["actions"]))})
    else:
        modalities.update({"vt.force": ModalitySpec("vt.force", "sequence", (force_window, 6)),
                           "vt.proprio": ModalitySpec("vt.proprio", "tabular", (8, 1)),
                           "vt.action": ModalitySpec("vt.action", "tabular", (first["actions"], 1))})
    samples = np.asarray([(i, t) for i, e in enumerate(episodes) for t in range(e["steps"] - 1)], dtype=np.int64)
    targets = np.concatenate([e["contact_next"] for e in episodes])
    reader = _VTReader(episodes, samples, image_patch, depth_patch, force_window, _H5Files(task), layout)
    splits = {}
    for split in SPLITS:
        rows = np.flatnonzero(np.isin(samples[:, 0], chosen[split]))
        splits[split] = MultiBenchDataset(task, modalities, reader, rows, torch.from_numpy(targets[rows]),
                                          f"{root} ({len(chosen[split])} episodes)")
    return _single(_classification(task, modalities, 2), modalities, splits,
                   f"vision & touch, contact at the next step, from {n} episodes in {str(root)!r}"
                   + ("" if n_test else " (test = val)"))


# ------------------------------------------------------------------------------------ all tasks


LOADERS: dict[str, Callable[..., MultiTaskData]] = {
    "avmnist": load_avmnist, "enrico": load_enrico, "push": load_push, "vt": load_vt,
    "urfunny": load_urfunny, "mosei": load_mosei, "mimic": load_mimic,
}


def _present(task: str, path: Path) -> bool:
    """Whether any of the task's files is at ``path`` (a present task with a file missing then
    fails to load, naming it, rather than being skipped)."""
    if task in ("mosei", "urfunny", "mimic") and path.is_file():
        return True
    if task == "avmnist":
        return any((path / name).is_file() for name in AVMNIST_FILES)
    if task == "enrico":
        return (path / ENRICO_CSV).is_file()
    if task == "push":
        return any(_push_file(path, name) is not None for name in PUSH_FILES.values())
    if task == "vt":
        return bool(_vt_files(path))
    names = {"mosei": MOSEI_FILES, "urfunny": URFUNNY_FILES, "mimic": (MIMIC_FILE,)}[task]
    return any((path / name).is_file() for name in names)


def load_multibench(root, tasks: list[str] | None = None, *, paths: dict | None = None,
                    options: dict[str, dict] | None = None) -> MultiTaskData:
    """The chosen MultiBench tasks in one MultiTaskData.

    root: the folder holding one folder per task (see the module docstring); ``paths[task]``
    overrides a task's folder (or, for the pickled tasks, its file). tasks: default every task
    with files under root; a requested task whose files are missing raises FileNotFoundError
    naming the expected path. options: keyword arguments per task for its loader, e.g.
    ``{"mimic": {"task_index": -1}, "avmnist": {"image_patch": 1}}``; ``train_weight`` and
    ``eval_weight`` there set the TaskSpec weights.
    """
    root = Path(root)
    if isinstance(tasks, str):
        tasks = [tasks]
    paths = {task: Path(p) for task, p in (paths or {}).items()}
    options = dict(options or {})
    unknown = sorted((set(tasks or ()) | set(paths) | set(options)) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown MultiBench tasks {unknown}; known: {list(TASKS)}")
    where = {task: paths.get(task, root / task) for task in TASKS}
    if tasks is None:
        tasks = [task for task in TASKS if _present(task, where[task])]
        if not tasks:
            raise FileNotFoundError(f"no MultiBench task found under {str(root)!r}: expected one of "
                                    + ", ".join(f"{task}/" for task in TASKS) + " (see sm4.data.multibench)")
    elif not tasks:
        raise ValueError("tasks is empty: name at least one of " + ", ".join(TASKS))
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {tasks} names a task twice")
    parts = []
    for task in tasks:
        kwargs = dict(options.get(task, {}))
        weights = {key: float(kwargs.pop(key)) for key in ("train_weight", "eval_weight") if key in kwargs}
        data = LOADERS[task](where[task], **kwargs)
        if weights:
            data.tasks[task] = dataclasses.replace(data.tasks[task], **weights)
        parts.append(data)
    header = f"MultiBench tasks {', '.join(tasks)} from {str(root)!r}"
    return combine(parts, description="\n".join([header] + [part.description for part in parts]))
