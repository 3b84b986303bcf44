"""A training run's folder (``--out``): one writer at a time, and a resume that continues the run it
finds or refuses with the reason.

Files: ``setting.json`` (written once the run is known to start), ``log.jsonl`` (one entry per
epoch), ``last.pt`` (every epoch), ``best.pt`` (the best epoch), ``.lock`` (held while a training
writes; the kernel releases it when the process ends, so a crash leaves no stale lock).

Resume semantics (``check_resumable``): the checkpoint records the model and training
configuration it was trained with. Rerunning with the same configuration continues; with only
``train.epochs`` changed the run is extended (or shortened, if it has not yet passed the new
length) and the learning-rate schedule is rebuilt for the new length; any other change (lr, batch
size, AEA/ALP, the model) is refused with the differences named, because the optimiser state,
the schedule and the weights would not belong to the new configuration.
"""

import errno
import fcntl
import os
from contextlib import contextmanager

RESUMABLE_CHANGES = frozenset({"train.epochs"})  # what a resume may change: the run's length


class RunFolderBusy(RuntimeError):
    """Another process is training into the same run folder."""


class ResumeMismatch(ValueError):
    """The run folder's checkpoint was trained with a configuration the resume cannot continue."""


@contextmanager
def locked(out_dir: str):
    """Hold an exclusive lock on ``out_dir`` (created if missing) for the block; a second writer
    gets RunFolderBusy at once instead of interleaving its log and checkpoints with ours."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ".lock")
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise RunFolderBusy(f"{out_dir} is in use by another training ({owner}): wait for it to finish or "
                                f"choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differences(saved: dict, wanted: dict) -> dict[str, tuple]:
    """{dotted name: (saved value, wanted value)} for every field that differs (missing: None)."""
    old, new = flatten(saved), flatten(wanted)
    return {name: (old.get(name), new.get(name)) for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)}


def check_resumable(checkpoint_path: str, saved: dict, wanted: dict, done_epochs: int) -> None:
    """Raise ResumeMismatch unless a run saved with configuration ``saved`` after ``done_epochs``
    epochs can be continued with configuration ``wanted`` (both {"model": {...}, "train": {...}})."""
    changed = differences(saved, wanted)
    refused = {name: values for name, values in changed.items() if name not in RESUMABLE_CHANGES}
    way_out = "start over with --no-resume, or keep that run and train into a new --out"
    if refused:
        listed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in refused.items())
        raise ResumeMismatch(f"{checkpoint_path} was trained with a different configuration ({listed}); "
                             f"only --epochs may change on resume: {way_out}")
    epochs = flatten(wanted).get("train.epochs")
    if epochs is not None and epochs < done_epochs:
        raise ResumeMismatch(f"{checkpoint_path} has already trained {done_epochs} epochs, more than --epochs {epochs}: "
                             f"{way_out}")


def read_log(out_dir: str) -> list[dict]:
    """The whole run's epoch entries from ``log.jsonl`` (every epoch, not only up to the best)."""
    import json

    path = os.path.join(out_dir, "log.jsonl")
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def last_logged_epoch(out_dir: str) -> int:
    """The last epoch ``log.jsonl`` records (0 when there is none): what a resume starts from."""
    try:
        entries = read_log(out_dir)
    except (OSError, ValueError):
        return 0
    return entries[-1]["epoch"] if entries else 0
