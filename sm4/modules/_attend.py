"""The attention core shared by ``SparseMoEAttention`` and ``DenseAttention``: torch's mask rules
(bool or float masks to one additive mask) and the attention itself (SDPA, or the explicit softmax
when the weights are wanted or dropout must be drawn per sample in a data-parallel share)."""

import math

import torch

from .. import ops
from . import batch_share
from ._mha_compat import AttentionRuntimeError, AttentionValueError


def attend(q, k, v, mask, dropout_p: float, causal: bool, need_weights: bool):
    """Scaled dot-product attention of (N, H, L, Dh) q and (N, H, S, Dh) k, v with an additive
    (N, H or 1, L, S) mask (or None); returns ((N, H, L, Dh), weights (N, H, L, S) or None).

    SDPA unless the weights are wanted or the dropout must be drawn per sample (inside a
    data-parallel share, which SDPA's own dropout cannot do): then the explicit softmax, whose
    dropped-out weights are the ones returned (as ``nn.MultiheadAttention`` returns them).
    ``causal``: SDPA's causal hint (only with mask None and need_weights False)."""
    if need_weights or (dropout_p > 0.0 and batch_share.current() is not None):
        scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = batch_share.dropout(weights, p=dropout_p)  # samples on dim 0
        return weights @ v, (weights if need_weights else None)
    return ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal), None


def as_additive(mask, dtype):
    """A bool (True = masked) or float mask (checked before) as an additive float mask in ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def merge_masks(attn_mask, key_padding_mask, batch, num_heads, tgt_len, src_len):
    """attn_mask (L, S) or (N * H, L, S) and key_padding_mask (N, S) -> one (N, H or 1, L, S) mask."""
    merged = None
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise AttentionRuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be {(tgt_len, src_len)}.")
            merged = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (batch * num_heads, tgt_len, src_len):
                raise AttentionRuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                   f"{(batch * num_heads, tgt_len, src_len)}.")
            merged = attn_mask.view(batch, num_heads, tgt_len, src_len)
        else:
            raise AttentionRuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, src_len):
            raise AttentionValueError(f"expecting key_padding_mask shape of {(batch, src_len)}, but got {tuple(key_padding_mask.shape)}")
        padding = key_padding_mask.view(batch, 1, 1, src_len)
        merged = padding if merged is None else merged + padding
    return merged
