"""``SparseMoEFFN``: the SMoE layer, a mixture of feed-forward experts (SM4_SPEC §1.4).

Each expert is ``Linear(d_model, h) -> GELU -> Linear(h, d_model)``; a router (no bias) sends
every token to its top-k experts and the output is the gate-weighted sum of their outputs
(SM4_SPEC §2: no renormalisation unless asked). The whole layer is one ``sm4.ops.moe_ffn`` call:
gating, routing metadata and the fused gather/GEMM/combine of the selected backend.

It replaces the dense ``linear2(dropout(activation(linear1(x))))`` block of a transformer layer;
``SparseMoEFFN.from_dense`` upcycles a trained one (every expert a copy of it).
"""

import torch
from torch import nn

from .. import ops
from ._common import MoEConfig, SparseMoEModule, init_experts_like_linear, init_router

ACTIVATIONS = ops.ACTIVATIONS  # ("gelu", "gelu_tanh"): what the fused expert kernels implement


class SparseMoEFFN(SparseMoEModule):
    """A mixture of ``num_experts`` FFN experts with top-k routing, on tokens of any leading shape.

    Args:
        d_model: C, the token width (input and output).
        dim_feedforward: h, each expert's hidden width.
        num_experts: E (default 16). top_k: k_max, experts per token (1 <= top_k <= E).
        activation: "gelu" (exact, erf) or "gelu_tanh" (tanh approximation); the fused kernels
            implement these two only.
        bias: give each expert's two linears a bias (as ``nn.Linear(bias=...)``).
        device, dtype: of the parameters.
        noise_std, renormalize, balance_loss_weight, backend: see ``sm4.modules.MoEConfig``.
        recompute_hidden: the backward recomputes the hidden layer instead of the forward saving
            it (T * k * h elements); see ``sm4.ops.grouped_ffn``.

    Parameters:
        router: (d_model, E), no bias, small normal init (``init_router``).
        w1: (E, d_model, h) and b1: (E, h) or None; w2: (E, h, d_model) and b2: (E, d_model) or
            None. Weights are in (in, out) layout, the transpose of ``nn.Linear.weight``; each
            expert is initialised as an ``nn.Linear`` would be.

    After each forward: ``aux_loss`` (differentiable () balancing loss) and ``routing_stats``
    under the router name "ffn" (see ``sm4.modules.SparseMoEModule``).
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        num_experts: int = 16,
        top_k: int = 2,
        activation: str = "gelu",
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        noise_std: float = 1.0,
        renormalize: bool = False,
        balance_loss_weight: float = 0.05,
        recompute_hidden: bool = False,
        num_routers: int = 1,
        backend: str | None = None,
    ):
        name = type(self).__name__
        for arg, value in (("d_model", d_model), ("dim_feedforward", dim_feedforward)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: {arg} must be a positive int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        if backend is not None:
            from ..dispatch import _check_name

            _check_name(backend, f"{name}: backend")
        super().__init__(MoEConfig(num_experts, top_k, noise_std, renormalize, balance_loss_weight, backend), num_routers)
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.dim_feedforward = dim_feedforward
        self.activation = activation
        self.recompute_hidden = bool(recompute_hidden)
        self.router = nn.Parameter(torch.empty(num_routers * d_model, num_experts, **factory))
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, dim_feedforward, **factory))
        self.b1 = nn.Parameter(torch.empty(num_experts, dim_feedforward, **factory)) if bias else None
        self.w2 = nn.Parameter(torch.empty(num_experts, dim_feedforward, d_model, **factory))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_router(self.router, fan_in=self.d_model)
        init_experts_like_linear(self.w1, self.b1, self.d_model)
        init_experts_like_linear(self.w2, self.b2, self.dim_feedforward)

    def forward(self, x: torch.Tensor, *, token_k: torch.Tensor | None = None,
                router_index: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., d_model) -> (..., d_model): any leading shape, e.g. (T, C), (B, L, C), (C,).

        token_k: optional per-token k, an int32/int64 tensor of shape ``x.shape[:-1]`` with
        values in [1, top_k] (e.g. looked up from each token's modality). None = top_k for all.
        router_index: with num_routers > 1, each token's router (an int tensor of shape
        ``x.shape[:-1]``, e.g. its modality or task): the papers' modality-/task-specific routers.

        Dtypes: the experts run in x's dtype, or under ``torch.autocast`` in the autocast dtype
        (x and the expert weights are cast to it, as autocast does for ``nn.Linear``; the router
        stays in its own dtype, and gating computes in fp32). The output has that dtype.
        """
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"{type(self).__name__}: x must have shape (..., d_model={self.d_model}), "
                             f"got {tuple(x.shape)}")
        leading = x.shape[:-1]
        if token_k is not None:
            if token_k.shape != leading:
                raise ValueError(f"{type(self).__name__}: token_k must have shape x.shape[:-1] = {tuple(leading)}, "
                                 f"got {tuple(token_k.shape)}")
            token_k = token_k.reshape(-1)
        flat = x.reshape(-1, self.d_model)
        router_input = self._router_input(flat, router_index, leading)
        w1, b1, w2, b2 = self.w1, self.b1, self.w2, self.b2
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # sm4's ops are custom ops that autocast does not cast: do what autocast would do for
            # the two linears by hand (fp64 is left alone, as autocast leaves it), then run the op
            # with autocast off, so that the plain-PyTorch matmuls of the reference backend are
            # not autocast either (its router GEMM would run in bf16, its gates come out bf16) and
            # every backend routes in fp32 alike (SM4_SPEC §2).
            dtype = torch.get_autocast_dtype(device_type)
            if flat.dtype != torch.float64:
                flat = flat.to(dtype)
                router_input = None if router_input is None else router_input.to(dtype)
                w1, w2 = w1.to(dtype), w2.to(dtype)
                b1 = None if b1 is None else b1.to(dtype)
                b2 = None if b2 is None else b2.to(dtype)
            with torch.autocast(device_type, enabled=False):
                out = self._moe(flat, w1, b1, w2, b2, token_k, router_input)
        else:
            out = self._moe(flat, w1, b1, w2, b2, token_k, router_input)
        self._record({"ffn": out.routing})
        return out.output.reshape(*leading, self.d_model)

    def _moe(self, flat, w1, b1, w2, b2, token_k, router_input=None):
        m = self.moe
        return ops.moe_ffn(
            flat, self.router, w1, b1, w2, b2, m.top_k, activation=self.activation, token_k=token_k,
            noise_std=m.noise_std, training=self.training, renormalize=m.renormalize,
            recompute_hidden=self.recompute_hidden, router_input=router_input, backend=m.backend,
        )

    @classmethod
    def from_dense(cls, linear1: nn.Linear, linear2: nn.Linear, num_experts: int = 16, top_k: int = 2, **kwargs):
        """Upcycle a dense FFN ``linear2(gelu(linear1(x)))``: every expert a copy of it.

        linear1: ``nn.Linear(C, h)``; linear2: ``nn.Linear(h, C)``. The router is freshly
        initialised; the parameters take linear1's device and dtype. ``kwargs`` are the other
        constructor arguments (activation, noise_std, renormalize, ...). The layer has biases if
        either linear has one (a missing one becomes zeros). With ``num_experts=1`` or
        ``renormalize=True`` its output equals the dense FFN's (the kept gates then sum to 1
        over identical experts); without, each token's output is scaled by its kept gate mass.
        """
        d_model, hidden = linear1.in_features, linear1.out_features
        if (linear2.in_features, linear2.out_features) != (hidden, d_model):
            raise ValueError(f"{cls.__name__}.from_dense: linear2 must be Linear({hidden}, {d_model}) to follow "
                             f"linear1 = Linear({d_model}, {hidden}), got Linear({linear2.in_features}, "
                             f"{linear2.out_features})")
        bias = linear1.bias is not None or linear2.bias is not None
        kwargs.setdefault("device", linear1.weight.device)
        kwargs.setdefault("dtype", linear1.weight.dtype)
        layer = cls(d_model, hidden, num_experts, top_k, bias=bias, **kwargs)
        with torch.no_grad():
            layer.w1.copy_(linear1.weight.t().expand_as(layer.w1))
            layer.w2.copy_(linear2.weight.t().expand_as(layer.w2))
            if bias:
                for expert_bias, dense in ((layer.b1, linear1), (layer.b2, linear2)):
                    if dense.bias is None:
                        expert_bias.zero_()
                    else:
                        expert_bias.copy_(dense.bias.expand_as(expert_bias))
        return layer

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, dim_feedforward={self.dim_feedforward}, activation={self.activation!r}, "
                f"bias={self.b1 is not None}, {super().extra_repr()}"
                + (", recompute_hidden=True" if self.recompute_hidden else "")
                + (f", backend={self.moe.backend!r}" if self.moe.backend is not None else ""))
