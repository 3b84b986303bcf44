"""Fixture files for the MultiBench loader tests, written in the published formats (MultiBench's
datasets/*/get_data.py layouts), and the checks the loader tests share. PUSH and V&T (HDF5) need h5py."""

import csv
import importlib.util
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from sm4.data.multibench import load_multibench

HAVE_H5PY = importlib.util.find_spec("h5py") is not None
needs_h5py = pytest.mark.skipif(not HAVE_H5PY, reason="h5py is not installed (PUSH and V&T are HDF5)")

AVMNIST_SIZES = {"train": 24, "test": 6}  # val = 24 // 12 = 2 of the train samples
AFFECT_SIZES = {"train": 7, "valid": 4, "test": 4}
MIMIC_N = 40
ENRICO_TOPICS = ("bare", "chat", "login", "news")
ENRICO_SCREENS = 14
PUSH_TRAJECTORIES = {"gentle_push_1000.hdf5": 3, "gentle_push_10.hdf5": 1, "gentle_push_300.hdf5": 2}
PUSH_STEPS = 40  # 16-step subsequences at offsets 0 and 8: 2 + 2 per trajectory
VT_EPISODES, VT_STEPS, VT_SIDE = 5, 4, 16


# ------------------------------------------------------------------------ fixture writers


def write_avmnist(folder, sizes=AVMNIST_SIZES, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "image").mkdir(parents=True)
    (folder / "audio").mkdir()
    for split, n in sizes.items():
        np.save(folder / "image" / f"{split}_data.npy", rng.integers(0, 256, (n, 784)).astype(np.float32))
        np.save(folder / "audio" / f"{split}_data.npy", rng.integers(0, 256, (n, 112, 112)).astype(np.float32))
        np.save(folder / f"{split}_labels.npy", (np.arange(n) % 10).astype(np.int64))


def affect_split(rng, n, widths, steps=50, binary=False):
    """Front-padded sequences as in MultiBench's pickles; sample 1 has no text (dropped on load)."""
    split = {}
    lengths = rng.integers(3, steps + 1, n)
    lengths[0] = steps
    for field, width in zip(("vision", "audio", "text"), widths):
        x = np.zeros((n, steps, width), np.float32)
        for i, length in enumerate(lengths):
            x[i, steps - length:] = rng.normal(size=(length, width))
        split[field] = x
    split["text"][1] = 0.0
    split["audio"][0, -1, 0] = -np.inf  # COVAREP's log features hold -inf; MultiBench zeroes them
    if binary:
        split["labels"] = (np.arange(n) % 2).astype(np.float32).reshape(n, 1)
    else:
        split["labels"] = np.linspace(-3, 3, n).reshape(n, 1, 1)
        split["labels"][2] = 0.0
    split["id"] = np.array([f"video_{i}" for i in range(n)])
    return split


def write_affect(path, widths, binary=False, protocol=4, sizes=AFFECT_SIZES, seed=1):
    rng = np.random.default_rng(seed)
    data = {key: affect_split(rng, n, widths, binary=binary) for key, n in sizes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=protocol)
    return data


def write_mimic(path, n=MIMIC_N, seed=2, extra=None, protocol=2):
    """MultiBench's im.pk: a dict of float64 / int64 arrays (``extra``: more keys, e.g. pandas objects)."""
    rng = np.random.default_rng(seed)
    series = rng.normal(3.0, 2.0, (n, 24, 12))
    series[0, 0, 0] = np.nan
    series[1, 2, 3] = np.inf
    mortality = np.zeros((n, 6))
    for i in range(n):
        if i % 3:
            mortality[i, 1 + i % 5] = 1
    data = {"ep_tdata": series, "adm_features_all": rng.normal(1.0, 4.0, (n, 5)),
            "adm_labels_all": mortality, "y_icd9": (rng.random((n, 20)) > 0.5).astype(np.int64), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=protocol)
    return data


def write_enrico(folder, screens=ENRICO_SCREENS):
    from PIL import Image

    (folder / "screenshots").mkdir(parents=True)
    (folder / "wireframes").mkdir()
    rows = [("50105", "news")]  # a broken screen MultiBench ignores: listed, no files
    rng = np.random.default_rng(3)
    for i in range(screens):
        screen = str(10000 + i)
        rows.append((screen, ENRICO_TOPICS[i % len(ENRICO_TOPICS)]))
        pixels = rng.integers(0, 256, (36, 20, 3), dtype=np.uint8)  # 540x960 scaled down, portrait
        Image.fromarray(pixels).save(folder / "screenshots" / f"{screen}.jpg")
        Image.fromarray(pixels[..., ::-1].copy()).save(folder / "wireframes" / f"{screen}.png")
    with open(folder / "design_topics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["screen_id", "topic"])
        writer.writerows(rows)


def write_push_file(path, trajectories, steps=PUSH_STEPS, seed=4, drop=()):
    """A fannypack TrajectoriesFile: groups trajectory<i> of per-step arrays, gzip-compressed."""
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as handle:
        for index in range(trajectories):
            group = handle.create_group(f"trajectory{index}")
            fields = {
                "object-state": rng.normal(size=(steps, 14)).astype(np.float32),
                "Cylinder0_pos": rng.normal([0.5, 0.0, 0.9], 0.05, (steps, 3)).astype(np.float32),
                "eef_pos": rng.normal([0.47, 0.0, 0.88], 0.02, (steps, 3)).astype(np.float32),
                "force": rng.normal(size=(steps, 6)).astype(np.float32),
                "contact": (rng.random(steps) > 0.7).astype(np.float32),
                "image": rng.random((steps, 32, 32)).astype(np.float32),
            }
            for key, value in fields.items():
                if key not in drop:
                    group.create_dataset(key, data=value, chunks=True, compression="gzip")


def write_push(folder):
    folder.mkdir(parents=True)
    for seed, (name, count) in enumerate(PUSH_TRAJECTORIES.items()):
        write_push_file(folder / name, count, seed=10 + seed)


def write_vt_episode(path, steps=VT_STEPS, side=VT_SIDE, seed=5, drop=(), short=(), channels_first=False,
                     depth_2d=False):
    """One episode of the vision & touch robot data (triangle_real_data/*.h5) with the fields and
    per-step shapes the dataset's README lists (Lee et al.'s multimodal_representation: image
    {50, 128, 128, 3}, depth_data {50, 128, 128, 1}, ee_forces_continuous {50, 50, 6}, contact
    {50, 50}, proprio {50, 8}, action {50, 4}, optical_flow {50, 128, 128, 2}, ee_* and joint_*),
    with fewer steps and a smaller image (``steps``, ``side``). dtypes as the RLDS conversion of the
    same data: uint8 images, float32 otherwise. MultiBench's loader reads image, depth_data,
    proprio[:8], ee_forces_continuous (its last 32 readings), action and contact."""
    import h5py

    rng = np.random.default_rng(seed)
    contact = np.zeros((steps, 50), np.float32)
    contact[1::2, ::7] = 1.0  # touching at odd steps: contact_next(t) = (t + 1) odd
    fields = {
        "image": rng.integers(0, 256, (steps, side, side, 3), dtype=np.uint8),
        "depth_data": rng.random((steps, side, side) if depth_2d else (steps, side, side, 1)).astype(np.float32),
        "proprio": rng.normal(size=(steps, 8)).astype(np.float32),
        "ee_forces_continuous": rng.normal(0, 3, (steps, 50, 6)).astype(np.float32),
        "action": rng.normal(size=(steps, 4)).astype(np.float32),
        "contact": contact,
        "optical_flow": np.zeros((steps, side, side, 2), np.float32),
        **{key: rng.normal(size=(steps, width)).astype(np.float32) for key, width in (
            ("ee_ori", 4), ("ee_pos", 3), ("ee_vel", 3), ("ee_vel_ori", 3), ("ee_yaw", 4), ("ee_yaw_delta", 4),
            ("joint_pos", 7), ("joint_vel", 7))},
    }
    if channels_first:
        fields["image"] = np.ascontiguousarray(np.transpose(fields["image"], (0, 3, 2, 1)))  # (T, 3, W, H)
    with h5py.File(path, "w") as handle:
        for key, value in fields.items():
            if key not in drop:
                handle.create_dataset(key, data=value[:-1] if key in short else value)


def write_vt(folder):
    folder = folder / "triangle_real_data"
    folder.mkdir(parents=True)
    for k in range(VT_EPISODES):
        write_vt_episode(folder / f"triangle_{k}_1000.h5", seed=20 + k)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("multibench")
    write_avmnist(base / "avmnist")
    write_affect(base / "mosei" / "mosei_senti_data.pkl", (35, 74, 300))
    write_affect(base / "urfunny" / "humor.pkl", (371, 81, 300), binary=True, protocol=2)
    write_mimic(base / "mimic" / "im.pk")
    write_enrico(base / "enrico")
    if HAVE_H5PY:
        write_push(base / "push")
        write_vt(base / "vt")
    return base


@pytest.fixture(scope="module")
def data(root):
    return load_multibench(root)


def copy_task(root, task, tmp_path):
    shutil.copytree(root / task, tmp_path / task)
    return tmp_path / task


def snapshot(folder):
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


def check_items(dataset, modalities, kind):
    for i in (0, len(dataset) - 1):
        inputs, target = dataset[i]
        assert set(inputs) == set(modalities)
        for name, x in inputs.items():
            assert x.dtype == torch.float32 and tuple(x.shape) == modalities[name].shape
            assert torch.isfinite(x).all()
        if kind == "classification":
            assert target.dtype == torch.int64 and target.shape == ()
        else:
            assert target.dtype == torch.float32 and target.ndim == 1


# ------------------------------------------------------------------------ per task
