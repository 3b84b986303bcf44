"""ENRICO (its own zips: design_topics.csv, screenshots, wireframes); see sm4.data.multibench."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import torch

from ..bundled import ModalitySpec, MultiTaskData, SPLITS
from ._common import (ENRICO_CSV, ENRICO_FRACTIONS, ENRICO_IGNORED, ENRICO_SPLIT_SEED, MultiBenchDataset, _bad,
                      _check_patch, _classification, _patch_sides, _require_file, _single, class_balanced_weights, patchify)


def _pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("the MultiBench ENRICO screenshots are JPEG/PNG files: reading them needs Pillow "
                          "(pip install pillow)") from error
    return Image


class _EnricoReader:
    def __init__(self, files: list[tuple[Path, Path]], size: tuple[int, int], patch: int):
        self.files, self.size, self.patch = files, size, patch

    def _image(self, path: Path) -> np.ndarray:
        Image = _pil()
        try:
            with Image.open(path) as image:
                image = image.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR)
                x = np.asarray(image, dtype=np.float32) / 255.0
        except Exception as error:  # truncated or damaged image data
            raise ValueError(f"MultiBench enrico file {str(path)!r} is corrupt or truncated "
                             f"({type(error).__name__}: {error})") from error
        return patchify(x, self.patch)

    def __call__(self, row: int) -> dict:
        screenshot, wireframe = self.files[row]
        return {"enrico.screenshot": self._image(screenshot), "enrico.wireframe": self._image(wireframe)}


ENRICO_PATCH = (16, 8)  # M³SAT Table 14: 16 x 8 rectangles, 384 channels, 2 x 256 tokens


def load_enrico(root, *, image_size: tuple[int, int] = (256, 128), patch: int | tuple[int, int] = ENRICO_PATCH,
                balanced_train: bool = True) -> MultiTaskData:
    """ENRICO UI design topics from the ENRICO folder ``root`` (design_topics.csv, screenshots/,
    wireframes/). ``image_size`` (height, width) of both images before cutting into patches.
    patch: (rows, cols) rectangles or an int for squares. Default the papers' (16, 8): each
    256 x 128 image becomes 16 x 16 tokens of 384 features (M³SAT Table 14), the tokenisation
    their FLOP figures were counted with. ``patch=8`` keeps sm4's earlier 8 x 8 squares (32 x 16
    tokens of 192 features): twice the tokens at half the features, square cells on the screen,
    which may suit UI layouts better, at twice the encoder's cross-attention tokens.
    balanced_train (default True): the train split carries MultiBench's class-balanced sampling
    weights (``MultiBenchDataset.sampling_weights`` / ``.sampler()``), which sm4's trainer draws
    with (``task_loader(..., own_sampler=True)``); a loop that samples uniformly ignores them."""
    task, root = "enrico", Path(root)
    csv_path = _require_file(task, root / ENRICO_CSV)
    height, width = (int(s) for s in image_size)
    _check_patch(task, "image", patch, height, width)
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for column in ("screen_id", "topic"):
                if column not in columns:
                    raise ValueError(f"MultiBench {task} file {str(csv_path)!r} is missing field {column!r} "
                                     f"(columns: {columns})")
            examples = [(str(row["screen_id"]).strip(), row["topic"]) for row in reader]
    except UnicodeDecodeError as error:
        raise ValueError(f"MultiBench {task} file {str(csv_path)!r} is not a UTF-8 CSV ({error})") from error
    for line, (screen, topic) in enumerate(examples, start=2):
        if not screen or topic is None or not topic.strip():
            raise _bad(task, csv_path, "screen_id" if not screen else "topic", f"is empty on line {line}")
    examples = [(screen, topic.strip()) for screen, topic in examples if screen not in ENRICO_IGNORED]
    if len(examples) < 3:
        raise ValueError(f"MultiBench {task} file {str(csv_path)!r} lists {len(examples)} usable screens; "
                         "at least 3 are needed for train/val/test")
    topics = sorted({topic for _, topic in examples})
    index = {topic: i for i, topic in enumerate(topics)}
    Image = _pil()
    files = []
    for screen, _ in examples:
        pair = (root / "screenshots" / f"{screen}.jpg", root / "wireframes" / f"{screen}.png")
        for path in pair:
            _require_file(task, path, f" (screen {screen} of {str(csv_path)!r})")
            try:  # reads the header only; damage further in shows when the item is fetched
                with Image.open(path):
                    pass
            except Exception as error:
                raise ValueError(f"MultiBench {task} file {str(path)!r} is not a readable image "
                                 f"({type(error).__name__}: {error})") from error
        files.append(pair)
    targets = np.array([index[topic] for _, topic in examples], dtype=np.int64)
    n = len(examples)
    keys = list(range(n))
    random.Random(ENRICO_SPLIT_SEED).shuffle(keys)  # MultiBench's EnricoDataset split, screen for screen
    train_split, val_split = ENRICO_FRACTIONS
    cut1, cut2 = int(n * train_split), int(n * (train_split + val_split))
    rows = {"train": keys[:cut1], "val": keys[cut1:cut2], "test": keys[cut2:]}
    rows_per_patch, cols_per_patch = _patch_sides(patch)
    shape = (height // rows_per_patch, width // cols_per_patch, rows_per_patch * cols_per_patch * 3)
    modalities = {name: ModalitySpec(name, "image", shape) for name in ("enrico.screenshot", "enrico.wireframe")}
    reader = _EnricoReader(files, (height, width), patch)
    splits = {split: MultiBenchDataset(task, modalities, reader, rows[split],
                                       torch.from_numpy(targets[np.asarray(rows[split], dtype=np.int64)]), root)
              for split in SPLITS}
    if balanced_train:  # MultiBench's ENRICO train loader: a class-balanced WeightedRandomSampler
        splits["train"].sampling_weights = class_balanced_weights(splits["train"].targets)
    return _single(_classification(task, modalities, len(topics)), modalities, splits,
                   f"ENRICO design topics ({len(topics)}) from {str(root)!r}, images {height}x{width} "
                   f"in {rows_per_patch}x{cols_per_patch} patches")
