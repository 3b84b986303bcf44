"""UR-FUNNY humour (MultiBench's humor.pkl); see sm4.data.multibench."""

from __future__ import annotations


from ..bundled import MultiTaskData
from ._common import URFUNNY_FILES
from .affect import _load_affect


URFUNNY_LENGTHS = {"vision": 20, "audio": 20, "text": 50}  # M³SAT Table 15 / HighMMT's humorloader


def load_urfunny(root, *, seq_len: int | dict = URFUNNY_LENGTHS, align: bool = False, znorm: bool = False,
                 drop_empty_text: bool = False, share_text: bool = True, allow_unsafe_pickle: bool = False) -> MultiTaskData:
    """UR-FUNNY humour detection (binary); ``root`` is the urfunny folder or humor.pkl itself.
    seq_len: steps per field, default Table 15's (vision and audio 20, text 50: not padded to 50);
    an integer gives every field that length (50: sm4's earlier choice). The defaults read the
    file as HighMMT's humorloader (the papers' code) does: every sample, as stored (no alignment,
    z-score or dropping); ``drop_empty_text=True`` drops samples whose text sums to 0, as
    MultiBench's affect loader (and sm4 earlier) does."""
    return _load_affect("urfunny", root, URFUNNY_FILES, lambda y: y > 0, seq_len=seq_len, align=align, znorm=znorm,
                        drop_empty_text=drop_empty_text, share_text=share_text,
                        allow_unsafe_pickle=allow_unsafe_pickle, description="UR-FUNNY humour")
