"""The MultiBench vision & touch loader (sm4.data.multibench.vandt) on fixture files in the published format."""

import numpy as np
import pytest

from sm4.data.bundled import SPLITS, ModalitySpec
from sm4.data.multibench import load_vt

from .multibench_fixtures import VT_STEPS, check_items, needs_h5py, root, write_vt_episode  # noqa: F401 (fixture)


@needs_h5py
def test_vt(root):
    data = load_vt(root / "vt", image_patch=8, depth_patch=8)
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
    # val: 1 of the 5 episodes drawn, and its paired episode (MultiBench's augment_val)
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 3 * per_episode, "val": 2 * per_episode,
                                                   "test": 2 * per_episode}
    assert not set(splits["train"].rows) & set(splits["val"].rows)
    np.testing.assert_array_equal(splits["val"].targets.numpy(), [1, 0, 1] * 2)  # contact at t + 1 = t + 1 odd
    check_items(splits["train"], data.modalities, "classification")
    inputs, _ = splits["train"][0]
    assert inputs["vt.force"].abs().max() < 1  # tanh
    import h5py

    episode, step = (int(v) for v in splits["train"].reader.samples[splits["train"].rows[0]])
    with h5py.File(splits["train"].reader.episodes[episode]["path"], "r") as handle:
        readings = handle["ee_forces_continuous"][step]  # (50, 6): MultiBench's ProcessForce keeps the last 32
        frame = handle["image"][step]
    pixels = load_vt(root / "vt", image_patch=1).splits["vt"]["train"][0][0]["vt.image"].numpy()
    np.testing.assert_array_equal(pixels, frame)  # uint8 values as floats, not /255 (MultiBench's ToTensor)
    scaled = load_vt(root / "vt", image_patch=1, rescale_images=True).splits["vt"]["train"][0][0]["vt.image"].numpy()
    np.testing.assert_allclose(scaled, frame / 255.0, rtol=1e-6)
    np.testing.assert_allclose(inputs["vt.force"].numpy(), np.tanh(readings[-32:]).T, rtol=1e-6)
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
    assert {s: len(split.splits["vt"][s]) for s in SPLITS} == {"train": 6, "val": 6, "test": 3}


@needs_h5py
def test_vt_depth_with_or_without_its_channel_axis(tmp_path):
    """depth_data is (T, H, W, 1) in the published files; MultiBench reshapes a (T, H, W) one alike."""
    for folder, flat in (("a", False), ("b", True)):
        (tmp_path / folder).mkdir()
        for k in range(2):
            write_vt_episode(tmp_path / folder / f"e_{k}_1000.h5", seed=k, depth_2d=flat)
    a, b = (load_vt(tmp_path / f, val_fraction=0.5, paired_val=False, depth_patch=1) for f in "ab")
    np.testing.assert_array_equal(a.splits["vt"]["train"][0][0]["vt.depth"], b.splits["vt"]["train"][0][0]["vt.depth"])


@needs_h5py
def test_vt_channels_first(root, tmp_path):
    for k in range(2):
        write_vt_episode(tmp_path / f"e_{k}_1000.h5", seed=20 + k, channels_first=k == 1)
    data = load_vt(tmp_path, val_fraction=0.5, image_patch=1, seed=0, paired_val=False, rescale_images=True)
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


@needs_h5py
def test_vt_val_episodes_bring_their_paired_episode_as_multibench(tmp_path):
    """MultiBench's robotics get_data: val files are drawn, then augment_val moves each one's
    paired episode (same prefix; number < 10: the highest of 19..0 left in train, else the lowest
    of 0..19) from train to val. paired_val=False keeps the drawn val files alone."""
    from sm4.data.multibench.vandt import _paired_val

    numbers = (0, 1, 2, 17, 18, 19)
    for k in numbers:
        write_vt_episode(tmp_path / f"tri_{k}_1000.h5", seed=30 + k)
    names = [f"tri_{k}_1000.h5" for k in numbers]

    def episodes(data, split):
        dataset = data.splits["vt"][split]
        files = {dataset.reader.episodes[int(i)]["path"] for i in dataset.reader.samples[dataset.rows, 0]}
        return sorted(path.rsplit("/", 1)[1] for path in files)

    for seed in range(4):
        plain = load_vt(tmp_path, val_fraction=0.34, seed=seed, paired_val=False, image_patch=16, depth_patch=16)
        paired = load_vt(tmp_path, val_fraction=0.34, seed=seed, image_patch=16, depth_patch=16)
        drawn = episodes(plain, "val")
        assert len(drawn) == 2 and episodes(plain, "test") == drawn
        val = set(episodes(paired, "val"))
        assert set(drawn) < val and episodes(paired, "test") == sorted(val)  # test is val (no test split)
        assert not set(episodes(paired, "train")) & val and set(episodes(paired, "train")) | val == set(names)
    # two low-numbered val episodes: the first takes 19, the second finds 19 already paired
    val, train = _paired_val(names, [1, 2], [0, 3, 4, 5])
    assert [names[i] for i in val] == ["tri_19_1000.h5", "tri_1_1000.h5", "tri_2_1000.h5"]
    assert [names[i] for i in train] == ["tri_0_1000.h5", "tri_17_1000.h5", "tri_18_1000.h5"]
    # an original val episode is not a pair: 0 (number < 10) skips val's 19 and takes 18
    val, _ = _paired_val(names, [0, 5], [1, 2, 3, 4])
    assert [names[i] for i in val] == ["tri_18_1000.h5", "tri_1_1000.h5", "tri_0_1000.h5", "tri_19_1000.h5"]
    (tmp_path / "two").mkdir()
    for k in (0, 19):
        write_vt_episode(tmp_path / "two" / f"tri_{k}_1000.h5", seed=k)
    with pytest.raises(ValueError, match="paired_val"):  # 1 drawn + its pair: no train file left
        load_vt(tmp_path / "two", val_fraction=0.5)
    assert len(load_vt(tmp_path / "two", val_fraction=0.5, paired_val=False).splits["vt"]["train"]) == VT_STEPS - 1


# ------------------------------------------------------------------------ all together, and the model


@needs_h5py
def test_vt_default_is_the_papers_pixel_tokens(root):
    """M³SAT Table 13 (the small setting, V&T's only one): image 3 channels and depth 1 on 2 axes,
    one token per pixel; force 6 tokens of 32, proprio and action one token of 8 / 4 channels."""
    data = load_vt(root / "vt")
    height, width = data.modalities["vt.image"].shape[:2]
    assert data.modalities["vt.image"] == ModalitySpec("vt.image", "image", (height, width, 3))
    assert data.modalities["vt.depth"] == ModalitySpec("vt.depth", "image", (height, width, 1))
    assert [data.modalities[m].shape for m in ("vt.force", "vt.proprio", "vt.action")] == [(6, 32), (1, 8), (1, 4)]
    patched = load_vt(root / "vt", image_patch=8, depth_patch=8)  # the earlier, cheaper choice
    assert patched.modalities["vt.image"].shape == (height // 8, width // 8, 192)
    check_items(data.splits["vt"]["val"], data.modalities, "classification")
