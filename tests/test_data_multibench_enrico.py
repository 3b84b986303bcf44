"""The MultiBench ENRICO loader (sm4.data.multibench.enrico) on fixture files in the published format."""

import random

import numpy as np

from sm4.data.bundled import SPLITS, ModalitySpec
from sm4.data.multibench import load_enrico

from .multibench_fixtures import ENRICO_SCREENS, ENRICO_TOPICS, check_items, root  # noqa: F401 (fixtures by name)


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


def test_enrico_train_split_carries_multibench_class_balanced_sampling(root):
    import torch

    train = load_enrico(root / "enrico").splits["enrico"]["train"]
    weights = train.sampling_weights
    per_class = torch.zeros(int(train.targets.max()) + 1, dtype=torch.float64).index_add_(0, train.targets, weights)
    torch.testing.assert_close(per_class[per_class > 0], torch.ones_like(per_class[per_class > 0]))  # equal mass
    assert len(list(train.sampler(torch.Generator().manual_seed(0)))) == len(train)
    assert load_enrico(root / "enrico", balanced_train=False).splits["enrico"]["train"].sampler() is None

