"""The MultiBench AV-MNIST loader (sm4.data.multibench.avmnist) on fixture files in the published format."""

import numpy as np
import pytest
import torch

from sm4.data.bundled import SPLITS, ModalitySpec, TaskSpec, task_loader
from sm4.data.multibench import load_avmnist, patchify

from .multibench_fixtures import check_items, root  # noqa: F401 (fixtures by name)


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
