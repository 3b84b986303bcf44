"""A per-token gradient scale: identity forward, gradient times a per-token weight backward
(ALP's "gradient" mode). Works under ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import torch

from ._state import _check_modality_ids


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a per-token weight (no grad for it)."""

    @staticmethod
    def forward(x, weight):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        # multiply in at least fp32, round once to the gradient's dtype (bf16/fp16 stay exact-ish)
        compute = torch.promote_types(grad.dtype, torch.float32)
        scaled = grad.to(compute) * weight.to(compute).unsqueeze(-1)
        return scaled.to(grad.dtype), None


def scale_gradient(x: torch.Tensor, token_weight: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; in the backward pass ``grad_x = grad * token_weight[..., None]``.

    x: ``(..., T, C)`` (or ``(T, C)``), any floating dtype. token_weight: floating tensor
    broadcastable to ``x.shape[:-1]`` (one weight per token, or a scalar); it gets no gradient.
    Returns ``x`` itself when autograd would not track the result (no grad mode, or ``x`` does not
    require grad). Works under ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("scale_gradient: x must be a floating-point tensor of shape (..., T, C)")
    if not isinstance(token_weight, torch.Tensor):
        token_weight = torch.as_tensor(token_weight, dtype=torch.float32, device=x.device)
    if not token_weight.is_floating_point():
        raise TypeError(f"scale_gradient: token_weight must be a floating-point tensor, got {token_weight.dtype}")
    token_dims = x.shape[:-1]
    try:
        ok = torch.broadcast_shapes(token_weight.shape, token_dims) == token_dims
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"scale_gradient: token_weight of shape {tuple(token_weight.shape)} does not broadcast to "
            f"x's token dims {tuple(token_dims)}"
        )
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ScaleGradient.apply(x, token_weight.detach())


def modality_gradient_scale(x: torch.Tensor, modality_ids: torch.Tensor, weights_tensor: torch.Tensor) -> torch.Tensor:
    """``scale_gradient`` with each token's weight looked up from its modality.

    x: ``(..., T, C)``; modality_ids: int tensor broadcastable to ``x.shape[:-1]`` (values in
    ``[0, M)``); weights_tensor: ``(M,)`` per-modality weights (e.g. ``alp.weight_tensor(device)``),
    moved to ``x``'s device if needed. No host sync.
    """
    _check_modality_ids(modality_ids, "modality_gradient_scale")
    if not isinstance(weights_tensor, torch.Tensor) or weights_tensor.dim() != 1:
        raise ValueError("modality_gradient_scale: weights_tensor must be a (M,) tensor")
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad):
        return x
    table = weights_tensor.detach().to(device=x.device)
    ids = modality_ids.to(device=x.device)
    token_weight = table.index_select(0, ids.reshape(-1).long()).reshape(ids.shape)
    return scale_gradient(x, token_weight)
