"""The MultiBench loaders (sm4.data.multibench) on small fixture files written here in the published
formats (MultiBench's datasets/*/get_data.py layouts): specs, shapes, dtypes, splits, labels, the
bundled task_loader, several tasks in one MultiTaskData, an SM4Model forward per task, and the
errors for missing, damaged and inconsistent files. PUSH and V&T (HDF5) need h5py."""

import csv
import importlib.util
import os
import pickle
import random
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

from sm4.data.bundled import SPLITS, ModalitySpec, TaskSpec, task_loader
from sm4.data.multibench import (
    SHARED_TEXT,
    MultiBenchDataset,
    combine,
    load_avmnist,
    load_enrico,
    load_mimic,
    load_mosei,
    load_multibench,
    load_push,
    load_urfunny,
    load_vt,
    patchify,
)

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


def write_mimic(path, n=MIMIC_N, seed=2):
    rng = np.random.default_rng(seed)
    series = rng.normal(3.0, 2.0, (n, 24, 12))
    series[0, 0, 0] = np.nan
    series[1, 2, 3] = np.inf
    mortality = np.zeros((n, 6))
    for i in range(n):
        if i % 3:
            mortality[i, 1 + i % 5] = 1
    data = {"ep_tdata": series, "adm_features_all": rng.normal(1.0, 4.0, (n, 5)),
            "adm_labels_all": mortality, "y_icd9": (rng.random((n, 20)) > 0.5).astype(np.int64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=2)
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


def write_vt_episode(path, steps=VT_STEPS, side=VT_SIDE, seed=5, drop=(), short=(), channels_first=False):
    import h5py

    rng = np.random.default_rng(seed)
    fields = {
        "image": rng.integers(0, 256, (steps, side, side, 3), dtype=np.uint8),
        "depth_data": rng.random((steps, side, side)).astype(np.float32),
        "proprio": rng.normal(size=(steps, 8)).astype(np.float32),
        "ee_forces_continuous": rng.normal(0, 3, (steps, 32, 6)).astype(np.float32),
        "action": rng.normal(size=(steps, 4)).astype(np.float32),
        "contact": (np.arange(steps) % 2).astype(np.int64),
        "optical_flow": np.zeros((steps, side, side, 2), np.float32),
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


def test_avmnist(root):
    data = load_avmnist(root / "avmnist")
    assert data.modalities == {"avmnist.image": ModalitySpec("avmnist.image", "image", (7, 7, 16)),
                               "avmnist.audio": ModalitySpec("avmnist.audio", "image", (7, 7, 256))}
    assert data.tasks == {"avmnist": TaskSpec("avmnist", ("avmnist.image", "avmnist.audio"), "classification",
                                              10, "accuracy")}
    splits = data.splits["avmnist"]
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 22, "val": 2, "test": 6}
    assert list(splits["val"].rows) == [22, 23]  # the last n // 12 train samples, as MultiBench's 55000:60000
    assert isinstance(splits["train"].reader.audio, np.memmap)  # memory-mapped, read per item
    check_items(splits["train"], data.modalities, "classification")
    # The patches are HighMMT's to4by4 layout of the /255-scaled image.
    raw = np.load(root / "avmnist" / "image" / "test_data.npy")[5].reshape(28, 28) / 255.0
    inputs, target = splits["test"][5]
    assert int(target) == 5
    np.testing.assert_allclose(inputs["avmnist.image"][1, 2].numpy(), raw[4:8, 8:12].reshape(-1), rtol=1e-6)
    audio = np.load(root / "avmnist" / "audio" / "test_data.npy")[5] / 255.0
    np.testing.assert_allclose(inputs["avmnist.audio"][6, 0].numpy(), audio[96:112, 0:16].reshape(-1), rtol=1e-6)
    labels = torch.cat([t for _, t in task_loader(data, "avmnist", "train", batch_size=8)])
    assert labels.min() >= 0 and labels.max() < 10


def test_avmnist_whole_images(root):
    data = load_avmnist(root / "avmnist", image_patch=1, audio_patch=1, val_size=4)
    assert data.modalities["avmnist.image"].shape == (28, 28, 1)
    assert data.modalities["avmnist.audio"].shape == (112, 112, 1)
    assert len(data.splits["avmnist"]["val"]) == 4
    check_items(data.splits["avmnist"]["val"], data.modalities, "classification")
    with pytest.raises(ValueError, match="patch size 5"):
        load_avmnist(root / "avmnist", image_patch=5)


def test_patchify_matches_the_model_tokenizer():
    from sm4.model.tokenize import patchify as model_patchify

    image = np.random.default_rng(0).normal(size=(8, 12, 3)).astype(np.float32)
    ours = patchify(image, 4)
    theirs, grid = model_patchify(torch.from_numpy(image)[None], 4)
    assert ours.shape == (2, 3, 48) and grid == (2, 3)
    np.testing.assert_array_equal(ours.reshape(-1, 48), theirs[0].numpy())


def test_mosei(root):
    data = load_mosei(root / "mosei")
    assert data.modalities == {"mosei.vision": ModalitySpec("mosei.vision", "sequence", (50, 35)),
                               "mosei.audio": ModalitySpec("mosei.audio", "sequence", (50, 74)),
                               SHARED_TEXT: ModalitySpec(SHARED_TEXT, "sequence", (50, 300))}
    task = data.tasks["mosei"]
    assert (task.kind, task.num_outputs, task.metric) == ("classification", 2, "accuracy")
    splits = data.splits["mosei"]
    # sample 1 of every split has no text and is dropped, as MultiBench's drop_entry does
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 6, "val": 3, "test": 3}
    assert 1 not in splits["train"].rows
    with open(root / "mosei" / "mosei_senti_data.pkl", "rb") as handle:
        raw = pickle.load(handle)["train"]
    sentiment = raw["labels"].reshape(-1)[splits["train"].rows]
    np.testing.assert_array_equal(splits["train"].targets.numpy(), (sentiment >= 0).astype(np.int64))
    assert int(splits["train"].targets[list(splits["train"].rows).index(2)]) == 1  # sentiment 0 is positive
    check_items(splits["train"], data.modalities, "classification")
    # align: the real steps move to the front, zero padding at the end; znorm per sample and feature
    row = int(splits["train"].rows[-1])
    length = int((raw["text"][row] != 0).any(axis=1).sum())
    inputs, _ = splits["train"][len(splits["train"]) - 1]
    text = inputs[SHARED_TEXT].numpy()
    assert (text[length:] == 0).all() and (text[:length] != 0).any()
    np.testing.assert_allclose(text[:length].mean(axis=0), 0, atol=1e-5)
    plain = load_mosei(root / "mosei" / "mosei_senti_data.pkl", align=False, znorm=False, zero_is_positive=False,
                       share_text=False)
    assert "mosei.text" in plain.modalities
    inputs, _ = plain.splits["mosei"]["train"][0]  # sample 0: full length, audio's -inf zeroed
    np.testing.assert_allclose(inputs["mosei.text"].numpy(), raw["text"][0], rtol=1e-6)
    assert inputs["mosei.audio"][-1, 0] == 0
    assert int(plain.splits["mosei"]["train"].targets[list(plain.splits["mosei"]["train"].rows).index(2)]) == 0


def test_urfunny(root):
    data = load_urfunny(root / "urfunny", seq_len=20)
    assert data.modalities == {"urfunny.vision": ModalitySpec("urfunny.vision", "sequence", (20, 371)),
                               "urfunny.audio": ModalitySpec("urfunny.audio", "sequence", (20, 81)),
                               SHARED_TEXT: ModalitySpec(SHARED_TEXT, "sequence", (20, 300))}
    splits = data.splits["urfunny"]
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 6, "val": 3, "test": 3}
    np.testing.assert_array_equal(splits["val"].targets.numpy(), splits["val"].rows % 2)
    check_items(splits["test"], data.modalities, "classification")
    with open(root / "urfunny" / "humor.pkl", "rb") as handle:
        raw = pickle.load(handle)["train"]
    inputs, _ = splits["train"][0]  # no alignment or z-scoring by default: the stored steps, truncated
    np.testing.assert_allclose(inputs["urfunny.vision"].numpy(), raw["vision"][0, :20], rtol=1e-6)
    # The default: Table 15's steps per field (vision and audio 20, text 50), not all padded to 50.
    default = load_urfunny(root / "urfunny")
    assert [default.modalities[m].shape[0] for m in ("urfunny.vision", "urfunny.audio", SHARED_TEXT)] == [20, 20, 50]
    with pytest.raises(ValueError, match="seq_len"):
        load_urfunny(root / "urfunny", seq_len={"vision": 20})


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


def test_enrico(root):
    data = load_enrico(root / "enrico", image_size=(32, 16), patch=8)
    shape = (4, 2, 192)
    assert data.modalities == {"enrico.screenshot": ModalitySpec("enrico.screenshot", "image", shape),
                               "enrico.wireframe": ModalitySpec("enrico.wireframe", "image", shape)}
    assert data.tasks["enrico"].num_outputs == len(ENRICO_TOPICS)
    splits = data.splits["enrico"]
    keys = list(range(ENRICO_SCREENS))  # screen 50105 is ignored; MultiBench's seed-42 split of the rest
    random.Random(42).shuffle(keys)
    assert list(splits["train"].rows) == keys[:int(ENRICO_SCREENS * 0.65)]
    assert list(splits["val"].rows) == keys[int(ENRICO_SCREENS * 0.65):int(ENRICO_SCREENS * (0.65 + 0.15))]
    assert sum(len(splits[s]) for s in SPLITS) == ENRICO_SCREENS
    np.testing.assert_array_equal(splits["test"].targets.numpy(), splits["test"].rows % len(ENRICO_TOPICS))
    check_items(splits["val"], data.modalities, "classification")
    x = splits["train"][0][0]["enrico.screenshot"]
    assert x.min() >= 0 and x.max() <= 1
    full = load_enrico(root / "enrico")  # the default 256x128 in 8px patches
    assert full.modalities["enrico.wireframe"].shape == (32, 16, 192)
    check_items(full.splits["enrico"]["test"], full.modalities, "classification")


@needs_h5py
def test_push(root):
    data = load_push(root / "push", normalization="train")
    assert data.modalities == {
        "push.gripper_pos": ModalitySpec("push.gripper_pos", "sequence", (16, 3)),
        "push.gripper_sensors": ModalitySpec("push.gripper_sensors", "sequence", (16, 7)),
        "push.control": ModalitySpec("push.control", "sequence", (16, 7)),
        "push.image": ModalitySpec("push.image", "image", (32, 32, 16)),
    }
    assert data.tasks["push"] == TaskSpec("push", tuple(data.modalities), "regression", 32, "mse")
    splits = data.splits["push"]
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 12, "val": 4, "test": 8}
    check_items(splits["train"], data.modalities, "regression")
    import h5py

    with h5py.File(root / "push" / "gentle_push_1000.hdf5", "r") as handle:
        train = {key: np.concatenate([handle[f"trajectory{i}"][key][()] for i in range(3)])
                 for key in ("eef_pos", "Cylinder0_pos")}
    with h5py.File(root / "push" / "gentle_push_300.hdf5", "r") as handle:
        test = {key: handle["trajectory0"][key][()] for key in ("eef_pos", "Cylinder0_pos", "image")}
    # test item 1 = trajectory 0's subsequence at steps 16:32 (offset-0 cuts first, then offset 8),
    # standardised with the train file's statistics; the image frames are the features
    inputs, target = splits["test"][1]
    expected = (test["eef_pos"][16:32] - train["eef_pos"].mean(0)) / train["eef_pos"].std(0)
    np.testing.assert_allclose(inputs["push.gripper_pos"].numpy(), expected, rtol=1e-4, atol=1e-4)
    states = train["Cylinder0_pos"][:, :2]
    expected = (test["Cylinder0_pos"][16:32, :2] - states.mean(0)) / states.std(0)
    np.testing.assert_allclose(target.numpy(), expected.reshape(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inputs["push.image"].numpy(), np.moveaxis(test["image"][16:32], 0, -1), rtol=1e-6)
    assert list(splits["val"].reader.samples[:, 1]) == [0, 16, 8, 24]
    # The default: MultiBench's published constants, not the train file's statistics
    from sm4.data.multibench import PUSH_MULTIBENCH_STATS

    mean, std = (np.asarray(v) for v in PUSH_MULTIBENCH_STATS["gripper_pos"])
    default_inputs, _ = load_push(root / "push").splits["push"]["test"][1]
    np.testing.assert_allclose(default_inputs["push.gripper_pos"].numpy(), (test["eef_pos"][16:32] - mean) / std,
                               rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="normalization"):
        load_push(root / "push", normalization="minmax")
    batch, targets = next(iter(task_loader(data, "push", "train", batch_size=5)))
    assert batch["push.image"].shape == (5, 32, 32, 16) and targets.shape == (5, 32)


@needs_h5py
def test_push_fannypack_cache_names(root, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    for name in ("gentle_push_1000.hdf5", "gentle_push_10.hdf5", "gentle_push_300.hdf5"):
        shutil.copy(root / "push" / name, folder / f"1AbC-{name}")
    assert len(load_push(folder, image_patch=4).splits["push"]["val"]) == 4


@needs_h5py
def test_vt(root):
    data = load_vt(root / "vt")
    assert data.modalities == {
        "vt.image": ModalitySpec("vt.image", "image", (2, 2, 192)),
        "vt.depth": ModalitySpec("vt.depth", "image", (2, 2, 64)),
        "vt.force": ModalitySpec("vt.force", "sequence", (6, 32)),  # MultiBench's transpose
        "vt.proprio": ModalitySpec("vt.proprio", "sequence", (1, 8)),  # one token of 8 channels
        "vt.action": ModalitySpec("vt.action", "sequence", (1, 4)),
    }
    assert data.tasks["vt"].num_outputs == 2
    splits = data.splits["vt"]
    per_episode = VT_STEPS - 1
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 4 * per_episode, "val": per_episode, "test": per_episode}
    assert not set(splits["train"].rows) & set(splits["val"].rows)
    np.testing.assert_array_equal(splits["val"].targets.numpy(), [1, 0, 1])  # contact at t + 1 = t + 1 odd
    check_items(splits["train"], data.modalities, "classification")
    inputs, _ = splits["train"][0]
    assert inputs["vt.image"].max() <= 1 and inputs["vt.force"].abs().max() < 1  # /255 and tanh
    split = load_vt(root / "vt" / "triangle_real_data", val_fraction=0.2, test_fraction=0.2, image_patch=16,
                    depth_patch=4)
    assert split.modalities["vt.image"].shape == (1, 1, 768)
    earlier = load_vt(root / "vt", layout="sm4")
    assert [earlier.modalities[m].shape for m in ("vt.force", "vt.proprio", "vt.action")] == [(32, 6), (8, 1), (4, 1)]
    sm4_inputs, _ = earlier.splits["vt"]["train"][0]
    np.testing.assert_array_equal(sm4_inputs["vt.force"].numpy().T, inputs["vt.force"].numpy())
    np.testing.assert_array_equal(sm4_inputs["vt.proprio"].numpy()[:, 0], inputs["vt.proprio"].numpy()[0])
    with pytest.raises(ValueError, match="layout"):
        load_vt(root / "vt", layout="columns")
    assert {s: len(split.splits["vt"][s]) for s in SPLITS} == {"train": 9, "val": 3, "test": 3}


@needs_h5py
def test_vt_channels_first(root, tmp_path):
    for k in range(2):
        write_vt_episode(tmp_path / f"e_{k}_1000.h5", seed=20 + k, channels_first=k == 1)
    data = load_vt(tmp_path, val_fraction=0.5, image_patch=1, seed=0)
    by_file = {episode["path"]: episode for episode in data.splits["vt"]["train"].reader.episodes}
    assert by_file[str(tmp_path / "e_1_1000.h5")]["chw"] and not by_file[str(tmp_path / "e_0_1000.h5")]["chw"]
    import h5py

    for split in ("train", "val"):
        dataset = data.splits["vt"][split]
        index = int(dataset.reader.samples[dataset.rows[0], 0])
        with h5py.File(dataset.reader.episodes[index]["path"], "r") as handle:
            frame = handle["image"][0]
        if frame.shape[0] == 3:
            frame = np.transpose(frame, (2, 1, 0))
        np.testing.assert_allclose(dataset[0][0]["vt.image"].numpy(), frame / 255.0, rtol=1e-6)


# ------------------------------------------------------------------------ all together, and the model


def test_load_multibench_finds_every_task(data):
    expected = {"avmnist", "enrico", "urfunny", "mosei", "mimic"} | ({"push", "vt"} if HAVE_H5PY else set())
    assert set(data.tasks) == expected
    assert data.tasks["mosei"].modalities[2] == data.tasks["urfunny"].modalities[2] == SHARED_TEXT
    assert len([m for m in data.modalities if m.endswith("text")]) == 1
    assert set(data.modalities) == {m for t in data.tasks.values() for m in t.modalities}
    for task, spec in data.tasks.items():
        for split in SPLITS:
            inputs, target = next(iter(task_loader(data, task, split, batch_size=3)))
            assert set(inputs) == set(spec.modalities)
            for name, x in inputs.items():
                assert x.dtype == torch.float32 and tuple(x.shape[1:]) == data.modalities[name].shape
            if spec.kind == "classification":
                assert target.dtype == torch.int64 and 0 <= target.min() and target.max() < spec.num_outputs
            else:
                assert target.dtype == torch.float32 and target.shape[1] == spec.num_outputs
    assert "mimic" in data.description and "AV-MNIST" in data.description


def test_load_multibench_options(root):
    data = load_multibench(root, tasks=["mimic", "avmnist"],
                           options={"mimic": {"task_index": -1, "train_weight": 1.2, "eval_weight": 0.5},
                                    "avmnist": {"image_patch": 7}})
    assert list(data.tasks) == ["mimic", "avmnist"]
    assert data.tasks["mimic"].num_outputs == 6
    assert (data.tasks["mimic"].train_weight, data.tasks["mimic"].eval_weight) == (1.2, 0.5)
    assert data.modalities["avmnist.image"].shape == (4, 4, 49)
    moved = load_multibench(root / "nowhere", tasks="mosei", paths={"mosei": root / "mosei" / "mosei_senti_data.pkl"})
    assert len(moved.splits["mosei"]["train"]) == 6
    with pytest.raises(ValueError, match="unknown MultiBench tasks"):
        load_multibench(root, tasks=["kinetics"])


def test_shared_text_must_agree(root, tmp_path):
    write_affect(tmp_path / "urfunny" / "humor.pkl", (371, 81, 200), binary=True)
    mosei = load_mosei(root / "mosei")
    urfunny = load_urfunny(tmp_path / "urfunny")
    with pytest.raises(ValueError, match="share_text=False"):
        combine([mosei, urfunny])
    both = combine([mosei, load_urfunny(tmp_path / "urfunny", share_text=False)])
    assert both.modalities["urfunny.text"].shape == (50, 200)


def test_model_forward_per_task(data):
    from sm4.experiment import build_model
    from sm4.model import get_setting

    torch.manual_seed(0)
    model = build_model(get_setting("medium"), data).eval()
    with torch.no_grad():
        for task, spec in data.tasks.items():
            inputs, _ = next(iter(task_loader(data, task, "val", batch_size=2)))
            out = model(task, inputs)
            assert out.shape == (2, spec.num_outputs) and torch.isfinite(out).all()


def test_loading_writes_nothing(root):
    before = snapshot(root)
    data = load_multibench(root)
    for task in data.tasks:
        for split in SPLITS:
            data.splits[task][split][0]
    assert snapshot(root) == before


# ------------------------------------------------------------------------ errors


def test_missing_files(root, tmp_path):
    folder = copy_task(root, "avmnist", tmp_path)
    os.remove(folder / "audio" / "test_data.npy")
    with pytest.raises(FileNotFoundError, match=r"audio/test_data\.npy"):
        load_avmnist(folder)
    with pytest.raises(FileNotFoundError, match=r"audio/test_data\.npy"):  # present (partly): not skipped
        load_multibench(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mimic/im\.pk"):
        load_multibench(tmp_path, tasks=["mimic"])
    with pytest.raises(FileNotFoundError, match=r"mosei_senti_data\.pkl' or .*mosei_raw\.pkl"):
        load_multibench(tmp_path, tasks=["mosei"])
    with pytest.raises(FileNotFoundError, match="no MultiBench task found"):
        load_multibench(tmp_path / "empty")
    enrico = copy_task(root, "enrico", tmp_path)
    os.remove(enrico / "wireframes" / "10003.png")
    with pytest.raises(FileNotFoundError, match=r"wireframes/10003\.png"):
        load_enrico(enrico)
    with pytest.raises(FileNotFoundError, match=r"gentle_push_1000\.hdf5"):
        load_push(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\*\.h5"):
        load_vt(tmp_path)


def test_corrupt_and_truncated_files(root, tmp_path):
    folder = copy_task(root, "avmnist", tmp_path)
    path = folder / "image" / "train_data.npy"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"image/train_data\.npy' is corrupt or truncated"):
        load_avmnist(folder)
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match=r"image/train_data\.npy' is corrupt"):
        load_avmnist(folder)
    pkl = tmp_path / "mosei" / "mosei_senti_data.pkl"
    pkl.parent.mkdir()
    pkl.write_bytes((root / "mosei" / "mosei_senti_data.pkl").read_bytes()[:20000])
    with pytest.raises(ValueError, match=r"mosei_senti_data\.pkl' is corrupt or truncated"):
        load_mosei(tmp_path / "mosei")
    enrico = copy_task(root, "enrico", tmp_path)
    jpg = enrico / "screenshots" / "10002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:-100])  # the header survives: found when the item is read
    data = load_enrico(enrico, image_size=(32, 16))
    split = next(s for s in SPLITS if 2 in data.splits["enrico"][s].rows)
    dataset = data.splits["enrico"][split]
    with pytest.raises(ValueError, match=r"screenshots/10002\.jpg' is corrupt or truncated"):
        dataset[list(dataset.rows).index(2)]
    (enrico / "wireframes" / "10004.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"wireframes/10004\.png' is not a readable image"):
        load_enrico(enrico)


def test_missing_keys_and_fields(root, tmp_path):
    raw = write_affect(tmp_path / "a" / "mosei_senti_data.pkl", (35, 74, 300))
    del raw["valid"]
    with open(tmp_path / "a" / "mosei_senti_data.pkl", "wb") as handle:
        pickle.dump(raw, handle)
    with pytest.raises(ValueError, match="missing field 'valid'"):
        load_mosei(tmp_path / "a")
    raw = write_affect(tmp_path / "b" / "humor.pkl", (371, 81, 300), binary=True)
    del raw["test"]["text"]
    with open(tmp_path / "b" / "humor.pkl", "wb") as handle:
        pickle.dump(raw, handle)
    with pytest.raises(ValueError, match=r"humor\.pkl' is missing field 'test\.text'"):
        load_urfunny(tmp_path / "b")
    with open(tmp_path / "b" / "humor.pkl", "wb") as handle:
        pickle.dump([1, 2, 3], handle)
    with pytest.raises(ValueError, match="must hold a dict"):
        load_urfunny(tmp_path / "b")
    raw = write_mimic(tmp_path / "c" / "im.pk")
    del raw["y_icd9"]
    with open(tmp_path / "c" / "im.pk", "wb") as handle:
        pickle.dump(raw, handle)
    with pytest.raises(ValueError, match=r"im\.pk' is missing field 'y_icd9'"):
        load_mimic(tmp_path / "c")
    assert load_mimic(tmp_path / "c", task_index=-1).tasks["mimic"].num_outputs == 6  # not needed there
    enrico = copy_task(root, "enrico", tmp_path)
    (enrico / "design_topics.csv").write_text("screen_id,label\n10000,chat\n")
    with pytest.raises(ValueError, match=r"design_topics\.csv' is missing field 'topic'"):
        load_enrico(enrico)


def test_wrong_shapes_and_mismatched_counts(root, tmp_path):
    folder = copy_task(root, "avmnist", tmp_path)
    np.save(folder / "test_labels.npy", np.arange(5))
    with pytest.raises(ValueError, match=r"sample counts differ.*test_labels\.npy': 5"):
        load_avmnist(folder)
    np.save(folder / "test_labels.npy", np.arange(6) + 7)
    with pytest.raises(ValueError, match=r"test_labels\.npy': field 'labels' has labels outside \[0, 10\)"):
        load_avmnist(folder)
    np.save(folder / "test_labels.npy", np.arange(6))
    np.save(folder / "audio" / "test_data.npy", np.zeros((6, 112, 100), np.float32))
    with pytest.raises(ValueError, match=r"audio/test_data\.npy': field 'audio' must be \(n, S\*S\)"):
        load_avmnist(folder)
    raw = write_affect(tmp_path / "m" / "mosei_senti_data.pkl", (35, 74, 300))
    raw["train"]["labels"] = raw["train"]["labels"][:-1]
    with open(tmp_path / "m" / "mosei_senti_data.pkl", "wb") as handle:
        pickle.dump(raw, handle)
    with pytest.raises(ValueError, match=r"sample counts differ between fields: .*'train\.labels': 6"):
        load_mosei(tmp_path / "m")
    raw["train"]["labels"] = np.zeros(7)
    raw["test"]["vision"] = raw["test"]["vision"][:, :, :20]
    with open(tmp_path / "m" / "mosei_senti_data.pkl", "wb") as handle:
        pickle.dump(raw, handle)
    with pytest.raises(ValueError, match=r"field 'test\.vision' has 20 features, the train split 35"):
        load_mosei(tmp_path / "m")
    raw = write_mimic(tmp_path / "c" / "im.pk")
    raw["adm_features_all"] = raw["adm_features_all"][:30]
    with open(tmp_path / "c" / "im.pk", "wb") as handle:
        pickle.dump(raw, handle)
    with pytest.raises(ValueError, match=r"sample counts differ.*'adm_features_all': 30"):
        load_mimic(tmp_path / "c")


def test_pickles_are_read_safely(tmp_path):
    marker = tmp_path / "was-run"

    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (tmp_path / "x").mkdir()
    with open(tmp_path / "x" / "im.pk", "wb") as handle:
        pickle.dump({"ep_tdata": Exploit()}, handle)
    with pytest.raises(ValueError, match=r"refusing to unpickle .*mkdir.*allow_unsafe_pickle=True"):
        load_mimic(tmp_path / "x")
    assert not marker.exists()
    # numpy 1.x wrote numpy.core.* globals: still read, without numpy 2's deprecation warning
    data = write_affect(tmp_path / "old" / "humor.pkl", (371, 81, 300), binary=True)
    blob = pickle.dumps(data, protocol=2)
    assert b"numpy._core.multiarray\n" in blob
    (tmp_path / "old" / "humor.pkl").write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_urfunny(tmp_path / "old").splits["urfunny"]["train"]) == 6


def test_items_are_checked_when_read(root, tmp_path):
    folder = copy_task(root, "avmnist", tmp_path)
    image = np.load(folder / "image" / "test_data.npy")
    image[3, 10] = np.nan
    np.save(folder / "image" / "test_data.npy", image)
    dataset = load_avmnist(folder).splits["avmnist"]["test"]
    dataset[2]
    with pytest.raises(ValueError, match=r"test_data\.npy.*sample 3, modality 'avmnist.image' has non-finite"):
        dataset[3]
    assert isinstance(dataset, MultiBenchDataset)
    with pytest.raises(IndexError):
        dataset[6]


def test_hdf5_needs_h5py(tmp_path, monkeypatch):
    for name in ("gentle_push_1000.hdf5", "gentle_push_10.hdf5", "gentle_push_300.hdf5"):
        (tmp_path / name).write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        load_push(tmp_path)


@needs_h5py
def test_hdf5_errors(root, tmp_path):
    push = copy_task(root, "push", tmp_path)
    (push / "gentle_push_10.hdf5").write_bytes(b"garbage, not HDF5")
    with pytest.raises(ValueError, match=r"gentle_push_10\.hdf5' is not a readable HDF5 file"):
        load_push(push)
    data = (push / "gentle_push_300.hdf5").read_bytes()
    (push / "gentle_push_10.hdf5").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"gentle_push_10\.hdf5' is not a readable HDF5 file"):
        load_push(push)
    write_push_file(push / "gentle_push_10.hdf5", 1, drop=("eef_pos",))
    with pytest.raises(ValueError, match=r"gentle_push_10\.hdf5' is missing field 'trajectory0\.eef_pos'"):
        load_push(push)
    import h5py

    with h5py.File(push / "gentle_push_10.hdf5", "w") as handle:
        handle.create_dataset("trajectory0", data=np.zeros(3))
    with pytest.raises(ValueError, match=r"gentle_push_10\.hdf5': field 'trajectory0' must be a group"):
        load_push(push)
    vt = tmp_path / "vt"
    vt.mkdir()
    for k in range(3):
        write_vt_episode(vt / f"e_{k}_1000.h5", seed=k)
    write_vt_episode(vt / "e_1_1000.h5", drop=("ee_forces_continuous",))
    with pytest.raises(ValueError, match=r"e_1_1000\.h5' is missing field 'ee_forces_continuous'"):
        load_vt(vt)
    write_vt_episode(vt / "e_1_1000.h5", short=("action",))
    with pytest.raises(ValueError, match=r"e_1_1000\.h5': step counts differ.*'action': 3"):
        load_vt(vt)
    write_vt_episode(vt / "e_1_1000.h5", side=8)
    with pytest.raises(ValueError, match=r"e_1_1000\.h5': field 'image' has size \(8, 8\)"):
        load_vt(vt)


def test_the_unpickler_takes_defaultdicts_of_plain_types_but_no_callable_factory(tmp_path):
    """MultiBench's MIMIC / affect pickles hold collections.defaultdict (of list): read; a
    defaultdict whose factory is any other callable is still refused."""
    from collections import defaultdict

    from sm4.data.multibench import _read_pickle

    path = tmp_path / "d.pk"
    table = defaultdict(list, {"a": [1, 2]})
    path.write_bytes(pickle.dumps({"x": table, "y": np.arange(3)}, protocol=4))
    loaded = _read_pickle("mimic", path, allow_unsafe=False)
    assert isinstance(loaded["x"], defaultdict) and loaded["x"]["a"] == [1, 2] and loaded["x"]["b"] == []
    path.write_bytes(pickle.dumps(defaultdict(os.getcwd), protocol=4))
    with pytest.raises(ValueError, match=r"refusing to unpickle .*getcwd"):
        _read_pickle("mimic", path, allow_unsafe=False)
