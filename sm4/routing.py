"""Pieces of top-k gating shared by the kernel backends (cpu, cuda, triton).

Each backend provides two ops with one contract (see csrc/sm4_ops.cpp):
``topk_gating_forward`` (fused routing, returning gates, ids, entropy, importance, load, counts,
and for the backward the runner-up expert and the clean logits) and ``topk_gating_backward``
(d loss / d logits, from the saved logits). This module wraps such a
pair into the public ``topk_gating``: it draws the noise (``reference.router_noise``, so every
backend sees the same noise), registers the autograd formula once for every backend, and runs the
tiny finishing step (the two CV² terms) in PyTorch.
"""

import math

import torch

from . import reference
from ._double_backward import refuse_double_backward
from .types import RoutingResult


def register_gating(forward_name: str, backward_name: str, backward_op):
    """Register fake kernels and autograd for a (forward, backward) op pair of any backend.

    forward_name / backward_name: qualified op names ("sm4::..."); backward_op: the callable
    backward op (``torch.ops.sm4.<name>`` or a ``custom_op``).
    """

    @torch.library.register_fake(forward_name)
    def _forward_fake(x, router_weight, noise, token_k, k, sigma, renormalize):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        tokens, experts = x.shape[0], router_weight.shape[1]
        return (
            x.new_empty((tokens, k), dtype=acc),  # gates
            x.new_empty((tokens, k), dtype=torch.int64),  # expert_ids
            x.new_empty((tokens,), dtype=acc),  # entropy
            x.new_empty((experts,), dtype=acc),  # importance
            x.new_empty((experts,), dtype=acc),  # load
            x.new_empty((experts,), dtype=torch.int64),  # expert_counts
            x.new_empty((tokens,), dtype=torch.int64),  # runner_up
            x.new_empty((tokens, experts), dtype=acc),  # logits
        )

    @torch.library.register_fake(backward_name)
    def _backward_fake(grad_gates, grad_importance, grad_load, logits, noise, expert_ids, runner_up, sigma, renormalize):
        return torch.empty_like(logits)

    def setup_context(ctx, inputs, output):
        x, router_weight, noise, _token_k, _k, sigma, renormalize = inputs
        gates, expert_ids, _entropy, _importance, _load, _counts, runner_up, logits = output
        ctx.save_for_backward(x, router_weight, noise, expert_ids, gates, runner_up, logits)
        ctx.sigma, ctx.renormalize = sigma, renormalize
        # Outputs without a gradient (ids, entropy, counts, runner_up, logits; often importance and
        # load) reach the backward as None, not as zero tensors: materialising them cost seven
        # zero-fills per call, the (T, E) logits one alone about as much as the backward kernel.
        ctx.set_materialize_grads(False)

    def backward(ctx, d_gates, _d_ids, _d_entropy, d_importance, d_load, _d_counts, _d_runner, _d_logits):
        refuse_double_backward(f"sm4 topk_gating ({forward_name})")
        x, router_weight, noise, expert_ids, gates, runner_up, logits = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            experts = router_weight.shape[1]
            d_gates = torch.zeros_like(gates) if d_gates is None else d_gates
            d_importance = gates.new_zeros(experts) if d_importance is None else d_importance
            d_load = gates.new_zeros(experts) if d_load is None else d_load
            grad_logits = backward_op(
                d_gates, d_importance, d_load, logits, noise, expert_ids, runner_up, ctx.sigma, ctx.renormalize
            )
            grad_x, grad_weight = logits_grad_to_inputs(grad_logits, x, router_weight, gates, ctx.needs_input_grad)
        return grad_x, grad_weight, None, None, None, None, None

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


def logits_grad_to_inputs(grad_logits, x, router_weight, gates, needs_input_grad):
    """grad_x = grad_logits @ W^T and grad_W = x^T @ grad_logits (the two router GEMMs).

    Rows of x of non-finite tokens (NaN gates) are zeroed first: their grad_logits rows are 0, but
    NaN * 0 would still spread NaN into every router weight.
    """
    acc = grad_logits.dtype
    grad_x = grad_weight = None
    if needs_input_grad[0]:
        grad_x = (grad_logits @ router_weight.to(acc).t()).to(x.dtype)
    if needs_input_grad[1]:
        x_acc = x.to(acc)
        # Copying x to zero bad rows costs as much as the GEMM; on plain CPU tensors, where reading
        # a value is free, skip the copy when every token is finite: gates lie in [0, 1] or are NaN,
        # so their sum is NaN exactly when some token is bad (one reduction and a read, a third of
        # the cost of isnan + all). GPU tensors (a read would be a host sync) and traced ones (fake /
        # functional subclasses, no data) always mask.
        eager_cpu = x.device.type == "cpu" and type(gates) is torch.Tensor and not torch.compiler.is_compiling()
        if not eager_cpu or math.isnan(float(gates.sum())):
            finite = ~torch.isnan(gates[:, :1])  # rank 0 is always active: NaN there marks a bad token
            x_acc = torch.where(finite, x_acc, 0.0)
        grad_weight = (x_acc.t() @ grad_logits).to(router_weight.dtype)
    return grad_x, grad_weight


def _cv_terms(importance: torch.Tensor, load: torch.Tensor):
    """values (2, E) = the stack, their means (2,), mean^2 + eps (2,) and CV^2 (2,)."""
    values = torch.stack((importance, load))
    var, mean = torch.var_mean(values, dim=1, correction=1)
    denominator = mean.square().add_(reference.CV_EPS)
    return values, mean, denominator, var / denominator


class BalanceTerms(torch.autograd.Function):
    """CV^2(importance) and CV^2(load) (``reference.cv_squared`` of each) in one autograd node.

    The finishing step of every kernel backend. Same values as the reference; the backward is the
    closed form, d CV^2 / d v_i = (2 (v_i - m) / (E - 1) - CV^2 * 2 m / E) / (m^2 + eps), a few
    ops on a (2, E) stack instead of autograd through var, mean, pow, add and div for each term
    (on a CPU, where each small op costs microseconds, that halves the cost of the step).
    importance, load: (E,) float, E >= 2. Returns two 0-dim tensors.
    """

    @staticmethod
    def forward(ctx, importance, load):
        values, mean, denominator, cv = _cv_terms(importance, load)
        ctx.save_for_backward(values, mean, denominator, cv)
        return cv[0], cv[1]

    @staticmethod
    def backward(ctx, d_importance_cv, d_load_cv):
        # The saved statistics are detached: no second derivative (nor has the gating op below it).
        refuse_double_backward("sm4 topk_gating's balancing loss (kernel backends)")
        values, mean, denominator, cv = ctx.saved_tensors
        experts = values.shape[1]
        scale = (torch.stack((d_importance_cv, d_load_cv)) / denominator)[:, None]
        grad = scale * ((2.0 / (experts - 1)) * (values - mean[:, None]) - (2.0 / experts) * (cv * mean)[:, None])
        return grad[0], grad[1]


def balance_terms(importance: torch.Tensor, load: torch.Tensor):
    """(CV^2(importance), CV^2(load)); see BalanceTerms. E = 1 is trivially balanced (zeros).

    When no gradient is wanted (inference, no_grad, frozen router) the same values are computed
    without the autograd.Function: its apply, context and saved tensors cost as much as the few
    ops themselves on a CPU.
    """
    if importance.shape[0] < 2:
        return reference.cv_squared(importance), reference.cv_squared(load)
    if not (torch.is_grad_enabled() and (importance.requires_grad or load.requires_grad)):
        cv = _cv_terms(importance, load)[3]
        return cv[0], cv[1]
    return BalanceTerms.apply(importance, load)


def _needs_graph(x: torch.Tensor, router_weight: torch.Tensor) -> bool:
    """Whether the gating must go through autograd: grad mode on and an input that wants a
    gradient, or a torch.compile trace (which keeps the plain dispatch path)."""
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or router_weight.requires_grad)
    return wants_grad or torch.compiler.is_compiling()


def make_topk_gating(forward_op):
    """The public topk_gating (same arguments as reference.topk_gating) on a fused forward op."""

    def topk_gating(x, router_weight, k, token_k=None, noise_std=1.0, training=False, renormalize=False, generator=None, noise=None):
        experts = router_weight.shape[1]
        sigma = noise_std / experts if training else 0.0
        if sigma > 0 and noise is None:
            noise = reference.router_noise(x.shape[0], experts, x.device, generator)
        if sigma == 0:
            noise = None
        args = (x, router_weight, noise, token_k, k, float(sigma), renormalize)
        if _needs_graph(x, router_weight):
            gates, ids, entropy, importance, load, counts, _runner_up, _logits = forward_op(*args)
        else:
            # No gradient will flow: call the kernel below the autograd key, skipping the autograd
            # wrapper that register_autograd puts around it (an autograd.Function apply per call).
            with torch._C._AutoDispatchBelowAutograd():
                gates, ids, entropy, importance, load, counts, _runner_up, _logits = forward_op(*args)
        importance_loss, load_loss = balance_terms(importance, load)
        return RoutingResult(
            expert_ids=ids,
            gates=gates,
            entropy=entropy.detach(),
            expert_counts=counts,
            importance=importance,
            load=load,
            importance_loss=importance_loss,
            load_loss=load_loss,
        )

    return topk_gating
