"""``SparseMoEAttention``: sparse mixture of attention (SMoA), a drop-in for ``nn.MultiheadAttention``.

Q, K and V each come from a group of single-linear experts with its own router (SM4_SPEC §1.4);
attention is torch's ``scaled_dot_product_attention`` (its math kernel for short sequences in CPU
inference, where torch's flash kernel is slower: ``sm4.ops.scaled_dot_product_attention``; an
explicit softmax path when the weights are asked for); the output projection is dense. When query, key and value are one tensor, the
three routings feed one fused grouped GEMM over the 3E Q/K/V experts (``sm4.ops.moe_qkv``).

Constructor arguments, defaults, forward signature, return values, mask conventions, exception
classes and attribute names (``out_proj``, ``batch_first``, ``_qkv_same_embed_dim``,
``bias_k``/``bias_v``, ``q/k/v_proj_weight``, ``merge_masks``, ...) follow
``nn.MultiheadAttention``, so the module can replace it, e.g. as the ``self_attn`` of the layers
of an already built ``nn.TransformerEncoder`` / ``nn.Transformer``. The packed projection does not
exist: ``in_proj_bias`` is None and ``in_proj_weight`` a tensor that refuses every use, which makes
torch's fused fast-path checks (written for the dense layer) decline instead of crashing.
Nested-tensor input (what torch's encoder makes of a padding mask) is accepted.
"""

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import ops
from ._attend import as_additive as _as_additive, attend, merge_masks as _merge_masks
from ._common import MoEConfig, SparseMoEModule, init_experts_like_linear, init_router
from ._mha_compat import (NO_PACKED_PROJECTION, AttentionRuntimeError, AttentionTypeError, AttentionValueError,
                          padding_mask, renest, unnest)

PROJECTIONS = ("q", "k", "v")


class SparseMoEAttention(SparseMoEModule):
    """Multi-head attention whose Q, K and V projections are mixtures of linear experts.

    Args (as ``nn.MultiheadAttention``): embed_dim C, num_heads, dropout (on the attention
    weights), bias (expert, dense and output-projection biases), add_bias_kv, add_zero_attn,
    kdim, vdim, batch_first, device, dtype.
    Keyword-only MoE args: num_experts (E, default 16), top_k (default 2), noise_std,
    renormalize, balance_loss_weight, backend (see ``sm4.modules.MoEConfig``), and ``sparse``:
    which of "q", "k", "v" are expert groups (default all three, as in the papers; the others
    are dense ``Linear`` projections). The output projection is dense.

    Parameters: with all three sparse and kdim = vdim = embed_dim, ``routers`` (3, C, E),
    ``expert_weight`` (3, E, C, C) in (in, out) layout and ``expert_bias`` (3, E, C), stacked so
    that the fused Q/K/V path needs no copy; otherwise per projection ``{q,k,v}_router`` (d_i, E),
    ``{q,k,v}_expert_weight`` (E, d_i, C), ``{q,k,v}_expert_bias`` (E, C) for a sparse one and
    ``{q,k,v}_proj_weight`` (C, d_i), ``{q,k,v}_proj_bias`` (C,) for a dense one.

    After each forward: ``aux_loss`` (the balancing loss, differentiable) and ``routing_stats``
    (see ``sm4.modules.SparseMoEModule``); ``sm4.collect_aux_loss(model)`` sums the losses.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, num_experts=16, top_k=2,
                 noise_std=1.0, renormalize=False, balance_loss_weight=0.05, sparse=PROJECTIONS, num_routers=1,
                 backend=None):
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and num_heads={num_heads} instead")
        super().__init__(MoEConfig(num_experts, top_k, noise_std, renormalize, balance_loss_weight, backend), num_routers)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise AttentionValueError(f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim} and num_heads={num_heads}")
        sparse = tuple(sparse)
        unknown = [name for name in sparse if name not in PROJECTIONS]
        if unknown:
            raise ValueError(f"sparse must name projections among {PROJECTIONS}, got {sparse!r}")
        self.sparse = tuple(name for name in PROJECTIONS if name in sparse)
        self.stacked = self.sparse == PROJECTIONS and self._qkv_same_embed_dim
        experts = num_experts
        in_dims = {"q": embed_dim, "k": self.kdim, "v": self.vdim}
        if self.stacked:
            self.routers = nn.Parameter(torch.empty(3, num_routers * embed_dim, experts, **factory))
            self.expert_weight = nn.Parameter(torch.empty(3, experts, embed_dim, embed_dim, **factory))
            self.expert_bias = nn.Parameter(torch.empty(3, experts, embed_dim, **factory)) if bias else None
        else:
            for name in PROJECTIONS:
                if name in self.sparse:
                    setattr(self, f"{name}_router", nn.Parameter(torch.empty(num_routers * in_dims[name], experts, **factory)))
                    setattr(self, f"{name}_expert_weight", nn.Parameter(torch.empty(experts, in_dims[name], embed_dim, **factory)))
                    setattr(self, f"{name}_expert_bias", nn.Parameter(torch.empty(experts, embed_dim, **factory)) if bias else None)
                else:
                    setattr(self, f"{name}_proj_weight", nn.Parameter(torch.empty(embed_dim, in_dims[name], **factory)))
                    setattr(self, f"{name}_proj_bias", nn.Parameter(torch.empty(embed_dim, **factory)) if bias else None)
        # nn.MultiheadAttention's attributes: a sparse projection has no dense weight (None, as
        # MHA's q/k/v_proj_weight are None when packed); the packed in_proj_bias is None (torch's
        # layer fast path then declines: "bias=False") and in_proj_weight is a property (below).
        for name in PROJECTIONS:
            if not hasattr(self, f"{name}_proj_weight"):
                self.register_parameter(f"{name}_proj_weight", None)
        self.register_parameter("in_proj_bias", None)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    @property
    def in_proj_weight(self):
        """nn.MultiheadAttention's packed Q/K/V weight, which does not exist here: a tensor whose
        every use raises, so that torch's fast-path checks (which read it) decline cleanly (see
        ``sm4.modules._mha_compat``). Not a parameter, not in the state_dict."""
        return NO_PACKED_PROJECTION

    def _reset_parameters(self):
        in_dims = {"q": self.embed_dim, "k": self.kdim, "v": self.vdim}
        for g, name in enumerate(PROJECTIONS):
            router, weight, bias = self._projection_params(name)
            if router is not None:
                init_router(router, fan_in=in_dims[name])
                init_experts_like_linear(weight, bias, in_dims[name])
            else:
                nn.init.xavier_uniform_(weight)
                if bias is not None:
                    nn.init.zeros_(bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _projection_params(self, name):
        """(router (d, E) or None, weight, bias) of projection ``name``: expert weights (E, d, C) in
        (in, out) layout when sparse, an nn.Linear-layout (C, d) weight when dense."""
        if self.stacked:
            g = PROJECTIONS.index(name)
            return self.routers[g], self.expert_weight[g], None if self.expert_bias is None else self.expert_bias[g]
        if name in self.sparse:
            return getattr(self, f"{name}_router"), getattr(self, f"{name}_expert_weight"), getattr(self, f"{name}_expert_bias")
        return None, getattr(self, f"{name}_proj_weight"), getattr(self, f"{name}_proj_bias")

    # ---- forward ------------------------------------------------------------------------------

    def _moe_keywords(self):
        m = self.moe
        return dict(noise_std=m.noise_std, training=self.training, renormalize=m.renormalize, backend=m.backend)

    def _project(self, name, tokens, token_k, expert_dtype, router_index=None):
        """tokens (B, n, d_i) -> ((B, n, C), RoutingResult or None)."""
        router, weight, bias = self._projection_params(name)
        if router is None:  # dense; cast as autocast would (it is off here)
            cast = lambda t: None if t is None else t.to(expert_dtype)  # noqa: E731
            return F.linear(cast(tokens), cast(weight), cast(bias)), None
        batch, length, width = tokens.shape
        flat = tokens.reshape(batch * length, width).to(expert_dtype)
        tk = None if token_k is None else token_k.reshape(-1)
        router_input = self._router_input(flat, router_index, (batch, length), "router_index / key_router_index")
        out = ops.moe_linear(flat, router, weight, bias, self.moe.top_k, token_k=tk, router_input=router_input,
                             **self._moe_keywords())
        return out.output.view(batch, length, -1), out.routing

    def _project_all(self, query, key, value, token_k, key_token_k, self_attention, expert_dtype,
                     router_index=None, key_router_index=None):
        """(q, k, v) each (N, n, C), and the routings by projection name."""
        batch, tgt_len, _ = query.shape
        if self_attention and self.stacked:
            flat = query.reshape(batch * tgt_len, self.embed_dim).to(expert_dtype)
            tk = None if token_k is None else token_k.reshape(-1)
            router_input = self._router_input(flat, router_index, (batch, tgt_len))
            qkv, (rq, rk, rv) = ops.moe_qkv(flat, tuple(self.routers.unbind(0)), self.expert_weight, self.expert_bias,
                                           self.moe.top_k, token_k=tk, router_input=router_input,
                                           **self._moe_keywords())
            q, k, v = (qkv[:, g].view(batch, tgt_len, self.embed_dim) for g in range(3))
            return q, k, v, {"q": rq, "k": rk, "v": rv}
        projected, routings = {}, {}
        for name, tokens, tk, ri in (("q", query, token_k, router_index), ("k", key, key_token_k, key_router_index),
                                     ("v", value, key_token_k, key_router_index)):
            projected[name], routing = self._project(name, tokens, tk, expert_dtype, ri)
            if routing is not None:
                routings[name] = routing
        return projected["q"], projected["k"], projected["v"], routings

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False, *, token_k=None, key_token_k=None, router_index=None,
                key_router_index=None):
        """As ``nn.MultiheadAttention.forward``; returns (attn_output, attn_weights or None).

        query (L, N, C) / key (S, N, kdim) / value (S, N, vdim), or (N, ·, ·) with batch_first,
        or unbatched (L, C) / (S, ·), or nested tensors (N, ragged L, ·) (strided or jagged; the
        lengths are the padding, no masks; the output is nested like query). key_padding_mask
        (N, S) (or (S,) unbatched): bool, True = ignore that key, or float, added. attn_mask
        (L, S) or (N * num_heads, L, S): bool, True = not allowed, or float, added. is_causal: a
        hint that attn_mask is the causal mask.
        token_k: optional per-token k of the query tokens (an int tensor shaped like
        query.shape[:-1], e.g. from modality ids); key_token_k: of the key/value tokens (default:
        token_k when key is query). router_index / key_router_index: with num_routers > 1, each
        query / key token's router, shaped likewise (key_router_index defaults as key_token_k).
        attn_output has query's layout and the expert dtype; attn_weights (N, L, S), or
        (N, num_heads, L, S) unless average_attn_weights.

        Bad arguments raise what nn.MultiheadAttention raises (AssertionError or RuntimeError) as
        an exception that is also the ValueError / TypeError of sm4 (see ``_mha_compat``).
        """
        routing = {"token_k": token_k, "key_token_k": key_token_k, "router_index": router_index,
                   "key_router_index": key_router_index}
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights, is_causal, routing)
        is_batched = self._check_arguments(query, key, value, key_padding_mask, attn_mask, is_causal)
        self_attention = query is key and key is value
        if key is query:
            routing["key_token_k"] = token_k if key_token_k is None else key_token_k
            routing["key_router_index"] = router_index if key_router_index is None else key_router_index
        # Work batch-first: (N, L, C).
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            routing = {name: None if t is None else t.unsqueeze(0) for name, t in routing.items()}
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
            routing = {name: None if t is None else t.transpose(0, 1) for name, t in routing.items()}
        output, weights = self._attend(query, key, value, self_attention, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal, routing)
        if not is_batched:
            output = output.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def _check_arguments(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
        """torch's checks (F._mha_shape_check, _canonical_mask, multi_head_attention_forward), in its
        order, with its exception classes; returns whether the input is batched."""
        if query.dim() not in (2, 3):
            raise AttentionValueError(f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D "
                                      "query tensor")
        is_batched = query.dim() == 3
        kind, padding_dims = ("batched (3-D)", 2) if is_batched else ("unbatched (2-D)", 1)
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise AttentionValueError(f"For {kind} `query`, expected `key` and `value` to be {query.dim()}-D but found "
                                      f"{key.dim()}-D and {value.dim()}-D tensors respectively")
        if key_padding_mask is not None and key_padding_mask.dim() != padding_dims:
            raise AttentionValueError(f"For {kind} `query`, expected `key_padding_mask` to be `None` or {padding_dims}-D "
                                      f"but found {key_padding_mask.dim()}-D tensor instead")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AttentionValueError(f"For {kind} `query`, expected `attn_mask` to be `None`, 2-D or 3-D but found "
                                      f"{attn_mask.dim()}-D tensor instead")
        if not is_batched and attn_mask is not None and attn_mask.dim() == 3:
            expected = (self.num_heads, query.shape[0], key.shape[0])
            if tuple(attn_mask.shape) != expected:
                raise AttentionValueError(f"Expected `attn_mask` shape to be {expected} but got {tuple(attn_mask.shape)}")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise AttentionTypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for both "
                          "instead.", stacklevel=3)
        if is_causal and attn_mask is None:
            raise AttentionRuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                                        "module method `generate_square_subsequent_mask` to create this mask.")
        if query.shape[-1] != self.embed_dim:
            raise AttentionValueError(f"was expecting embedding dimension of {self.embed_dim}, but got {query.shape[-1]} "
                                      f"(query {tuple(query.shape)})")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AttentionValueError(f"key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise AttentionValueError(f"key's sequence and batch dims {tuple(key.shape[:-1])} do not match value's "
                                      f"{tuple(value.shape[:-1])}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise AttentionRuntimeError(f"key and value must have kdim={self.kdim} and vdim={self.vdim} features, got "
                                        f"key {tuple(key.shape)} and value {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first or not is_batched else 1
        if is_batched and query.shape[batch_dim] != key.shape[batch_dim]:
            raise AttentionRuntimeError(f"query and key must have the same batch size (dim {batch_dim}), got query "
                                        f"{tuple(query.shape)} and key {tuple(key.shape)}")
        return is_batched

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                        is_causal, routing):
        """Nested (N, ragged L, C) query, key and value: the padded batch-first input with the
        lengths as key padding mask; the output nested like query (weights padded, zero past each
        query's length, as torch's fast path returns them)."""
        if not (query.is_nested and key.is_nested and value.is_nested):
            raise AttentionValueError("query, key and value must all be nested tensors, or none of them")
        if key_padding_mask is not None or attn_mask is not None:
            raise AttentionValueError("key_padding_mask and attn_mask are not supported with NestedTensor input (as in "
                                      "nn.MultiheadAttention): the nested lengths are the padding")
        if any(t is not None for t in routing.values()):
            raise AttentionValueError("token_k / router_index are not supported with NestedTensor input: pass the "
                                      "padded tensors with key_padding_mask instead")
        self_attention = query is key and key is value
        padded_query, query_lengths = unnest(query, "query")
        padded_key, key_lengths = (padded_query, query_lengths) if key is query else unnest(key, "key")
        padded_value, value_lengths = (padded_key, key_lengths) if value is key else unnest(value, "value")
        if key_lengths != value_lengths:
            raise AttentionValueError(f"nested key and value must have the same lengths, got {key_lengths} and "
                                      f"{value_lengths}")
        if len(query_lengths) != len(key_lengths):
            raise AttentionRuntimeError(f"query and key must have the same batch size, got {len(query_lengths)} and "
                                        f"{len(key_lengths)}")
        for name, padded, width in (("query", padded_query, self.embed_dim), ("key", padded_key, self.kdim),
                                    ("value", padded_value, self.vdim)):
            if padded.shape[-1] != width:
                raise AttentionValueError(f"nested {name} must have {width} features, got {padded.shape[-1]}")
        padding = padding_mask(key_lengths, padded_key.shape[1], padded_key.device)
        output, weights = self._attend(padded_query, padded_key, padded_value, self_attention, padding, need_weights,
                                       None, average_attn_weights, is_causal, routing)
        if weights is not None:
            valid_query = ~padding_mask(query_lengths, padded_query.shape[1], weights.device)
            shape = (weights.shape[0],) + (1,) * (weights.dim() - 3) + (weights.shape[-2], 1)
            weights = weights * valid_query.view(shape)
        return renest(output, query_lengths, query), weights

    def _attend(self, query, key, value, self_attention, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal, routing):
        """Batch-first attention: query (N, L, C), key (N, S, kdim), value (N, S, vdim), checked;
        returns (N, L, C) and the weights (N, [H,] L, S) or None."""
        batch, tgt_len, _ = query.shape

        device_type = query.device.type
        autocast = torch.is_autocast_enabled(device_type)
        expert_dtype = torch.get_autocast_dtype(device_type) if autocast else query.dtype
        # sm4's ops are custom ops that autocast does not cast: the inputs are cast by hand above
        # (to expert_dtype), and the ops run with autocast off, so every backend routes in fp32
        # (the reference backend's plain matmuls would otherwise be autocast too).
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            q, k, v, routings = self._project_all(query, key, value, routing["token_k"], routing["key_token_k"],
                                                  self_attention, expert_dtype, routing["router_index"],
                                                  routing["key_router_index"])

        # Masks as additive float masks in q's dtype (bool: True = masked out).
        attn_mask = _as_additive(attn_mask, q.dtype)
        key_padding_mask = _as_additive(key_padding_mask, q.dtype)
        use_causal_hint = is_causal and key_padding_mask is None and not need_weights
        if use_causal_hint:
            attn_mask = None  # SDPA builds the causal mask itself
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.to(k.dtype).expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.to(v.dtype).expand(batch, 1, -1)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, k.shape[2])], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, v.shape[2])], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        mask = _merge_masks(attn_mask, key_padding_mask, batch, self.num_heads, tgt_len, src_len)

        heads = lambda t: t.reshape(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        # SDPA, or the explicit softmax for the weights or per-sample dropout in a data-parallel share
        attended, weights = attend(q, k, v, mask, self.dropout if self.training else 0.0, use_causal_hint,
                                   need_weights)
        attended = attended.transpose(1, 2).reshape(batch, tgt_len, self.embed_dim)
        output = self.out_proj(attended)
        self._record(routings)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return output, weights

    # nn.MultiheadAttention's mask merging for its fused path (it reads only num_heads), for code
    # that calls it on the module in its place.
    merge_masks = nn.MultiheadAttention.merge_masks

    # ---- upcycling ---------------------------------------------------------------------------

    @classmethod
    def from_dense(cls, mha: nn.MultiheadAttention, num_experts: int = 16, top_k: int = 2, **moe_kwargs):
        """A SparseMoEAttention from a trained ``nn.MultiheadAttention``: every expert a copy of the
        dense projection (routers freshly initialised). With num_experts = 1, or renormalize=True,
        its output equals the dense layer's (the kept gates then sum to 1 over identical experts).
        """
        bias = mha.out_proj.bias is not None
        layer = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=bias, add_bias_kv=mha.bias_k is not None,
                    add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first,
                    device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype, num_experts=num_experts,
                    top_k=top_k, **moe_kwargs)
        if mha._qkv_same_embed_dim:
            dense_weights = mha.in_proj_weight.chunk(3)
        else:
            dense_weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        dense_biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        with torch.no_grad():
            for name, w, b in zip(PROJECTIONS, dense_weights, dense_biases):
                router, weight, expert_bias = layer._projection_params(name)
                if router is None:
                    weight.copy_(w)
                    if expert_bias is not None:
                        expert_bias.copy_(b)
                else:
                    weight.copy_(w.t().expand_as(weight))
                    if expert_bias is not None:
                        expert_bias.copy_(b.expand_as(expert_bias))
            layer.out_proj.load_state_dict(mha.out_proj.state_dict())
            if mha.bias_k is not None:
                layer.bias_k.copy_(mha.bias_k)
                layer.bias_v.copy_(mha.bias_v)
        return layer
