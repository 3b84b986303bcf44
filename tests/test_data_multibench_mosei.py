"""The MultiBench CMU-MOSEI loader (sm4.data.multibench.mosei) on fixture files in the published format."""

import pickle

import numpy as np

from sm4.data.bundled import SPLITS, ModalitySpec
from sm4.data.multibench import SHARED_TEXT, load_mosei

from .multibench_fixtures import check_items, root  # noqa: F401 (fixtures by name)


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


def test_mosei_drops_the_samples_multibench_drops(tmp_path):
    """MultiBench's drop_entry drops a sample whose text sums to zero (``k.sum() == 0``): no text,
    or values that cancel."""
    from .multibench_fixtures import write_affect

    path = tmp_path / "mosei_senti_data.pkl"
    raw = write_affect(path, (35, 74, 300))
    raw["train"]["text"][3] = 0.0
    raw["train"]["text"][3, -1, :2] = (0.5, -0.5)
    path.write_bytes(pickle.dumps(raw, protocol=4))
    rows = load_mosei(path).splits["mosei"]["train"].rows
    assert 1 not in rows and 3 not in rows and len(rows) == 5
