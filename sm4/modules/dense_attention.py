"""``DenseAttention``: ``nn.MultiheadAttention`` for the dense baselines, with data-parallel dropout.

The dense baselines (``ModelConfig.dense``: the dense ablation, the papers' Dense Model 1 and 2;
and the "without SMoA" ablation) used torch's ``nn.MultiheadAttention``, whose attention dropout
draws from each process's own torch generator, so a data-parallel run of them was not the
single-process run. This module computes the same attention (SDPA inside), and inside a
``sm4.modules.batch_share`` share draws its dropout mask per sample for the whole batch from the
share's stream, as the sparse layers do: a sample gets the same mask whatever the number of
processes. Outside a share (plain use, evaluation) dropout is SDPA's own, as in torch's module.

State dict: the same keys and shapes as ``nn.MultiheadAttention`` with ``kdim == vdim ==
embed_dim`` (``in_proj_weight`` (3C, C), ``in_proj_bias`` (3C,), ``out_proj.weight``,
``out_proj.bias``), and the same initialisation in the same generator order, so checkpoints of
the dense baselines saved before load unchanged and a seed builds the same model as before.

The key bias (``in_proj_bias[C:2C]``) is frozen: it adds ``q . b_k`` to every score of a query
row, the same for every key, and softmax is invariant to that, so its true gradient is exactly
zero; what autograd computes is rounding, which Adam (dividing each gradient by its own scale)
turns into lr-sized steps that differ between processes. It is used detached (its gradient is
exactly zero, so Adam never moves it; it stays in the state dict). Same reason and pattern as
``SM4Model`` freezing the biases its heads' BatchNorm cancels.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ._attend import as_additive, attend, merge_masks


class DenseAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s arguments (kdim = vdim = embed_dim,
    no add_bias_kv / add_zero_attn), parameters and forward
    ``(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None)``.

    query (L, N, C), or (N, L, C) with batch_first, or unbatched (L, C); key / value likewise with
    S for L. Masks as torch's: attn_mask (L, S) or (N * H, L, S), key_padding_mask (N, S), bool
    (True = masked out) or float (added). Dropout (training) on the attention weights, per sample
    inside a data-parallel share (module docstring)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"DenseAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        # nn.MultiheadAttention's order of draws: out_proj's own init, then xavier on in_proj.
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if bias:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "DenseAttention":
        """A DenseAttention holding a copy of ``mha``'s parameters (same outputs, same state dict)."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("DenseAttention.from_multihead: only kdim = vdim = embed_dim without add_bias_kv / "
                             "add_zero_attn (what SM4EncoderLayer builds)")
        weight = mha.in_proj_weight
        # skip_init: no draws from torch's generator (a model built with a seed stays the one it was)
        layer = nn.utils.skip_init(cls, mha.embed_dim, mha.num_heads, dropout=mha.dropout,
                                   bias=mha.in_proj_bias is not None, batch_first=mha.batch_first,
                                   device=weight.device, dtype=weight.dtype)
        layer.load_state_dict(mha.state_dict())
        layer.train(mha.training)
        return layer

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or not batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt_len, _ = query.shape
        src_len = key.shape[1]
        weight = self.in_proj_weight
        bias = self.in_proj_bias
        if bias is not None:
            q_bias, k_bias, v_bias = bias.chunk(3)
            bias = torch.cat([q_bias, k_bias.detach(), v_bias])  # the key bias: frozen (module docstring)
        if query is key and key is value:
            q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        else:
            biases = (None,) * 3 if bias is None else bias.chunk(3)
            q, k, v = (F.linear(t, w, b) for t, w, b in zip((query, key, value), weight.chunk(3), biases))
        if is_causal and attn_mask is None:
            raise RuntimeError("DenseAttention: is_causal is a hint and needs attn_mask (as nn.MultiheadAttention)")
        attn_mask = as_additive(attn_mask, q.dtype)
        key_padding_mask = as_additive(key_padding_mask, q.dtype)
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else merge_masks(attn_mask, key_padding_mask, batch, self.num_heads, tgt_len, src_len)
        heads = lambda t: t.reshape(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        attended, weights = attend(heads(q), heads(k), heads(v), mask, self.dropout if self.training else 0.0,
                                   causal, need_weights)
        output = self.out_proj(attended.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim))
        if not self.batch_first or not batched:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        return output, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")
