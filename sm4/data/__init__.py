"""Data for sm4's multi-modal multi-task models.

``sm4.data.bundled``: the small bundled benchmark; ``sm4.data.multibench``: loaders for the seven
MultiBench tasks of the papers from their published files (see each docstring)::

    from sm4.data import load_bundled, task_loader
    data = load_bundled()
    for inputs, target in task_loader(data, "digits", "train", batch_size=32, shuffle=True):
        ...

The names are imported lazily, so ``python -m sm4.data.bundled`` runs without a double import.
"""

_BUNDLED = (
    "DEFAULT_PATH", "FORMAT_VERSION", "GENERATOR_REQUIREMENTS", "SPLITS", "BundledDataset",
    "ModalitySpec", "MultiTaskData", "TaskSpec", "collate", "load_bundled", "make_bundled", "task_loader",
)

_MULTIBENCH = (
    "TASKS", "MultiBenchDataset", "combine", "load_avmnist", "load_enrico", "load_mimic", "load_mosei",
    "load_multibench", "load_push", "load_urfunny", "load_vt",
)

__all__ = [*_BUNDLED, *_MULTIBENCH]


def __getattr__(name):
    if name in _BUNDLED:
        from . import bundled

        return getattr(bundled, name)
    if name in _MULTIBENCH:
        from . import multibench

        return getattr(multibench, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
