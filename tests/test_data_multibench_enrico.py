"""The MultiBench ENRICO loader (sm4.data.multibench.enrico) on fixture files in the published format."""

import random

import numpy as np
import pytest

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
    full = load_enrico(root / "enrico")  # the default: 256x128 in the papers' 16x8 rectangles
    assert full.modalities["enrico.wireframe"].shape == (16, 16, 384)
    check_items(full.splits["enrico"]["test"], full.modalities, "classification")


def test_enrico_default_is_the_papers_16_by_8_rectangles_and_squares_stay_available(root):
    """M³SAT Table 14: ENRICO's images as 2 x 256 tokens of 384 (16 x 8 pixel rectangles, 3 colours);
    ``patch=8`` keeps the earlier squares. Each token holds its rectangle's pixels row by row."""
    from sm4.data.multibench._common import patchify

    papers = load_enrico(root / "enrico")
    squares = load_enrico(root / "enrico", patch=8)
    assert papers.modalities["enrico.screenshot"].shape == (16, 16, 384)
    assert squares.modalities["enrico.screenshot"].shape == (32, 16, 192)
    pixels = load_enrico(root / "enrico", patch=1).splits["enrico"]["test"][0][0]["enrico.screenshot"].numpy()
    cut = papers.splits["enrico"]["test"][0][0]["enrico.screenshot"].numpy()
    for row, col in ((0, 0), (3, 5), (15, 15)):
        np.testing.assert_array_equal(cut[row, col], pixels[16 * row:16 * row + 16, 8 * col:8 * col + 8].reshape(-1))
    # a rectangle (p, p) is the square p
    np.testing.assert_array_equal(patchify(pixels, (8, 8)), squares.splits["enrico"]["test"][0][0]["enrico.screenshot"].numpy())
    for bad in ((16, 7), (0, 8), 7, (16, 8, 1), 2.0):
        with pytest.raises(ValueError, match="patch size"):
            load_enrico(root / "enrico", patch=bad)


def test_enrico_train_split_carries_multibench_class_balanced_sampling(root):
    import torch

    train = load_enrico(root / "enrico").splits["enrico"]["train"]
    weights = train.sampling_weights
    per_class = torch.zeros(int(train.targets.max()) + 1, dtype=torch.float64).index_add_(0, train.targets, weights)
    torch.testing.assert_close(per_class[per_class > 0], torch.ones_like(per_class[per_class > 0]))  # equal mass
    assert len(list(train.sampler(torch.Generator().manual_seed(0)))) == len(train)
    assert load_enrico(root / "enrico", balanced_train=False).splits["enrico"]["train"].sampler() is None

