"""Vision & touch (MultiBench robotics episodes); see sm4.data.multibench."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..bundled import ModalitySpec, MultiTaskData, SPLITS
from ._common import (MultiBenchDataset, VT_SUBDIR, _H5Files, _bad, _check_patch, _classification, _h5_read, _open_h5,
                      _single, patchify)


class _VTReader:
    def __init__(self, episodes: list[dict], samples: np.ndarray, image_patch: int, depth_patch: int,
                 force_window: int, files: _H5Files, layout: str = "multibench", rescale_images: bool = False):
        self.episodes, self.samples, self.layout, self.rescale_images = episodes, samples, layout, rescale_images
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
        if episode["image_uint8"] and self.rescale_images:  # MultiBench feeds the 0-255 values as floats
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


def _episode_number(name: str) -> tuple[str, int] | None:
    """(prefix, number) of an episode file ``<prefix><number>_1000.h5`` (number 0-99, as
    MultiBench's robotics loader parses it), or None for a name of another form."""
    stem = name[:-len("_1000.h5")] if name.endswith("_1000.h5") else None
    if not stem or len(stem) < 2:
        return None
    digits = 1 if stem[-2] == "_" else 2
    prefix, number = stem[:-digits], stem[-digits:]
    return (prefix, int(number)) if number.isdigit() else None


def _paired_val(names: list[str], val: list[int], train: list[int]) -> tuple[list[int], list[int]]:
    """MultiBench's ``augment_val``: each validation episode brings its paired episode of the same
    prefix from train into val: for an episode number below 10 the highest-numbered of 19, 18, ...,
    0, else the lowest of 0, 1, ..., 19, that is still in train or already brought in as a pair
    (then nothing moves). Returns (val, train) as indices into ``names``; episodes whose names are
    not ``<prefix><number>_1000.h5`` bring none. Unlike MultiBench's list, a pair brought in twice
    is listed once (MultiBench repeats its samples)."""
    where = {name: i for i, name in enumerate(names)}
    train_left, pairs = list(train), []
    for index in val:
        parsed = _episode_number(names[index])
        if parsed is None:
            continue
        prefix, number = parsed
        for candidate in (range(19, -1, -1) if number < 10 else range(20)):
            other = where.get(f"{prefix}{candidate}_1000.h5")
            if other in pairs:
                break
            if other in train_left:
                train_left.remove(other)
                pairs.append(other)
                break
    return pairs + [i for i in val if i not in pairs], train_left


def load_vt(root, *, image_patch: int = 1, depth_patch: int = 1, force_window: int = 32, val_fraction: float = 0.2,
            test_fraction: float = 0.0, seed: int = 0, layout: str = "multibench",
            paired_val: bool = True, rescale_images: bool = False) -> MultiTaskData:
    """Vision & touch (MultiBench robotics) from a folder of episode .h5 files. Needs h5py. Predicts
    contact at the next step (2 classes). Episodes are split by file (seeded); test is val unless
    ``test_fraction`` > 0 (MultiBench evaluates on val). layout "multibench" (default, as MultiBench
    and HighMMT feed them): force (6, force_window), 6 tokens of the window's readings; proprio
    (1, 8) and action (1, A), one token each. "sm4" (earlier): force (force_window, 6), proprio
    (8, 1) and action (A, 1) tables of one feature per token. paired_val (default True, as
    MultiBench's ``augment_val``): each val episode brings its paired episode (same name prefix,
    see ``_paired_val``) from train into val, so val holds more than ``val_fraction`` of the
    files; False: val is the seeded ``val_fraction`` draw alone (the earlier split).
    rescale_images: divide uint8 camera images by 255 (sm4's earlier choice); default False, as
    MultiBench's ToTensor, which only casts them to float. image_patch / depth_patch: default 1,
    pixel tokens (M³SAT Table 13: image 3 channels and depth 1 on 2 axes, 128 x 128 tokens each,
    as HighMMT feeds them); 8 (sm4's earlier default) cuts 8 x 8 patches, 64x fewer tokens for the
    encoder's cross-attention, the affordable choice on a CPU."""
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
    val, train = [int(i) for i in order[:n_val]], [int(i) for i in order[n_val + n_test:]]
    if paired_val:
        val, train = _paired_val([Path(e["path"]).name for e in episodes], val, train)
        if not train:
            raise ValueError(f"MultiBench {task}: with paired_val, the {n} episode files leave none for train "
                             f"(val_fraction {val_fraction}); pass a smaller val_fraction or paired_val=False")
    chosen = {"val": np.asarray(val), "test": order[n_val:n_val + n_test] if n_test else np.asarray(val),
              "train": np.asarray(train)}
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
    reader = _VTReader(episodes, samples, image_patch, depth_patch, force_window, _H5Files(task), layout,
                       rescale_images)
    splits = {}
    for split in SPLITS:
        rows = np.flatnonzero(np.isin(samples[:, 0], chosen[split]))
        splits[split] = MultiBenchDataset(task, modalities, reader, rows, torch.from_numpy(targets[rows]),
                                          f"{root} ({len(chosen[split])} episodes)")
    return _single(_classification(task, modalities, 2), modalities, splits,
                   f"vision & touch, contact at the next step, from {n} episodes in {str(root)!r}"
                   + ("" if n_test else " (test = val)"))
