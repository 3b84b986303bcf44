"""The MultiBench Gentle Push loader (sm4.data.multibench.push) on fixture files in the published format."""

import shutil

import numpy as np
import pytest

from sm4.data.bundled import SPLITS, ModalitySpec, TaskSpec, task_loader
from sm4.data.multibench import load_push

from .multibench_fixtures import check_items, needs_h5py, root  # noqa: F401 (fixtures by name)


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


def test_push_constants_are_multibench_published_ones():
    """MultiBench's gentle_push data loader subtracts / divides by these (its source, not train statistics)."""
    from sm4.data.multibench import PUSH_MULTIBENCH_STATS

    assert PUSH_MULTIBENCH_STATS["gripper_pos"] == ((0.46806443, -0.0017836, 0.88028437),
                                                    (0.02410769, 0.02341035, 0.04018243))
    assert PUSH_MULTIBENCH_STATS["gripper_sensors"][0][2] == -3.2791464 and len(PUSH_MULTIBENCH_STATS["control"][1]) == 7


@needs_h5py
def test_push_video_layout_is_the_small_settings_pixel_tokens(root):
    """M³SAT Table 13 (small): PUSH's image as 1 channel on 3 axes (frame, row, column); the default
    "frames" is Table 14's (medium) 16 channels on 2 axes. Same pixels either way."""
    frames = load_push(root / "push")
    video = load_push(root / "push", image_layout="video")
    height, width, steps = frames.modalities["push.image"].shape
    assert video.modalities["push.image"] == ModalitySpec("push.image", "video", (steps, height, width, 1))
    a, b = frames.splits["push"]["test"][1][0]["push.image"], video.splits["push"]["test"][1][0]["push.image"]
    np.testing.assert_array_equal(b.numpy()[..., 0], np.moveaxis(a.numpy(), -1, 0))
    check_items(video.splits["push"]["train"], video.modalities, "regression")
    for bad in ({"image_layout": "pixels"}, {"image_layout": "video", "image_patch": 4}):
        with pytest.raises(ValueError, match="image_layout"):
            load_push(root / "push", **bad)
