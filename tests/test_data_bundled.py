"""The bundled multi-modal multi-task benchmark (sm4.data.bundled): the shipped file, the loader,
its errors, and (when scikit-learn and mnist1d are installed) bit-identical regeneration."""

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from sm4.data import bundled
from sm4.data.bundled import (
    DEFAULT_PATH,
    SPLITS,
    ModalitySpec,
    TaskSpec,
    collate,
    load_bundled,
    make_bundled,
    task_loader,
)

EXPECTED_MODALITIES = {
    "image": ModalitySpec("image", "image", (8, 8, 1)),
    "series": ModalitySpec("series", "sequence", (40, 1)),
    "chem": ModalitySpec("chem", "tabular", (13, 1)),
    "clinical": ModalitySpec("clinical", "tabular", (10, 1)),
    "cytology": ModalitySpec("cytology", "sequence", (10, 3)),
}
EXPECTED_TASKS = {
    "digits": TaskSpec("digits", ("image", "series"), "classification", 10, "accuracy"),
    "mnist1d": TaskSpec("mnist1d", ("series",), "classification", 10, "accuracy"),
    "wine": TaskSpec("wine", ("chem",), "classification", 3, "accuracy"),
    "cancer": TaskSpec("cancer", ("cytology",), "classification", 2, "accuracy"),
    "diabetes": TaskSpec("diabetes", ("clinical",), "regression", 1, "mse"),
}
EXPECTED_SIZES = {"digits": 1797, "mnist1d": 2203, "wine": 178, "cancer": 569, "diabetes": 442}


@pytest.fixture(scope="module")
def data():
    return load_bundled()


def _arrays(path):
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _write_members(path, arrays):
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, value, allow_pickle=False)
            archive.writestr(f"{key}.npy", buffer.getvalue())


# ------------------------------------------------------------------------ the shipped file


def test_shipped_file_is_small():
    assert DEFAULT_PATH.is_file()
    assert DEFAULT_PATH.stat().st_size < 3 * 1024 * 1024


def test_specs_as_designed(data):
    assert data.modalities == EXPECTED_MODALITIES
    assert data.tasks == EXPECTED_TASKS
    assert set(data.splits) == set(EXPECTED_TASKS)
    assert all(set(splits) == set(SPLITS) for splits in data.splits.values())
    # the benchmark's requirements: >= 3 tasks, >= 4 modalities, a shared modality, both task kinds
    users = {m: [t for t, spec in data.tasks.items() if m in spec.modalities] for m in data.modalities}
    assert users["series"] == ["digits", "mnist1d"]
    assert all(users.values()), users
    assert {t.kind for t in data.tasks.values()} == {"classification", "regression"}
    assert "digits" in data.description and "MNIST-1D" in data.description


def test_split_sizes_are_70_15_15_and_uneven_across_tasks(data):
    for task, total in EXPECTED_SIZES.items():
        sizes = {split: len(data.splits[task][split]) for split in SPLITS}
        assert sum(sizes.values()) == total, task
        assert sizes["val"] == sizes["test"] == round(0.15 * total), (task, sizes)
    assert len(set(EXPECTED_SIZES.values())) == len(EXPECTED_SIZES)


def test_shapes_and_dtypes_match_specs(data):
    for task, spec in data.tasks.items():
        for split in SPLITS:
            dataset = data.splits[task][split]
            assert set(dataset.inputs) == set(spec.modalities)
            for name, x in dataset.inputs.items():
                assert x.dtype == torch.float32 and x.shape == (len(dataset), *data.modalities[name].shape)
                assert torch.isfinite(x).all()
            inputs, target = dataset[0]
            assert {k: v.shape for k, v in inputs.items()} == {m: data.modalities[m].shape for m in spec.modalities}
            if spec.kind == "classification":
                assert target.dtype == torch.int64 and target.shape == ()
            else:
                assert target.dtype == torch.float32 and target.shape == (spec.num_outputs,)


def test_splits_do_not_overlap(data):
    for task, spec in data.tasks.items():
        for name in spec.modalities:
            rows = [data.splits[task][split].source_index[name].numpy() for split in SPLITS]
            flat = np.concatenate(rows)
            assert len(np.unique(flat)) == len(flat) == EXPECTED_SIZES[task], (task, name)
    # the two tasks sharing `series` draw disjoint MNIST-1D samples
    digits = np.concatenate([data.splits["digits"][s].source_index["series"].numpy() for s in SPLITS])
    mnist1d = np.concatenate([data.splits["mnist1d"][s].source_index["series"].numpy() for s in SPLITS])
    assert not set(digits) & set(mnist1d)
    assert len(digits) + len(mnist1d) == bundled.MNIST1D_POOL


def test_labels_in_range_and_stratified(data):
    for task, spec in data.tasks.items():
        if spec.kind != "classification":
            continue
        every = torch.cat([data.splits[task][s].targets for s in SPLITS])
        assert every.min() >= 0 and every.max() < spec.num_outputs
        overall = torch.bincount(every, minlength=spec.num_outputs).double() / len(every)
        for split in SPLITS:
            y = data.splits[task][split].targets
            counts = torch.bincount(y, minlength=spec.num_outputs).double()
            assert (counts > 0).all(), (task, split)
            # each class within 2 samples of its overall share
            assert ((counts - overall * len(y)).abs() <= 2).all(), (task, split, counts, overall * len(y))


def test_digits_pairs_image_and_series_of_the_same_class(data):
    # pairing is by label (checked exactly in the regeneration test), so the series carry the class:
    # their class means differ
    train = data.splits["digits"]["train"]
    series, y = train.inputs["series"][..., 0], train.targets
    means = torch.stack([series[y == c].mean(0) for c in range(10)])
    assert torch.cdist(means, means).add(torch.eye(10) * 1e9).min() > 0.1
    image = train.inputs["image"]
    assert image.min() >= 0 and image.max() <= 1


def test_standardisation(data):
    target = data.splits["diabetes"]["train"].targets
    assert abs(target.mean().item()) < 1e-5 and abs(target.std(unbiased=False).item() - 1) < 1e-5
    for split in ("val", "test"):
        held_out = data.splits["diabetes"][split].targets
        assert abs(held_out.mean().item()) < 0.5 and 0.6 < held_out.std().item() < 1.5
    for task, name in (("wine", "chem"), ("diabetes", "clinical"), ("cancer", "cytology")):
        x = data.splits[task]["train"].inputs[name].double()
        torch.testing.assert_close(x.mean(0), torch.zeros_like(x[0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.std(0, unbiased=False), torch.ones_like(x[0]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- loader


@pytest.mark.parametrize("task", sorted(EXPECTED_TASKS))
def test_task_loader_batches(data, task):
    spec = data.tasks[task]
    loader = task_loader(data, task, "train", batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    inputs, target = next(iter(loader))
    assert set(inputs) == set(spec.modalities)
    for name, x in inputs.items():
        assert x.dtype == torch.float32 and x.shape == (32, *data.modalities[name].shape)
    if spec.kind == "classification":
        assert target.dtype == torch.int64 and target.shape == (32,)
    else:
        assert target.dtype == torch.float32 and target.shape == (32, spec.num_outputs)


def test_task_loader_shuffle_seeded_and_drop_last(data):
    def first(seed):
        loader = task_loader(data, "wine", "train", 16, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))[1]

    assert torch.equal(first(1), first(1))
    n = len(data.splits["wine"]["test"])
    assert len(task_loader(data, "wine", "test", 10)) == -(-n // 10)
    assert len(task_loader(data, "wine", "test", 10, drop_last=True)) == n // 10
    batches = list(task_loader(data, "wine", "test", 10))
    assert torch.equal(torch.cat([b[1] for b in batches]), data.splits["wine"]["test"].targets)
    with pytest.raises(KeyError, match="unknown task"):
        task_loader(data, "nope", "train", 4)
    with pytest.raises(KeyError, match="unknown split"):
        task_loader(data, "wine", "training", 4)
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_loader_does_not_need_the_generator_packages():
    code = (
        "import sys; sys.modules['sklearn'] = None; sys.modules['mnist1d'] = None; sys.modules['scipy'] = None\n"
        "from sm4.data import load_bundled, task_loader\n"
        "d = load_bundled(); next(iter(task_loader(d, 'digits', 'test', 8)))\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_bundled(path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.0])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "truncated.npz"
    blob = DEFAULT_PATH.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(ValueError, match=r"truncated\.npz.*corrupt or truncated"):
        load_bundled(path)


def test_corrupt_member(tmp_path):
    # flip bytes inside a deflated member: the zip's CRC (or zlib) catches it
    path = tmp_path / "corrupt.npz"
    shutil.copy(DEFAULT_PATH, path)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("digits/train/image.npy")
    blob = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    blob[start:start + 64] = bytes(b ^ 0xFF for b in blob[start:start + 64])
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"corrupt\.npz.*corrupt or truncated"):
        load_bundled(path)


@pytest.mark.parametrize("field", ["digits/test/series", "diabetes/val/target", "wine/train/source/chem", "__meta__"])
def test_missing_field(tmp_path, field):
    arrays = _arrays(DEFAULT_PATH)
    del arrays[field]
    path = tmp_path / "incomplete.npz"
    _write_members(path, arrays)
    with pytest.raises(ValueError, match=rf"incomplete\.npz.*missing field '{field}'"):
        load_bundled(path)


def test_bad_fields(tmp_path):
    arrays = _arrays(DEFAULT_PATH)
    path = tmp_path / "bad.npz"
    broken = dict(arrays)
    broken["wine/test/target"] = broken["wine/test/target"] + 5
    _write_members(path, broken)
    with pytest.raises(ValueError, match=r"bad\.npz.*'wine/test/target'.*outside"):
        load_bundled(path)
    broken = dict(arrays)
    broken["digits/val/image"] = broken["digits/val/image"][:, :4]
    _write_members(path, broken)
    with pytest.raises(ValueError, match=r"bad\.npz.*'digits/val/image'.*float32"):
        load_bundled(path)
    meta = json.loads(str(arrays["__meta__"]))
    del meta["tasks"]
    _write_members(path, {**arrays, "__meta__": np.array(json.dumps(meta))})
    with pytest.raises(ValueError, match=r"bad\.npz.*missing field __meta__\.tasks"):
        load_bundled(path)


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.npz"
    path.write_bytes(b"old")
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    real = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        bundled._write_npz(path, {"a": np.zeros(3), "b": np.ones(3)})
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]


# ------------------------------------------------------------------------------ regeneration


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bundled.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_regeneration_is_bit_identical(tmp_path):
    missing = [p for p in ("sklearn", "mnist1d") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the generator needs {' '.join(bundled.GENERATOR_REQUIREMENTS)}; missing: {missing}")
    path = tmp_path / "regenerated.npz"
    make_bundled(path, seed=0)
    shipped, fresh = _arrays(DEFAULT_PATH), _arrays(path)
    assert sorted(shipped) == sorted(fresh)
    meta_shipped = json.loads(str(shipped.pop("__meta__")))
    meta_fresh = json.loads(str(fresh.pop("__meta__")))
    versions_shipped, versions_fresh = meta_shipped.pop("generated_with"), meta_fresh.pop("generated_with")
    assert meta_shipped == meta_fresh
    for key, value in shipped.items():
        assert value.dtype == fresh[key].dtype and value.shape == fresh[key].shape, key
        assert value.tobytes() == fresh[key].tobytes(), f"{key} differs from the shipped file"
    if versions_shipped == versions_fresh:  # same packages: the very same bytes (fixed zip timestamps)
        assert path.read_bytes() == DEFAULT_PATH.read_bytes()
    # each digits image is paired with an MNIST-1D series of its own class
    _, series_labels = bundled._mnist1d_pool(0)
    for split in SPLITS:
        rows = shipped[f"digits/{split}/source/series"]
        assert np.array_equal(series_labels[rows], shipped[f"digits/{split}/target"])
        rows = shipped[f"mnist1d/{split}/source/series"]
        assert np.array_equal(series_labels[rows], shipped[f"mnist1d/{split}/target"])
    # another seed gives other data
    other = tmp_path / "seed1.npz"
    make_bundled(other, seed=1)
    assert _arrays(other)["digits/train/series"].tobytes() != shipped["digits/train/series"].tobytes()
