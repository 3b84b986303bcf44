"""The MultiBench loaders together (sm4.data.multibench): several tasks in one MultiTaskData, an
SM4Model forward per task, and the errors for missing, damaged and inconsistent files; each loader's own tests are in
test_data_multibench_<loader>.py."""

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from sm4.data.bundled import SPLITS, task_loader
from sm4.data.multibench import (SHARED_TEXT, MultiBenchDataset, combine, load_avmnist, load_enrico, load_mimic,
                                 load_mosei, load_multibench, load_push, load_urfunny, load_vt)

from .multibench_fixtures import (HAVE_H5PY, copy_task, data, needs_h5py, root, snapshot, write_affect, write_mimic,
                                  write_push_file, write_vt_episode)  # noqa: F401 (fixtures by name)


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


@needs_h5py
def test_load_multibench_tokenises_as_the_setting_needs(root):
    """The small setting's PUSH is pixel tokens on 3 axes (Table 13), the medium one 16 channels on
    2 (Table 14); explicit options win over the setting's."""
    kind = lambda **kw: load_multibench(root, tasks=["push"], **kw).modalities["push.image"].kind  # noqa: E731
    assert kind(setting="small") == "video"
    assert kind(setting="medium") == kind() == kind(setting="small", options={"push": {"image_layout": "frames"}}) == "image"


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
