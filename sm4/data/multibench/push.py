"""Gentle Push (fannypack TrajectoriesFiles); see sm4.data.multibench."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..bundled import ModalitySpec, MultiTaskData, SPLITS, TaskSpec
from ._common import (MultiBenchDataset, PUSH_FILES, _H5Files, _bad, _check_patch, _h5_read, _h5py, _missing, _open_h5,
                      _single, patchify)


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
                 scale: float, files: _H5Files, video: bool = False):
        self.path, self.trajectories, self.samples = path, trajectories, samples
        self.seq_len, self.patch, self.scale, self.files, self.video = seq_len, patch, scale, files, video

    def __call__(self, row: int) -> dict:
        index, start = (int(v) for v in self.samples[row])
        trajectory = self.trajectories[index]
        stop = start + self.seq_len
        group = trajectory["group"]
        where = f"{group}.image"
        frames = _h5_read("push", self.path, where,
                          lambda: np.asarray(self.files.get(self.path)[group]["image"][start:stop], dtype=np.float32))
        if self.video:  # (L, H, W) -> (L, H, W, 1): one token per pixel of every frame
            image = (frames * self.scale)[..., None]
        else:  # (L, H, W) -> (H, W, L): frames as features, then patches
            image = patchify(np.moveaxis(frames * self.scale, 0, -1), self.patch)
        return {"push.gripper_pos": trajectory["gripper_pos"][start:stop],
                "push.gripper_sensors": trajectory["gripper_sensors"][start:stop],
                "push.control": trajectory["control"][start:stop],
                "push.image": image}


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
              rescale_images: bool = False, image_layout: str = "frames") -> MultiTaskData:
    """Gentle Push from the folder ``root`` holding MultiBench's gentle_push_{1000,10,300}.hdf5
    (train/val/test). Needs h5py. Regression of the object's (x, y) over ``seq_len`` steps.

    normalization: "multibench" (default: MultiBench's published constants,
    ``PUSH_MULTIBENCH_STATS``) or "train" (the train file's per-feature mean / std: sm4's earlier
    choice, right for data other than MultiBench's). rescale_images: divide uint8 images by 255
    (MultiBench feeds them unscaled; default False).

    image_layout: how the ``seq_len`` camera frames become tokens. "frames" (default; the medium
    setting's, M³SAT Table 14: 16 channels on 2 axes): an image (H, W, seq_len) whose features at a
    pixel are its frames, cut into ``image_patch`` patches (1024 tokens of 16). "video" (the small
    setting's, Table 13: 1 channel on 3 axes, as HighMMT feeds PUSH): a video (seq_len, H, W, 1),
    one token per pixel of every frame (16384 tokens: 16x the encoder's cross-attention input),
    ``image_patch`` 1."""
    task, root = "push", Path(root)
    if image_layout not in ("frames", "video"):
        raise ValueError(f"MultiBench {task}: image_layout must be 'frames' or 'video', got {image_layout!r}")
    if image_layout == "video" and image_patch != 1:
        raise ValueError(f"MultiBench {task}: image_layout 'video' has one token per pixel: image_patch must be 1, "
                         f"got {image_patch!r}")
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
    if image_layout == "video":
        modalities["push.image"] = ModalitySpec("push.image", "video", (seq_len, height, width, 1))
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
                             1 / 255 if uint8 and rescale_images else 1.0, files, image_layout == "video")
        splits[split] = MultiBenchDataset(task, modalities, reader, np.arange(len(samples)), targets, paths[split])
    spec = TaskSpec(task, tuple(modalities), "regression", seq_len * 2, "mse")
    return _single(spec, modalities, splits, f"Gentle Push object position over {seq_len} steps from {str(root)!r}")
