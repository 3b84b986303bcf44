"""The bundled multi-modal multi-task benchmark: small, real, and needing no download at run time.

What it is
----------
A MultiBench-style benchmark (several tasks, each with one to three modalities, some modalities
shared between tasks) built only from data that installs with pip packages: scikit-learn's bundled
datasets and the procedurally generated MNIST-1D time series. The generated arrays ship with sm4
as ``sm4/data/bundled_benchmark.npz``; :func:`load_bundled` reads them with numpy and torch only.
:func:`make_bundled` (or ``python -m sm4.data.bundled --out PATH``) regenerates the file and is the
only part that needs ``scikit-learn`` and ``mnist1d`` (see :data:`GENERATOR_REQUIREMENTS`).

Modalities (per-sample shape, the last dim is the feature width):

==========  ==========  ===========  ==========================================================
name        kind        shape        content
==========  ==========  ===========  ==========================================================
image       image       (8, 8, 1)    scikit-learn ``load_digits`` 8x8 digit, /16 to [0, 1], then
                                     i.i.d. Gaussian pixel noise (std :data:`IMAGE_NOISE_STD`)
                                     clipped back to [0, 1] (AV-MNIST degrades its images too)
series      sequence    (40, 1)      MNIST-1D digit time series (40 steps, ``mnist1d``'s own
                                     global standardisation)
chem        tabular     (13, 1)      wine: 13 chemical measurements, standardised
clinical    tabular     (10, 1)      diabetes: age, sex, bmi, bp and six serum measurements
cytology    sequence    (10, 3)      breast cancer: 10 cell-nucleus properties (radius, texture,
                                     ...) x 3 statistics (mean, standard error, worst), each
                                     of the 30 columns standardised
==========  ==========  ===========  ==========================================================

Tasks (all splits stratified 70/15/15; standardisation statistics come from the train split only):

========  ================  ==============  =====  ==========================================
task      modalities        kind            size   note
========  ================  ==============  =====  ==========================================
digits    image, series     10 classes      1797   AV-MNIST analogue: each image is paired with
                                                   an MNIST-1D series of the same digit class
mnist1d   series            10 classes      2203   the MNIST-1D series not used by ``digits``
wine      chem              3 classes        178
cancer    cytology          2 classes        569   benign / malignant
diabetes  clinical          regression (1)   442   disease progression, standardised target, MSE
========  ================  ==============  =====  ==========================================

``series`` is shared by ``digits`` and ``mnist1d`` (the two tasks draw disjoint series); feature
widths differ (1 and 3), kinds cover image / sequence / tabular, and task sizes span 178 to 2203.

File format
-----------
A ``.npz`` (a deflated zip of ``.npy`` members with fixed timestamps and sorted member order, so
the same arrays give the same bytes) with:

* ``__meta__``: a 0-d unicode array holding JSON (format version, modality and task specs,
  description, seed, sources, normalisation statistics, generator package versions);
* for every task ``t``, split ``s`` and modality ``m`` of ``t``: ``t/s/m`` (float32, ``(n, *shape)``),
  ``t/s/target`` (int64 ``(n,)`` or float32 ``(n, num_outputs)``) and ``t/s/source/m`` (int64
  ``(n,)``: the row of each sample in its source dataset, for provenance and overlap checks).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DEFAULT_PATH",
    "FORMAT_VERSION",
    "GENERATOR_REQUIREMENTS",
    "SPLITS",
    "BundledDataset",
    "ModalitySpec",
    "MultiTaskData",
    "TaskSpec",
    "collate",
    "load_bundled",
    "make_bundled",
    "task_loader",
]

FORMAT_VERSION = 1
DEFAULT_PATH = Path(__file__).with_name("bundled_benchmark.npz")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}  # train gets the rest (0.70)
# Only make_bundled needs these (the versions the shipped file was generated and checked with).
GENERATOR_REQUIREMENTS = ("scikit-learn==1.9.1", "mnist1d==0.0.2.post1")

IMAGE_NOISE_STD = 0.5  # on the [0, 1] pixel scale; 0 gives the clean digits
MNIST1D_POOL = 4000  # series generated: 400 per class, ~180 per class paired with digits, rest -> mnist1d
REGRESSION_STRATA = 5  # quantile bins of the target used to stratify regression splits
_META_KEY = "__meta__"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

_KINDS = {"sequence": 2, "image": 3, "tabular": 2}  # kind -> per-sample ndim


@dataclass(frozen=True)
class ModalitySpec:
    """One modality. ``kind`` is ``"sequence"`` (shape ``(L, F)``), ``"image"`` (``(H, W, F)``) or
    ``"tabular"`` (``(F, 1)``: one token per feature); the MultiBench loaders also give
    ``"video"`` (``(T, H, W, F)``: PUSH's pixel tokens). The last dim of ``shape`` is the feature
    width."""

    name: str
    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TaskSpec:
    """One task: its modalities, ``kind`` (``"classification"`` or ``"regression"``), the number of
    classes or regression targets, and its metric (``"accuracy"``, higher is better, or ``"mse"``,
    lower is better)."""

    name: str
    modalities: tuple[str, ...]
    kind: str
    num_outputs: int
    metric: str
    train_weight: float = 1.0
    eval_weight: float = 1.0


@dataclass
class MultiTaskData:
    modalities: dict[str, ModalitySpec]
    tasks: dict[str, TaskSpec]
    splits: dict[str, dict[str, Dataset]]  # task -> "train" / "val" / "test" -> dataset
    description: str


class BundledDataset(Dataset):
    """The samples of one task and split, held as tensors.

    ``dataset[i]`` is ``(inputs, target)``: ``inputs[m]`` a float32 tensor of modality ``m``'s
    shape, ``target`` an int64 scalar (classification) or a float32 ``(num_outputs,)`` tensor
    (regression). ``source_index[m]`` gives each sample's row in modality ``m``'s source dataset.
    """

    def __init__(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                 source_index: dict[str, torch.Tensor] | None = None):
        lengths = {len(t) for t in inputs.values()} | {len(targets)}
        if len(lengths) != 1:
            raise ValueError(f"inputs and targets have different lengths: {sorted(lengths)}")
        self.inputs = inputs
        self.targets = targets
        self.source_index = source_index or {}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        return {name: x[index] for name, x in self.inputs.items()}, self.targets[index]


def collate(batch):
    """Stack ``(inputs, target)`` items into ``({m: (B, *shape)}, target (B,) or (B, num_outputs))``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    names = batch[0][0].keys()
    inputs = {name: torch.stack([item[0][name] for item in batch]) for name in names}
    return inputs, torch.stack([item[1] for item in batch])


def task_loader(data: MultiTaskData, task: str, split: str, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                own_sampler: bool = False) -> DataLoader:
    """A DataLoader over one task's split whose batches are ``(dict of (B, *shape) float32,
    target (B,) int64 or (B, num_outputs) float32)``.

    own_sampler: with ``shuffle``, a split that names its own sampler (``split.sampler(generator)``
    not None, e.g. MultiBench ENRICO's class-balanced WeightedRandomSampler) is drawn with it, from
    ``generator``, instead of a uniform shuffle; other splits shuffle as usual."""
    if task not in data.splits:
        raise KeyError(f"unknown task {task!r}; tasks are {sorted(data.splits)}")
    if split not in data.splits[task]:
        raise KeyError(f"unknown split {split!r} of task {task!r}; splits are {sorted(data.splits[task])}")
    dataset = data.splits[task][split]
    sampler = dataset.sampler(generator) if shuffle and own_sampler and callable(getattr(dataset, "sampler", None)) else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator, drop_last=drop_last, collate_fn=collate)


# ----------------------------------------------------------------------------------- loading


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every member of the file, read eagerly (so that a damaged member fails here, clearly)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled benchmark file {str(path)!r} not found; regenerate it with "
            f"`python -m sm4.data.bundled --out {path}` (needs {' '.join(GENERATOR_REQUIREMENTS)})"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as error:  # BadZipFile, EOFError, ValueError (bad .npy header), zlib.error, ...
        raise ValueError(
            f"bundled benchmark file {str(path)!r} is corrupt or truncated "
            f"({type(error).__name__}: {error}); regenerate it with `python -m sm4.data.bundled --out {path}`"
        ) from error


def _field(arrays: dict[str, np.ndarray], path: Path, key: str) -> np.ndarray:
    if key not in arrays:
        raise ValueError(f"bundled benchmark file {str(path)!r} is missing field {key!r}")
    return arrays[key]


def _bad(path: Path, key: str, what: str) -> ValueError:
    return ValueError(f"bundled benchmark file {str(path)!r}: field {key!r} {what}")


def _parse_meta(arrays: dict[str, np.ndarray], path: Path) -> dict:
    raw = _field(arrays, path, _META_KEY)
    if raw.shape != () or raw.dtype.kind != "U":
        raise _bad(path, _META_KEY, f"must be a 0-d unicode array, got {raw.dtype} {raw.shape}")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as error:
        raise _bad(path, _META_KEY, f"is not valid JSON ({error})") from error
    for name in ("format_version", "modalities", "tasks", "description"):
        if name not in meta:
            raise ValueError(f"bundled benchmark file {str(path)!r} is missing field {_META_KEY}.{name}")
    if meta["format_version"] != FORMAT_VERSION:
        raise _bad(path, f"{_META_KEY}.format_version",
                   f"is {meta['format_version']!r}, this sm4 reads version {FORMAT_VERSION}")
    return meta


def _specs(meta: dict, path: Path) -> tuple[dict[str, ModalitySpec], dict[str, TaskSpec]]:
    try:
        modalities = {m["name"]: ModalitySpec(m["name"], m["kind"], tuple(int(s) for s in m["shape"]))
                      for m in meta["modalities"]}
        tasks = {t["name"]: TaskSpec(t["name"], tuple(t["modalities"]), t["kind"], int(t["num_outputs"]),
                                     t["metric"], float(t["train_weight"]), float(t["eval_weight"]))
                 for t in meta["tasks"]}
    except (KeyError, TypeError, ValueError) as error:
        what = f"has a malformed modality or task spec ({type(error).__name__}: {error})"
        raise _bad(path, _META_KEY, what) from error
    for spec in modalities.values():
        if spec.kind not in _KINDS or len(spec.shape) != _KINDS[spec.kind] or min(spec.shape) < 1:
            raise _bad(path, f"{_META_KEY}.modalities.{spec.name}",
                       f"has an invalid kind/shape {spec.kind} {spec.shape}")
    for task in tasks.values():
        unknown = [m for m in task.modalities if m not in modalities]
        if unknown or not task.modalities:
            raise _bad(path, f"{_META_KEY}.tasks.{task.name}", f"names unknown modalities {unknown}")
        valid = (task.kind, task.metric) in (("classification", "accuracy"), ("regression", "mse"))
        if not valid or task.num_outputs < 1:
            raise _bad(path, f"{_META_KEY}.tasks.{task.name}", f"has an invalid kind/metric/num_outputs "
                       f"{task.kind}/{task.metric}/{task.num_outputs}")
    return modalities, tasks


def _split_dataset(arrays, path, modalities, task: TaskSpec, split: str) -> BundledDataset:
    prefix = f"{task.name}/{split}"
    key = f"{prefix}/target"
    target = _field(arrays, path, key)
    if task.kind == "classification":
        if target.dtype != np.int64 or target.ndim != 1:
            raise _bad(path, key, f"must be int64 (n,), got {target.dtype} {target.shape}")
        if target.size and (target.min() < 0 or target.max() >= task.num_outputs):
            raise _bad(path, key, f"has labels outside [0, {task.num_outputs})")
    elif target.dtype != np.float32 or target.shape[1:] != (task.num_outputs,):
        raise _bad(path, key, f"must be float32 (n, {task.num_outputs}), got {target.dtype} {target.shape}")
    n = len(target)
    inputs, sources = {}, {}
    for name in task.modalities:
        key = f"{prefix}/{name}"
        x = _field(arrays, path, key)
        expected = (n, *modalities[name].shape)
        if x.dtype != np.float32 or x.shape != expected:
            raise _bad(path, key, f"must be float32 {expected}, got {x.dtype} {x.shape}")
        if not np.isfinite(x).all():
            raise _bad(path, key, "has non-finite values")
        key = f"{prefix}/source/{name}"
        src = _field(arrays, path, key)
        if src.dtype != np.int64 or src.shape != (n,):
            raise _bad(path, key, f"must be int64 ({n},), got {src.dtype} {src.shape}")
        inputs[name] = torch.from_numpy(np.ascontiguousarray(x))
        sources[name] = torch.from_numpy(np.ascontiguousarray(src))
    return BundledDataset(inputs, torch.from_numpy(np.ascontiguousarray(target)), sources)


def load_bundled(path: str | os.PathLike | None = None) -> MultiTaskData:
    """Read the bundled benchmark (default: the file shipped with sm4, :data:`DEFAULT_PATH`).

    Needs numpy and torch only. Raises FileNotFoundError for a missing file and ValueError, naming
    the file and the field, for a corrupt, truncated or incomplete one."""
    path = Path(DEFAULT_PATH if path is None else path)
    arrays = _read_npz(path)
    meta = _parse_meta(arrays, path)
    modalities, tasks = _specs(meta, path)
    splits = {name: {split: _split_dataset(arrays, path, modalities, task, split) for split in SPLITS}
              for name, task in tasks.items()}
    return MultiTaskData(modalities=modalities, tasks=tasks, splits=splits, description=meta["description"])


# -------------------------------------------------------------------------------- generation


def _stratified_split(strata: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Indices of a 70/15/15 split with every stratum in every split in (almost exactly) its
    overall proportion: each sample gets the key ``(rank within its stratum + u) / stratum size``
    with ``u ~ U[0, 1)`` and a random rank, and the samples are cut by sorted key. Every index
    array is sorted."""
    n = len(strata)
    key = np.empty(n)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        ranks = rng.permutation(len(members))
        key[members] = (ranks + rng.random(len(members))) / len(members)
    order = np.argsort(key, kind="stable")
    n_test, n_val = (round(SPLIT_FRACTIONS[s] * n) for s in ("test", "val"))
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


def _standardise(x: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardise the columns of ``x`` (float64) with the mean and std of the rows ``train``."""
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x - mean) / std, mean, std


def _mnist1d_pool(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``MNIST1D_POOL`` MNIST-1D series (float64 (n, 40)) and labels, generated locally. mnist1d
    seeds numpy's and Python's global generators; their states are restored afterwards."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = MNIST1D_POOL
    args.train_split = 1.0  # keep every sample in "x"; the splits are made here
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"], dtype=np.int64)


def _generator_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("scikit-learn", "mnist1d", "numpy", "scipy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:  # pragma: no cover
            out[package] = "unknown"
    return out


def _description(meta: dict) -> str:
    lines = [
        (
            f"sm4 bundled multi-modal multi-task benchmark (format version {FORMAT_VERSION}, seed "
            f"{meta['seed']}): a small MultiBench-style benchmark built from scikit-learn's bundled "
            "datasets and locally generated MNIST-1D series; no download needed."
        ),
        "Modalities:",
    ]
    for m in meta["modalities"]:
        lines.append(f"  {m['name']:<9} {m['kind']:<8} {tuple(m['shape'])!s:<10} {m['source']}")
    lines.append("Tasks (train/val/test sizes):")
    for t in meta["tasks"]:
        sizes = "/".join(str(meta["sizes"][t["name"]][s]) for s in SPLITS)
        lines.append(f"  {t['name']:<9} {'+'.join(t['modalities']):<14} {t['kind']} "
                     f"({t['num_outputs']} {'classes' if t['kind'] == 'classification' else 'target'}, "
                     f"{t['metric']}) {sizes}: {t['source']}")
    lines.append("Splits are stratified 70/15/15 (regression: by target quintile); standardisation "
                 "statistics come from the train split only.")
    return "\n".join(lines)


def _build(seed: int) -> tuple[dict[str, np.ndarray], dict]:
    try:
        from sklearn.datasets import (
            load_breast_cancer,
            load_diabetes,
            load_digits,
            load_wine,
        )
    except ImportError as error:
        raise ImportError(
            f"make_bundled needs scikit-learn and mnist1d: pip install {' '.join(GENERATOR_REQUIREMENTS)}"
        ) from error
    try:
        import mnist1d  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"make_bundled needs scikit-learn and mnist1d: pip install {' '.join(GENERATOR_REQUIREMENTS)}"
        ) from error

    def rng(stream: int) -> np.random.Generator:  # an independent generator per purpose
        return np.random.default_rng([seed, stream])

    arrays: dict[str, np.ndarray] = {}
    sizes: dict[str, dict[str, int]] = {}
    normalisation: dict[str, dict] = {}

    def put(task: str, parts: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
            sources: dict[str, np.ndarray], target: np.ndarray) -> None:
        sizes[task] = {}
        for split in SPLITS:
            rows = parts[split]
            sizes[task][split] = len(rows)
            for name, x in inputs.items():
                arrays[f"{task}/{split}/{name}"] = np.ascontiguousarray(x[rows], dtype=np.float32)
                arrays[f"{task}/{split}/source/{name}"] = np.ascontiguousarray(sources[name][rows], dtype=np.int64)
            arrays[f"{task}/{split}/target"] = np.ascontiguousarray(target[rows])

    # digits (image + series) and mnist1d (series): AV-MNIST-style pairing by class.
    digits = load_digits()
    image_y = digits.target.astype(np.int64)
    image = digits.images.astype(np.float64) / 16.0
    if IMAGE_NOISE_STD > 0:
        image = np.clip(image + IMAGE_NOISE_STD * rng(1).standard_normal(image.shape), 0.0, 1.0)
    series, series_y = _mnist1d_pool(seed)
    pair = np.empty(len(image_y), dtype=np.int64)
    pairing_rng = rng(2)
    used = np.zeros(len(series_y), dtype=bool)
    for label in range(10):
        rows = np.flatnonzero(image_y == label)
        pool = pairing_rng.permutation(np.flatnonzero(series_y == label))
        if len(pool) < len(rows):  # pragma: no cover - MNIST1D_POOL is large enough
            raise RuntimeError(f"MNIST-1D pool has {len(pool)} series of class {label}, digits needs {len(rows)}")
        pair[rows] = pool[:len(rows)]
        used[pool[:len(rows)]] = True
    parts = _stratified_split(image_y, rng(3))
    put("digits", parts, {"image": image[..., None], "series": series[pair][..., None]},
        {"image": np.arange(len(image_y)), "series": pair}, image_y)
    rest = np.flatnonzero(~used)
    parts = _stratified_split(series_y[rest], rng(4))
    put("mnist1d", parts, {"series": series[rest][..., None]}, {"series": rest}, series_y[rest])

    # wine (chem): 3 classes.
    wine = load_wine()
    y = wine.target.astype(np.int64)
    parts = _stratified_split(y, rng(5))
    chem, _, _ = _standardise(wine.data.astype(np.float64), parts["train"])
    put("wine", parts, {"chem": chem[..., None]}, {"chem": np.arange(len(y))}, y)

    # cancer (cytology): 2 classes; the 30 columns are 3 statistics x 10 properties.
    cancer = load_breast_cancer()
    y = cancer.target.astype(np.int64)
    parts = _stratified_split(y, rng(6))
    cells, _, _ = _standardise(cancer.data.astype(np.float64), parts["train"])
    cells = cells.reshape(len(y), 3, 10).transpose(0, 2, 1)  # (n, property, statistic)
    put("cancer", parts, {"cytology": cells}, {"cytology": np.arange(len(y))}, y)

    # diabetes (clinical): regression, standardised target, stratified by target quintile.
    diabetes = load_diabetes(scaled=False)
    target = diabetes.target.astype(np.float64)
    strata = np.searchsorted(np.quantile(target, np.linspace(0, 1, REGRESSION_STRATA + 1)[1:-1]), target, side="right")
    parts = _stratified_split(strata, rng(7))
    clinical, _, _ = _standardise(diabetes.data.astype(np.float64), parts["train"])
    target_std, t_mean, t_std = _standardise(target[:, None], parts["train"])
    normalisation["diabetes"] = {"target_mean": float(t_mean[0]), "target_std": float(t_std[0])}
    put("diabetes", parts, {"clinical": clinical[..., None]}, {"clinical": np.arange(len(target))},
        target_std.astype(np.float32))

    modalities = [
        {"name": "image", "kind": "image", "shape": [8, 8, 1],
         "source": f"sklearn load_digits /16, + N(0, {IMAGE_NOISE_STD}^2) pixel noise, clipped to [0, 1]"},
        {"name": "series", "kind": "sequence", "shape": [40, 1], "source": f"mnist1d make_dataset (seed {seed})"},
        {"name": "chem", "kind": "tabular", "shape": [13, 1], "source": "sklearn load_wine, standardised"},
        {"name": "clinical", "kind": "tabular", "shape": [10, 1], "source": "sklearn load_diabetes, standardised"},
        {"name": "cytology", "kind": "sequence", "shape": [10, 3],
         "source": "sklearn load_breast_cancer, standardised, (property, mean/se/worst)"},
    ]

    def task(name, mods, kind, outputs, source):
        spec = TaskSpec(name, tuple(mods), kind, outputs, "accuracy" if kind == "classification" else "mse")
        return {**asdict(spec), "modalities": list(mods), "source": source}

    tasks = [
        task("digits", ["image", "series"], "classification", 10,
             "AV-MNIST analogue: digit image + MNIST-1D series of the same class"),
        task("mnist1d", ["series"], "classification", 10, "MNIST-1D series not used by digits"),
        task("wine", ["chem"], "classification", 3, "wine cultivar"),
        task("cancer", ["cytology"], "classification", 2, "breast tumour malignant (0) / benign (1)"),
        task("diabetes", ["clinical"], "regression", 1,
             "disease progression after one year, standardised (train mean/std in normalisation)"),
    ]
    meta = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "modalities": modalities,
        "tasks": tasks,
        "sizes": sizes,
        "split_fractions": {"train": 0.70, **SPLIT_FRACTIONS},
        "normalisation": normalisation,
        "image_noise_std": IMAGE_NOISE_STD,
        "mnist1d_pool": MNIST1D_POOL,
        "generated_with": _generator_versions(),
    }
    meta["description"] = _description(meta)
    return arrays, meta


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a deterministic .npz (sorted members, fixed timestamps) atomically: temp file + os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_DEFLATED) as archive:
            for key in sorted(arrays):
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asanyarray(arrays[key]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, buffer.getvalue(), compresslevel=9)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def make_bundled(path: str | os.PathLike, seed: int = 0) -> None:
    """Generate the benchmark into ``path`` (atomically). Needs scikit-learn and mnist1d
    (:data:`GENERATOR_REQUIREMENTS`); the same seed and package versions give the same file."""
    arrays, meta = _build(int(seed))
    arrays[_META_KEY] = np.array(json.dumps(meta, indent=1, sort_keys=True))
    _write_npz(Path(path), arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sm4.data.bundled",
        description="Regenerate the sm4 bundled multi-modal multi-task benchmark file "
                    f"(needs {' '.join(GENERATOR_REQUIREMENTS)}).",
    )
    parser.add_argument("--out", required=True, type=Path,
                        help=f"where to write the .npz (the shipped file is {DEFAULT_PATH})")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0, the shipped file's)")
    args = parser.parse_args(argv)
    make_bundled(args.out, seed=args.seed)
    data = load_bundled(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    print(data.description)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
