"""Atomic file writes: the content goes to a temporary file in the target's folder, which then
replaces the target in one rename, so a reader (or a crash) never sees half a file. The file gets
the mode an ordinary ``open(path, "w")`` would give it (0666 less the user's umask), not the
private 0600 of a temporary file."""

import os
import tempfile
from collections.abc import Callable


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: str, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call ``write(temporary_path)``, then move the temporary file onto ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=suffix, delete=False) as handle:
        temporary = handle.name
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_text_atomically(path: str, text: str) -> None:
    def write(temporary):
        with open(temporary, "w") as handle:
            handle.write(text)

    write_atomically(path, write)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a clear exit when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('plots need matplotlib: pip install "sm4[plots]" (or pip install matplotlib)') from error
    return plt


def save_figure(figure, path: str, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG atomically, then close it."""
    try:
        write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=dpi), suffix=".png")
    finally:
        pyplot().close(figure)
