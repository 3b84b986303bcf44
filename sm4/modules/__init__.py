"""The drop-in layers: ``SparseMoEAttention`` (for ``nn.MultiheadAttention``), ``SparseMoEFFN``
and ``SM4EncoderLayer`` (for ``nn.TransformerEncoderLayer``), on the fused ops of ``sm4.ops``."""

from ._common import MoEConfig, SparseMoEModule, collect_aux_loss, set_backend
from ._mha_compat import AttentionRuntimeError, AttentionTypeError, AttentionValueError
from .attention import SparseMoEAttention
from .encoder import SM4EncoderLayer
from .ffn import SparseMoEFFN

__all__ = ["AttentionRuntimeError", "AttentionTypeError", "AttentionValueError", "MoEConfig", "SM4EncoderLayer", "SparseMoEAttention", "SparseMoEFFN", "SparseMoEModule", "collect_aux_loss",
           "set_backend"]
