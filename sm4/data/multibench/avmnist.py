"""AV-MNIST (MultiBench's avmnist data_dir); see sm4.data.multibench."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..bundled import ModalitySpec, MultiTaskData
from ._common import (AVMNIST_FILES, MultiBenchDataset, _bad, _check_patch, _class_labels, _classification, _npy,
                      _numeric, _require_file, _single, patchify)


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
