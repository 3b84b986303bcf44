"""CMU-MOSEI sentiment (MultiBench's processed pickle); see sm4.data.multibench."""

from __future__ import annotations


from ..bundled import MultiTaskData
from ._common import MOSEI_FILES
from .affect import _load_affect


def load_mosei(root, *, seq_len: int = 50, align: bool = True, znorm: bool = True, zero_is_positive: bool = True,
               drop_empty_text: bool = True, share_text: bool = True, allow_unsafe_pickle: bool = False) -> MultiTaskData:
    """CMU-MOSEI sentiment as binary classification; ``root`` is the mosei folder or the .pkl file."""
    positive = (lambda y: y >= 0) if zero_is_positive else (lambda y: y > 0)
    return _load_affect("mosei", root, MOSEI_FILES, positive, seq_len=seq_len, align=align, znorm=znorm,
                        drop_empty_text=drop_empty_text, share_text=share_text,
                        allow_unsafe_pickle=allow_unsafe_pickle,
                        description=f"CMU-MOSEI sentiment {'>=' if zero_is_positive else '>'} 0")
