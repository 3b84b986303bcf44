"""``SM4EncoderLayer``: the SM4 encoder layer, a drop-in for ``nn.TransformerEncoderLayer``.

SM4_SPEC §1.4, pre-norm and residual::

    x = x + SMoA(LN(x))     sparse mixture of attention: Q, K, V from expert groups (own routers)
    x = x + SMoE(LN(x))     sparse mixture of FFN experts Linear(C, H) -> GELU -> Linear(H, C)

Constructor arguments, forward signature, mask handling, dropout placement and attribute names
(``self_attn``, ``norm1``/``norm2``, ``dropout1``/``dropout2``, ``norm_first``; ``linear1``,
``dropout``, ``linear2``, ``activation`` for a dense FFN) follow ``nn.TransformerEncoderLayer``,
so the layer goes into ``nn.TransformerEncoder`` unchanged. Two switches give the papers'
ablations: ``sparse_attention=False`` (without SMoA: ``nn.MultiheadAttention``) and
``sparse_ffn=False`` (without SMoE: the dense FFN); both off is the dense transformer layer.

Differences from torch's layer: pre-norm (``norm_first=True``) and GELU are the defaults, as in
the papers; a sparse FFN has no dropout on its hidden layer (the fused expert kernels have none;
its output still goes through ``dropout2``); torch's fused inference fast path is never taken.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .batch_share import Dropout  # nn.Dropout, per-sample masks in a data-parallel share
from ._common import SparseMoEModule
from ._encoder_checks import check_forward_arguments
from ._mha_compat import jit_script_refusal
from .ffn import ACTIVATIONS, SparseMoEFFN


def _dense_activation(activation):
    """The dense FFN's activation function, from a name or a callable (as torch's layer takes it)."""
    if callable(activation):
        return activation
    functions = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh}
    if activation not in functions:
        raise ValueError(f"SM4EncoderLayer: activation must be one of {sorted(functions)} or a callable, "
                         f"got {activation!r}")
    return functions[activation]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _sparse_activation(activation) -> str:
    """The sparse FFN's activation name: the fused expert kernels implement GELU (erf or tanh) only."""
    if activation is F.gelu:
        return "gelu"
    if activation is _gelu_tanh:
        return "gelu_tanh"
    if activation not in ACTIVATIONS:
        raise ValueError(f"SM4EncoderLayer: with sparse_ffn=True, activation must be one of {list(ACTIVATIONS)} "
                         f"(what the fused expert kernels implement), got {activation!r}; use sparse_ffn=False "
                         "for another activation")
    return activation


class SM4EncoderLayer(nn.Module):
    """One SM4 transformer encoder layer: (sparse) self-attention, then a (sparse) FFN.

    Args (as ``nn.TransformerEncoderLayer``): d_model C, nhead, dim_feedforward H (default 2048;
    the papers' H = 2C = 128 at C = 64), dropout, activation ("gelu" default; "gelu_tanh"; for a
    dense FFN also "relu" or a callable), layer_norm_eps, batch_first, norm_first (default True:
    pre-norm, as in the papers; False is post-norm), bias, device, dtype.
    Keyword-only: num_experts E (default 16), top_k (default 2), noise_std, renormalize,
    balance_loss_weight, backend (see ``sm4.modules.MoEConfig``), each given to both expert
    layers; sparse_attention (default True; False = ``nn.MultiheadAttention``) and sparse_ffn
    (default True; False = dense ``linear1 -> activation -> dropout -> linear2``).

    Submodules: ``self_attn`` (a ``SparseMoEAttention`` or an ``nn.MultiheadAttention``),
    ``norm1``, ``norm2``, ``dropout1``, ``dropout2``, and ``ffn`` (a ``SparseMoEFFN``; None when
    dense) or ``linear1``, ``dropout``, ``linear2`` with the function ``activation`` (dense).

    After each forward the sparse submodules hold their balancing losses: add
    ``sm4.collect_aux_loss(model)`` to the training loss.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation="gelu",
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_experts: int = 16,
        top_k: int = 2,
        noise_std: float = 1.0,
        renormalize: bool = False,
        balance_loss_weight: float = 0.05,
        sparse_attention: bool = True,
        sparse_ffn: bool = True,
        num_routers: int = 1,
        backend: str | None = None,
    ):
        super().__init__()
        for arg, value in (("d_model", d_model), ("nhead", nhead), ("dim_feedforward", dim_feedforward)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SM4EncoderLayer: {arg} must be a positive int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"SM4EncoderLayer: {arg} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        moe = {"num_experts": num_experts, "top_k": top_k, "noise_std": noise_std, "renormalize": renormalize,
                   "balance_loss_weight": balance_loss_weight, "backend": backend, "num_routers": num_routers}
        self.sparse_attention = bool(sparse_attention)
        self.sparse_ffn = bool(sparse_ffn)
        if self.sparse_attention:
            from .attention import SparseMoEAttention

            self.self_attn = SparseMoEAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                                **factory, **moe)
        else:
            self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                                   **factory)
        if self.sparse_ffn:
            self.ffn = SparseMoEFFN(d_model, dim_feedforward, activation=_sparse_activation(activation), bias=bias,
                                    **factory, **moe)
        else:
            self.ffn = None
            self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
            self.dropout = Dropout(dropout)
            self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
            self.activation = _dense_activation(activation)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        *,
        token_k: torch.Tensor | None = None,
        router_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As ``nn.TransformerEncoderLayer.forward``; returns a tensor shaped like src.

        src: (L, N, C), (N, L, C) with batch_first, or unbatched (L, C). src_mask: (L, L) or
        (N * nhead, L, L), bool (True = not allowed) or float (added). src_key_padding_mask:
        (N, L) (or (L,) unbatched), bool (True = padding) or float. is_causal: a hint that
        src_mask is the causal mask (src_mask must still be given, as for torch's layer).
        token_k: optional per-token k, an int tensor of shape src.shape[:-1] with values in
        [1, top_k] (e.g. looked up from each token's modality), used by every router of the
        sparse parts (the Q, K, V routers and the FFN's); dense parts ignore it. router_index:
        with num_routers > 1, each token's router (modality- or task-specific routers), same shape.

        Dtype: the sparse parts run in src's dtype, or in the autocast dtype under autocast.
        """
        check_forward_arguments(self, src, src_mask, src_key_padding_mask, is_causal, token_k, router_index)
        # Masks as torch's layer prepares them (bool -> additive float; a type mismatch warns).
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=F._none_or_dtype(src_mask),
            other_name="src_mask", target_type=src.dtype,
        )
        src_mask = F._canonical_mask(
            mask=src_mask, mask_name="src_mask", other_type=None, other_name="", target_type=src.dtype,
            check_other=False,
        )
        # Per-token routing arguments reach only the sparse parts (torch's layers do not take them).
        routing = {name: value for name, value in (("token_k", token_k), ("router_index", router_index))
                   if value is not None}
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal, routing)
            x = x + self._ff_block(self.norm2(x), routing)
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal, routing))
            x = self.norm2(x + self._ff_block(x, routing))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal, routing):
        extra = routing if self.sparse_attention else {}
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal, **extra)[0]
        return self.dropout1(x)

    def _ff_block(self, x, routing):
        if self.ffn is not None:
            return self.dropout2(self.ffn(x, **routing))
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)

    def __prepare_scriptable__(self):
        raise jit_script_refusal(self)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The balancing losses of this layer's sparse parts at their last forward, summed (a
        differentiable scalar), or None before the first forward / when the layer is dense."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, SparseMoEModule) and m.aux_loss is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def extra_repr(self) -> str:
        return (f"sparse_attention={self.sparse_attention}, sparse_ffn={self.sparse_ffn}, "
                f"norm_first={self.norm_first}")
