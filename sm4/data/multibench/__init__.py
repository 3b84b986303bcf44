"""Loaders for the real MultiBench data sets the SM4 / M³SAT papers train on (SM4_SPEC §4), one
module per loader (avmnist, enrico, push, vandt, urfunny, mosei, mimic; affect: the MOSEI /
UR-FUNNY reader; _common: shared helpers; _pickle: the restricted unpickler).

Each loader reads the files in the layout that MultiBench's own ``datasets/*/get_data.py`` (and
HighMMT's copies of them, which the papers' code builds on) read, and returns the same
:class:`~sm4.data.bundled.MultiTaskData` as :func:`~sm4.data.bundled.load_bundled`, so
:func:`~sm4.data.bundled.task_loader`, :func:`sm4.experiment.build_model` and the trainer work
unchanged. Every item is ``(inputs, target)``: ``inputs[m]`` a float32 tensor of modality ``m``'s
:class:`ModalitySpec` shape (``(L, F)`` sequences, ``(H, W, F)`` images, ``(F, 1)`` tabular),
``target`` an int64 scalar (classification) or a float32 ``(num_outputs,)`` tensor (regression).

    from sm4.data.multibench import load_multibench
    data = load_multibench("/data/multibench", tasks=["avmnist", "mosei"])

Directory layout under ``root`` (each task's folder can be moved with ``paths={task: PATH}``)::

    avmnist/  image/train_data.npy image/test_data.npy audio/train_data.npy audio/test_data.npy
              train_labels.npy test_labels.npy          (MultiBench's avmnist data_dir)
    enrico/   design_topics.csv screenshots/<id>.jpg wireframes/<id>.png   (ENRICO's own zips)
    push/     gentle_push_1000.hdf5 gentle_push_10.hdf5 gentle_push_300.hdf5  (fannypack
              TrajectoriesFiles; fannypack's cache names ``<drive id>-gentle_push_*.hdf5`` work too)
    vt/       *.h5, one robot episode each, or vt/triangle_real_data/*.h5   (MultiBench robotics)
    urfunny/  humor.pkl                                  (MultiBench's processed UR-FUNNY)
    mosei/    mosei_senti_data.pkl or mosei_raw.pkl      (MultiBench's processed CMU-MOSEI)
    mimic/    im.pk                                      (MultiBench's MIMIC-III pickle)

PUSH and V&T are HDF5 files and need ``h5py`` (imported only when those tasks load; ENRICO's
images need Pillow; pandas objects in a pickle need pandas: ``pip install 'sm4[multibench]'``).
The pickles are read by a restricted unpickler (``_pickle``) that builds numpy arrays, pandas data
objects (DataFrame, Series, Index, ..., pandas 1.x's module paths included, as pandas.read_pickle
reads them) and plain containers only, and refuses every other global (no code from the file
runs); ``allow_unsafe_pickle=True`` lifts that for a file you trust.

Tasks, modalities and the choices made (each configurable through the loader's keywords). Images
are cut into patches here, per modality (``patchify``), so keep the model's own ``patch_size`` at 1:
it would apply to every image modality alike.

avmnist (10 classes): ``avmnist.image`` image (7, 7, 16), ``avmnist.audio`` image (7, 7, 256).
    ``image/*_data.npy`` (n, 784) or (n, 28, 28) digits and ``audio/*_data.npy`` (n, 112, 112)
    spectrograms, both divided by 255 as MultiBench does; ``*_labels.npy`` (n,) digits 0-9. Each
    image is cut into ``image_patch`` (4) and ``audio_patch`` (16) pixel square patches whose pixels
    become the features: HighMMT's ``to4by4`` layout; patch 1 keeps (28, 28, 1) / (112, 112, 1).
    val = the last n // 12 train samples (MultiBench's 55000:60000); test = the test files.
enrico (20 classes, in sorted topic order): ``enrico.screenshot``, ``enrico.wireframe`` images
    (16, 16, 384). ``design_topics.csv`` (screen_id, topic), screenshots/<id>.jpg and
    wireframes/<id>.png as RGB, resized to ``image_size`` (256, 128) (MultiBench's), /255, cut into
    ``patch`` (16, 8) rectangles (M³SAT Table 14; ``patch=8``: sm4's earlier 8 x 8 squares, (32, 16, 192)). Screens 50105 and 50109 are dropped (broken wireframes; MultiBench too).
    Splits 65/15/20 from ``random.Random(42)``, screen for screen MultiBench's (whose test loaders
    read its train split by mistake; test here is the held-out 20 %). MultiBench samples ENRICO's
    train split class-balanced: the train split carries those weights (``sampling_weights``,
    ``sampler()``) and sm4's trainer draws it with them (``task_loader(own_sampler=True)``, seeded).
push (regression, 32 outputs, MSE): ``push.gripper_pos`` sequence (16, 3), ``push.gripper_sensors``
    (16, 7), ``push.control`` (16, 7), ``push.image`` image (32, 32, 16). Gentle Push (MuJoCo)
    trajectories ``trajectory<i>`` with ``eef_pos`` (T, 3), ``force`` (T, 6), ``contact`` (T,),
    ``image`` (T, 32, 32), ``Cylinder0_pos`` (T, >=2), cut into ``seq_len`` (16) step subsequences
    at offsets 0 and 8 (as MultiBench). sensors = force + contact; control = the previous eef
    position, its change and contact (as MultiBench). The 16 frames become the image's features
    (``image_layout="frames"``, Table 14's medium tokens); ``image_patch`` 1; ``"video"``: image
    (16, 32, 32, 1), one token per pixel of every frame on 3 axes (Table 13's small tokens). Target: the object's (x, y) at each step,
    flattened. All but the image is standardised with MultiBench's published per-feature
    constants (``normalization="train"``: the train file's mean / std); images are fed unscaled
    as MultiBench does (``rescale_images=True``: uint8 / 255).
    train/val/test = the 1000/10/300-trajectory files.
vt (2 classes): ``vt.image`` image (128, 128, 3), ``vt.depth`` image (128, 128, 1), ``vt.force``
    sequence (6, 32), ``vt.proprio`` sequence (1, 8), ``vt.action`` (1, 4) (``layout="multibench"``,
    as MultiBench / HighMMT; ``"sm4"``: force (32, 6), proprio (8, 1), action (4, 1)). MultiBench's
    robotics episodes: ``image`` (T, H, W, 3) or (T, 3, W, H), ``depth_data`` (T, H, W[, 1]),
    ``proprio`` (T, >=8), ``ee_forces_continuous`` (T, >=32, 6), ``action`` (T, A), ``contact``
    (T, ...). Sample t < T - 1: image, depth, proprio[:8] and the last ``force_window`` (32) force
    readings (tanh, as MultiBench) at t, the action at t + 1; target: contact at t + 1
    (MultiBench's ``contact_next``). uint8 images fed as their 0-255 values, as MultiBench's
    ToTensor (``rescale_images=True``: /255); ``image_patch`` / ``depth_patch`` 1: pixel tokens
    (Table 13; 8: sm4's earlier 8 x 8 patches, (16, 16, 192) / (16, 16, 64)).
    Episodes are split by file with a seeded permutation: val ``val_fraction`` (0.2), and each val
    episode brings its paired episode from train (MultiBench's ``augment_val``: same name prefix,
    ``<prefix><n>_1000.h5``; ``paired_val=False``: the drawn files alone); MultiBench and HighMMT
    have no test split and report val, so test is val unless ``test_fraction`` > 0.
mosei (2 classes): ``mosei.vision`` sequence (50, 35), ``mosei.audio`` (50, 74), ``affect.text``
    (50, 300). A pickle {'train', 'valid', 'test'} of {'vision' (n, L, 35), 'audio' (n, L, 74),
    'text' (n, L, 300) GloVe, 'labels' (n, 1, 1) sentiment}. Samples whose text sums to 0 are
    dropped (MultiBench); ``align`` (on): start at the first step with text (the data is
    front-padded); ``znorm`` (on): per-sample, per-feature z-score (HighMMT's MOSEI pipeline);
    then cut / zero-pad at the end to ``seq_len`` (50); non-finite values (-inf audio) -> 0.
    Label: sentiment >= 0 (HighMMT; ``zero_is_positive=False``: > 0, MultiBench's).
urfunny (2 classes): ``urfunny.vision`` sequence (20, 371), ``urfunny.audio`` (20, 81),
    ``affect.text`` (50, 300). humor.pkl, the same layout; labels 0/1, class = label > 0.
    ``align``, ``znorm`` and ``drop_empty_text`` default off: HighMMT's humorloader feeds every
    sample of humor.pkl as stored (MultiBench's affect loader drops text that sums to 0). Steps per
    field (``seq_len``): vision and audio 20, text 50 (Table 15; not padded to 50).
mimic (2 classes, or 6): ``mimic.static`` tabular (5, 1), ``mimic.timeseries`` sequence (24, 12).
    im.pk {'ep_tdata' (n, 24, 12), 'adm_features_all' (n, 5), 'adm_labels_all' (n, 6), 'y_icd9'
    (n, 20)}; non-finite -> 0, z-scored with all samples' mean / std (as MultiBench). Label:
    ``task_index`` 0-19 = that ICD-9 group, binary (default 7, the group HighMMT's scripts use),
    or -1 = MultiBench's 6-class mortality. Splits: MultiBench's own (``random.Random(10)``
    shuffle; val = the first n // 10, test = the next n // 10, train = the rest).

``affect.text`` (300-d GloVe word vectors) is the one modality shared between tasks (MOSEI and
UR-FUNNY, as HighMMT shares it); ``share_text=False`` names it ``mosei.text`` / ``urfunny.text``.
The shapes above are those of the published files; the loaders take feature widths, sequence and
image sizes from the files themselves and check them for consistency.

Memory: ``.npy`` files are memory-mapped, HDF5 images and ENRICO's pictures are read per item, and
every item is converted to float32 only when it is fetched; the pickles (MOSEI, UR-FUNNY, MIMIC)
must be read whole (pickle cannot be mapped). Loading writes nothing.

Errors: a missing file raises FileNotFoundError naming the expected path; a corrupt or truncated
file, a missing key or field, a wrong shape or differing sample counts raise ValueError naming the
file and the field. Problems only visible when an item is read (a truncated JPEG, a damaged HDF5
chunk, non-finite values) raise ValueError naming the file and the sample when it is fetched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..bundled import MultiTaskData
from ._common import (AVMNIST_FILES, ENRICO_CSV, MIMIC_FILE, MOSEI_FILES, PUSH_FILES, SHARED_TEXT, TASKS, URFUNNY_FILES,
                      MultiBenchDataset, combine, patchify)
from ._pickle import _read_pickle  # noqa: F401  (importable from here; its home is ._pickle)
from .avmnist import load_avmnist
from .enrico import load_enrico
from .mimic import load_mimic
from .mosei import load_mosei
from .push import PUSH_MULTIBENCH_STATS, _push_file, load_push
from .urfunny import URFUNNY_LENGTHS, load_urfunny
from .vandt import _vt_files, load_vt

__all__ = [
    "PUSH_MULTIBENCH_STATS",
    "SETTING_OPTIONS",
    "SHARED_TEXT",
    "TASKS",
    "URFUNNY_LENGTHS",
    "MultiBenchDataset",
    "combine",
    "load_avmnist",
    "load_enrico",
    "load_mimic",
    "load_mosei",
    "load_multibench",
    "load_push",
    "load_urfunny",
    "load_vt",
    "patchify",
]



LOADERS: dict[str, Callable[..., MultiTaskData]] = {
    "avmnist": load_avmnist, "enrico": load_enrico, "push": load_push, "vt": load_vt,
    "urfunny": load_urfunny, "mosei": load_mosei, "mimic": load_mimic,
}


def _present(task: str, path: Path) -> bool:
    """Whether any of the task's files is at ``path`` (a present task with a file missing then
    fails to load, naming it, rather than being skipped)."""
    if task in ("mosei", "urfunny", "mimic") and path.is_file():
        return True
    if task == "avmnist":
        return any((path / name).is_file() for name in AVMNIST_FILES)
    if task == "enrico":
        return (path / ENRICO_CSV).is_file()
    if task == "push":
        return any(_push_file(path, name) is not None for name in PUSH_FILES.values())
    if task == "vt":
        return bool(_vt_files(path))
    names = {"mosei": MOSEI_FILES, "urfunny": URFUNNY_FILES, "mimic": (MIMIC_FILE,)}[task]
    return any((path / name).is_file() for name in names)


# The tokenisation a published setting needs where it differs from the loaders' defaults (M³SAT
# Tables 13-15): the small setting feeds PUSH's frames as pixel tokens on 3 axes (Table 13), the
# medium one as 16 channels on 2 (Table 14, the loader's default).
SETTING_OPTIONS = {"small": {"push": {"image_layout": "video"}}}


def load_multibench(root, tasks: list[str] | None = None, *, paths: dict | None = None,
                    options: dict[str, dict] | None = None, setting: str | None = None) -> MultiTaskData:
    """The chosen MultiBench tasks in one MultiTaskData.

    root: the folder holding one folder per task (see the module docstring); ``paths[task]``
    overrides a task's folder (or, for the pickled tasks, its file). tasks: default every task
    with files under root; a requested task whose files are missing raises FileNotFoundError
    naming the expected path. options: keyword arguments per task for its loader, e.g.
    ``{"mimic": {"task_index": -1}, "avmnist": {"image_patch": 1}}``; ``train_weight`` and
    ``eval_weight`` there set the TaskSpec weights. setting: a published setting's name (small,
    medium, large) adds its tokenisation (``SETTING_OPTIONS``) under ``options``.
    """
    root = Path(root)
    if isinstance(tasks, str):
        tasks = [tasks]
    paths = {task: Path(p) for task, p in (paths or {}).items()}
    options = {task: {**SETTING_OPTIONS.get(setting, {}).get(task, {}), **(options or {}).get(task, {})}
               for task in set(options or {}) | set(SETTING_OPTIONS.get(setting, {}))}
    unknown = sorted((set(tasks or ()) | set(paths) | set(options)) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown MultiBench tasks {unknown}; known: {list(TASKS)}")
    where = {task: paths.get(task, root / task) for task in TASKS}
    if tasks is None:
        tasks = [task for task in TASKS if _present(task, where[task])]
        if not tasks:
            raise FileNotFoundError(f"no MultiBench task found under {str(root)!r}: expected one of "
                                    + ", ".join(f"{task}/" for task in TASKS) + " (see sm4.data.multibench)")
    elif not tasks:
        raise ValueError("tasks is empty: name at least one of " + ", ".join(TASKS))
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks {tasks} names a task twice")
    parts = []
    for task in tasks:
        kwargs = dict(options.get(task, {}))
        weights = {key: float(kwargs.pop(key)) for key in ("train_weight", "eval_weight") if key in kwargs}
        data = LOADERS[task](where[task], **kwargs)
        if weights:
            data.tasks[task] = dataclasses.replace(data.tasks[task], **weights)
        parts.append(data)
    header = f"MultiBench tasks {', '.join(tasks)} from {str(root)!r}"
    return combine(parts, description="\n".join([header] + [part.description for part in parts]))
