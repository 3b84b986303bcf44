"""Run sm4's sparse modules on the torch_grouped_mm peer's experts, for the layer and model benchmarks.

``use_torch_grouped_mm_experts(model)`` rebinds, per instance, the one method of each sparse
module that calls sm4's fused op: ``SparseMoEFFN._moe`` (``ops.moe_ffn``) and
``SparseMoEAttention._project_all`` (``ops.moe_qkv`` for stacked self-attention). Everything else
(norms, attention, dropout, the balancing loss kept on the module, routing statistics, hooks,
per-token k, per-kind routers) stays the module's own, so the two layers differ only in the
experts (and gating) implementation. The peer's balance loss uses the hard load (sm4: the smooth
load in training, which costs sm4 more); its routing statistics have the same fields.

These are private methods of sm4.modules, not an API: tests/test_peer_torch_grouped_mm.py checks
that a swapped layer still computes what the original does, so a change there fails loudly.
"""

import types

from sm4.modules import SparseMoEAttention, SparseMoEFFN
from sm4.types import MoEOutput

from . import torch_grouped_mm as peer


def _gating(module, token_k, router_input):
    m = module.moe
    if m.renormalize:
        raise ValueError("the torch_grouped_mm peer does not renormalise gates (nor does sm4 by default)")
    return dict(token_k=token_k, training=module.training, noise_std=m.noise_std, router_input=router_input)


def _ffn_moe(self, flat, w1, b1, w2, b2, token_k, router_input=None):
    """SparseMoEFFN._moe on the peer: MoEOutput(output (T, d), RoutingResult)."""
    gates, ids, routing = peer.routing(flat, self.router, self.moe.top_k, **_gating(self, token_k, router_input))
    activation = {"gelu": peer.F.gelu, "gelu_tanh": lambda h: peer.F.gelu(h, approximate="tanh")}[self.activation]
    out = peer.experts_forward(flat, gates, ids, [(w1, b1), (w2, b2)], activation, any_inactive=token_k is not None)
    return MoEOutput(out, routing)


def _attention_project_all(self, query, key, value, token_k, key_token_k, self_attention, expert_dtype,
                           router_index=None, key_router_index=None):
    """SparseMoEAttention._project_all on the peer (stacked self-attention: three linear expert groups)."""
    if not (self_attention and self.stacked):
        raise NotImplementedError("the peer swap covers stacked Q/K/V self-attention (the SM4 layers' case)")
    batch, length, _ = query.shape
    flat = query.reshape(batch * length, self.embed_dim).to(expert_dtype)
    tk = None if token_k is None else token_k.reshape(-1)
    gating = _gating(self, tk, self._router_input(flat, router_index, (batch, length)))
    projected, routings = [], {}
    for g, name in enumerate("qkv"):
        gates, ids, routings[name] = peer.routing(flat, self.routers[g], self.moe.top_k, **gating)
        bias = None if self.expert_bias is None else self.expert_bias[g]
        out = peer.experts_forward(flat, gates, ids, [(self.expert_weight[g], bias)], any_inactive=tk is not None)
        projected.append(out.view(batch, length, self.embed_dim))
    return (*projected, routings)


def use_torch_grouped_mm_experts(model):
    """Swap every sparse module of model (in place) onto the peer's experts. Returns model."""
    for module in model.modules():
        if isinstance(module, SparseMoEFFN):
            module._moe = types.MethodType(_ffn_moe, module)
        elif isinstance(module, SparseMoEAttention):
            module._project_all = types.MethodType(_attention_project_all, module)
    return model
