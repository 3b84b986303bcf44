"""The MultiBench vision & touch loader (sm4.data.multibench.vandt) on fixture files in the published format."""

import numpy as np
import pytest

from sm4.data.bundled import SPLITS, ModalitySpec
from sm4.data.multibench import load_vt

from .multibench_fixtures import VT_STEPS, check_items, needs_h5py, root, write_vt_episode  # noqa: F401 (fixture)


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
