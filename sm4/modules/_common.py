"""What every sparse MoE module shares: the balancing loss and routing statistics it keeps after
each forward, ``collect_aux_loss``, the MoE keyword arguments, and parameter initialisation.

The modules keep ``nn.Module``'s signatures (so they drop in where the dense layers go), which
leaves no place to return the balancing loss: each forward stores it on the module instead
(``module.aux_loss``, a differentiable scalar) and ``sm4.collect_aux_loss(model)`` sums it over a
model. Routing statistics of the last forward are kept detached (``module.routing_stats``) for
the training loop (AEA/ALP need per-modality entropy) and for plots.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..routing import balance_terms
from ..types import RoutingResult
from . import batch_share
from ._mha_compat import jit_script_refusal


@dataclass(frozen=True)
class MoEConfig:
    """The MoE keywords every sparse module takes (SM4_SPEC §2).

    num_experts: E, experts per group. top_k: k_max, experts per token (1 <= top_k <= E).
    noise_std: router noise scale (std noise_std / E, training only). renormalize: rescale the
    kept gates to sum to 1 (off in the papers). balance_loss_weight: w in
    ``w * (CV^2(importance) + CV^2(load))`` (0.05 is the papers' medium setting).
    backend: force an sm4 backend for this module ("reference", "cpu", ...; None = automatic).
    """

    num_experts: int = 16
    top_k: int = 2
    noise_std: float = 1.0
    renormalize: bool = False
    balance_loss_weight: float = 0.05
    backend: str | None = None

    def validate(self, owner: str):
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
        if self.num_experts < 1:
            raise ValueError(f"{owner}: num_experts must be a positive int, got {self.num_experts!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{owner}: top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if not self.noise_std >= 0:
            raise ValueError(f"{owner}: noise_std must be >= 0, got {self.noise_std!r}")
        if not self.balance_loss_weight >= 0:
            raise ValueError(f"{owner}: balance_loss_weight must be >= 0, got {self.balance_loss_weight!r}")


class SparseMoEModule(nn.Module):
    """Base of the sparse modules: keeps the last forward's balancing loss and routing statistics.

    Attributes after a forward:
        aux_loss: () tensor, ``balance_loss_weight * sum over this module's routers of
            (CV^2(importance) + CV^2(load))``, differentiable; None before the first forward.
            Each forward replaces it, so it holds at most the last forward's graph (already
            freed by that step's backward, and none under torch.no_grad); copies and pickles of
            the module start with None.
        routing_stats: {router name: {"expert_counts": (E,) int64, "expert_ids": (T, k) int64
            (-1 = inactive rank), "entropy": (T,) per-token routing entropy, "load": (E,),
            "importance": (E,)}}, detached.
    """

    def __init__(self, config: MoEConfig, num_routers: int = 1):
        super().__init__()
        config.validate(type(self).__name__)
        if isinstance(num_routers, bool) or not isinstance(num_routers, int) or num_routers < 1:
            raise ValueError(f"{type(self).__name__}: num_routers must be a positive int, got {num_routers!r}")
        self.moe = config
        # num_routers > 1: each router group holds one router per token kind (modality or task)
        # over the same experts; forward's router_index says which router each token uses.
        self.num_routers = num_routers
        self.aux_loss: torch.Tensor | None = None
        self.routing_stats: dict[str, dict[str, torch.Tensor]] = {}

    def _router_input(self, flat: torch.Tensor, router_index: torch.Tensor | None, leading, name="router_index"):
        """The gating input for per-kind routers (see sm4.ops.router_input_for), None with one router.

        flat: (T, d) tokens; router_index: int tensor of shape ``leading`` (the tokens' shape)."""
        if self.num_routers == 1:
            return None
        if router_index is None:
            raise ValueError(f"{type(self).__name__} has num_routers={self.num_routers}: pass {name} (got None), "
                             "each token's router (e.g. its modality or task index)")
        if router_index.is_floating_point() or router_index.dtype == torch.bool:
            raise TypeError(f"{type(self).__name__}: {name} must be an int tensor, got {router_index.dtype}")
        if tuple(router_index.shape) != tuple(leading):
            raise ValueError(f"{type(self).__name__}: {name} must have shape {tuple(leading)} (the tokens' shape), "
                             f"got {tuple(router_index.shape)}")
        return ops.router_input_for(flat, router_index.reshape(-1), self.num_routers)

    def _record(self, routings: dict[str, RoutingResult]) -> None:
        loss = None
        for routing in routings.values():
            term = _balance_loss(routing, self.moe.balance_loss_weight)
            loss = term if loss is None else loss + term
        self.aux_loss = loss
        self.routing_stats = {
            name: {
                "expert_counts": r.expert_counts.detach(),
                "expert_ids": r.expert_ids.detach(),
                "entropy": r.entropy.detach(),
                "load": r.load.detach(),
                "importance": r.importance.detach(),
            }
            for name, r in routings.items()
        }

    # The kept statistics belong to the last forward, not to the module's state: a copy
    # (copy.deepcopy, nn.TransformerEncoder(layer, N), pickling, torch.save(model)) starts without
    # them. aux_loss is a non-leaf tensor holding that forward's graph, which deepcopy cannot copy
    # and a checkpoint must not carry. (Neither is ever in the state_dict: they are no buffers.)
    _TRANSIENT = {"aux_loss": None, "routing_stats": {}}

    def __getstate__(self):
        state = super().__getstate__()
        for name, empty in self._TRANSIENT.items():
            state[name] = type(empty)() if isinstance(empty, dict) else empty
        return state

    def __prepare_scriptable__(self):
        raise jit_script_refusal(self)

    def extra_repr(self) -> str:
        m = self.moe
        return f"num_experts={m.num_experts}, top_k={m.top_k}, noise_std={m.noise_std}, renormalize={m.renormalize}"


def _balance_loss(routing: RoutingResult, weight: float) -> torch.Tensor:
    """``weight * (CV^2(importance) + CV^2(load))`` of the whole batch: inside a data-parallel
    share (``batch_share``) importance and load are first summed over the processes, so the CV^2
    is the single-process one (each process holds the same loss; see sm4.training.distributed)."""
    share = batch_share.current()
    if share is None or share.reduce is None or weight == 0:
        return routing.balance_loss(weight)
    importance, load = batch_share.all_sum(torch.stack((routing.importance, routing.load))).unbind(0)
    importance_loss, load_loss = balance_terms(importance, load)
    return weight * (importance_loss + load_loss)


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the balancing losses the sparse modules of ``model`` kept at their last forward.

    A differentiable scalar (on the device of the first loss found); 0 when no sparse module has run.
    """
    losses = [m.aux_loss for m in model.modules() if isinstance(m, SparseMoEModule) and m.aux_loss is not None]
    if not losses:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=parameter.device if parameter is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


def init_experts_like_linear(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    """Each expert initialised as ``nn.Linear`` would be (kaiming-uniform(a=sqrt(5)) weights, uniform bias)."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound)  # = kaiming_uniform_(a=sqrt(5)) for a (fan_in, out) matrix
        if bias is not None:
            bias.uniform_(-bound, bound)


def init_router(router: torch.Tensor, fan_in: int | None = None) -> None:
    """Router weights (d, E) (or stacked per-kind routers (R * d, E) with fan_in = d): small
    normal, so initial routing is near uniform but not tied."""
    fan_in = router.shape[-2] if fan_in is None else fan_in
    with torch.no_grad():
        router.normal_(0.0, 1.0 / math.sqrt(fan_in) if fan_in else 1.0)


def set_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Run every sparse module of ``model`` on ``backend`` ("reference", "cpu", "cuda", "triton",
    or None for automatic dispatch). Returns the model. (``with sm4.use_backend(name):`` does the
    same for a block of code, for modules whose backend is None.)"""
    from dataclasses import replace

    from ..dispatch import _check_name

    if backend is not None:
        _check_name(backend, "sm4.set_backend")
    for module in model.modules():
        if isinstance(module, SparseMoEModule):
            module.moe = replace(module.moe, backend=backend)
    return model
