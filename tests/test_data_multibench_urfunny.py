"""The MultiBench UR-FUNNY loader (sm4.data.multibench.urfunny) on fixture files in the published format."""

import pickle

import numpy as np
import pytest

from sm4.data.bundled import SPLITS, ModalitySpec
from sm4.data.multibench import SHARED_TEXT, load_urfunny

from .multibench_fixtures import check_items, root  # noqa: F401 (fixtures by name)


def test_urfunny(root):
    data = load_urfunny(root / "urfunny", seq_len=20)
    assert data.modalities == {"urfunny.vision": ModalitySpec("urfunny.vision", "sequence", (20, 371)),
                               "urfunny.audio": ModalitySpec("urfunny.audio", "sequence", (20, 81)),
                               SHARED_TEXT: ModalitySpec(SHARED_TEXT, "sequence", (20, 300))}
    splits = data.splits["urfunny"]
    # every sample, as HighMMT's humorloader feeds them (sample 1 has no text: MultiBench would drop it)
    assert {s: len(splits[s]) for s in SPLITS} == {"train": 7, "val": 4, "test": 4}
    dropped = load_urfunny(root / "urfunny", drop_empty_text=True).splits["urfunny"]
    assert {s: len(dropped[s]) for s in SPLITS} == {"train": 6, "val": 3, "test": 3} and 1 not in dropped["train"].rows
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


def test_urfunny_znorm_scores_the_whole_sequence_then_cuts(root):
    """MultiBench's / HighMMT's Affectdataset z-scores the whole (aligned) sequence, then pads or
    cuts it: the first 20 steps of the 50-step z-score, not a z-score of 20 steps."""
    with open(root / "urfunny" / "humor.pkl", "rb") as handle:
        vision = pickle.load(handle)["train"]["vision"][0].astype(np.float64)  # sample 0: all 50 steps
    data = load_urfunny(root / "urfunny", znorm=True, align=True)
    inputs, _ = data.splits["urfunny"]["train"][0]
    expected = (vision - vision.mean(axis=0)) / vision.std(axis=0, ddof=1)  # torch.std: unbiased
    np.testing.assert_allclose(inputs["urfunny.vision"].numpy(), expected[:20], rtol=1e-4, atol=1e-5)
