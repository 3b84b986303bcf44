"""Python side of the compiled permutation ops: fake kernels, autograd, and the backend entry points
with the ``sm4.ops`` signatures (``routing_metadata``, ``permute``, ``unpermute``)."""

import torch

from .._double_backward import differentiable_permute_backward, differentiable_unpermute_backward
from ..types import RoutingMetadata


@torch.library.register_fake("sm4::routing_metadata")
def _routing_metadata_fake(expert_ids, num_experts):
    tokens, k = expert_ids.shape
    flat = tokens * k
    return (
        expert_ids.new_empty((num_experts,), dtype=torch.int64),
        expert_ids.new_empty((num_experts + 1,), dtype=torch.int64),
        expert_ids.new_empty((flat,), dtype=torch.int64),
        expert_ids.new_empty((flat,), dtype=torch.int64),
        expert_ids.new_empty((tokens, k), dtype=torch.int64),
    )


@torch.library.register_fake("sm4::permute")
def _permute_fake(x, assignment_row, expert_offsets):
    return x.new_empty((assignment_row.shape[0] * assignment_row.shape[1], x.shape[1]))


@torch.library.register_fake("sm4::permute_backward")
def _permute_backward_fake(grad_sorted, assignment_row):
    return grad_sorted.new_empty((assignment_row.shape[0], grad_sorted.shape[1]))


@torch.library.register_fake("sm4::unpermute")
def _unpermute_fake(y_sorted, gates, assignment_row):
    return y_sorted.new_empty((assignment_row.shape[0], y_sorted.shape[1]))


@torch.library.register_fake("sm4::unpermute_backward")
def _unpermute_backward_fake(grad_y, y_sorted, gates, assignment_row):
    return torch.empty_like(y_sorted), torch.empty_like(gates)


def _permute_setup(ctx, inputs, output):
    _x, assignment_row, _offsets = inputs
    ctx.save_for_backward(assignment_row)


# Under create_graph=True (grad mode on in a backward) both backwards run as differentiable
# PyTorch ops instead of the kernels: exact second derivatives (see sm4._double_backward).
def _permute_backward(ctx, grad):
    (assignment_row,) = ctx.saved_tensors
    if torch.is_grad_enabled():
        return differentiable_permute_backward(grad, assignment_row), None, None
    return torch.ops.sm4.permute_backward(grad.contiguous(), assignment_row), None, None


def _unpermute_setup(ctx, inputs, output):
    y_sorted, gates, assignment_row = inputs
    ctx.save_for_backward(y_sorted, gates, assignment_row)


def _unpermute_backward(ctx, grad_y):
    y_sorted, gates, assignment_row = ctx.saved_tensors
    if torch.is_grad_enabled():
        return (*differentiable_unpermute_backward(grad_y, y_sorted, gates, assignment_row), None)
    grad_sorted, grad_gates = torch.ops.sm4.unpermute_backward(grad_y.contiguous(), y_sorted, gates, assignment_row)
    return grad_sorted, grad_gates, None


torch.library.register_autograd("sm4::permute", _permute_backward, setup_context=_permute_setup)
torch.library.register_autograd("sm4::unpermute", _unpermute_backward, setup_context=_unpermute_setup)


def routing_metadata(expert_ids: torch.Tensor, num_experts: int) -> RoutingMetadata:
    return RoutingMetadata(*torch.ops.sm4.routing_metadata(expert_ids, num_experts))


def permute(x: torch.Tensor, metadata: RoutingMetadata) -> torch.Tensor:
    return torch.ops.sm4.permute(x, metadata.assignment_row, metadata.expert_offsets)


def unpermute(y_sorted: torch.Tensor, gates: torch.Tensor, metadata: RoutingMetadata) -> torch.Tensor:
    return torch.ops.sm4.unpermute(y_sorted, gates, metadata.assignment_row)
