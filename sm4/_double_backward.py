"""The refusal of a second derivative by a kernel backward that has none.

The compiled backwards (gating, the grouped expert GEMMs) call kernels that autograd cannot see
through: with ``create_graph=True`` (a Hessian-vector product, a gradient penalty, MAML) their
gradients would carry no graph, and the second derivative would come out silently zero. Each such
backward starts with ``refuse_double_backward``, which raises instead. The reference backend is
plain PyTorch, so its second derivatives are exact: that is the way out the error names.

The engine runs a backward with grad mode on exactly when the graph of the gradient is being
recorded (``create_graph=True``); torch.compile traces its backward graphs with grad mode off.
"""

import functools

import torch


@functools.cache
def _error_class() -> type:
    # Built on first use: this module is imported while sm4.dispatch (home of the base class)
    # is still loading the backends, whose backwards import this guard.
    from .dispatch import BackendNotSupportedError

    class DoubleBackwardNotSupportedError(BackendNotSupportedError):
        """A backend's backward cannot be differentiated again (``create_graph=True``); the
        reference backend (``sm4.set_backend(module, "reference")``) can."""

    DoubleBackwardNotSupportedError.__module__ = __name__
    DoubleBackwardNotSupportedError.__qualname__ = "DoubleBackwardNotSupportedError"  # picklable by name
    return DoubleBackwardNotSupportedError


def __getattr__(name: str):
    if name == "DoubleBackwardNotSupportedError":
        return _error_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def refuse_double_backward(op: str) -> None:
    """Raise DoubleBackwardNotSupportedError if this backward is being recorded for a second
    derivative. op: what to name, e.g. "sm4 topk_gating (sm4::topk_gating_forward)"."""
    if torch.is_grad_enabled():
        raise _error_class()(
            f"{op}: this backward is a fused kernel without a second derivative, so it cannot run under "
            "create_graph=True (double backward, Hessian-vector products, gradient penalties, MAML). "
            'Run the sparse modules on the plain-PyTorch backend for that: sm4.set_backend(module, "reference") '
            '(or `with sm4.use_backend("reference"):` around the forward); its second derivatives are exact.'
        )


# permute and unpermute are linear (unpermute in each argument), so their backwards are too, and
# cheap: the compiled backends compute them with kernels, and under create_graph=True with these
# differentiable PyTorch ops (same sums), which gives exact second and higher derivatives.


def _assignment_rows(rows: torch.Tensor, assignment_row: torch.Tensor) -> torch.Tensor:
    """(N, d) rows in expert order -> (T, k, d): the row of each assignment, zero where inactive."""
    return torch.where((assignment_row >= 0)[..., None], rows[assignment_row.clamp_min(0)], 0.0)


def differentiable_permute_backward(grad_sorted: torch.Tensor, assignment_row: torch.Tensor) -> torch.Tensor:
    """permute's backward: grad_x[t] = sum over t's active ranks of grad_sorted[row(t, r)].

    grad_sorted (N, d) float; assignment_row (T, k) int64 (-1 inactive). Returns (T, d)."""
    cdt = torch.promote_types(grad_sorted.dtype, torch.float32)
    return _assignment_rows(grad_sorted.to(cdt), assignment_row).sum(1).to(grad_sorted.dtype)


def differentiable_unpermute_backward(grad_y, y_sorted, gates, assignment_row):
    """unpermute's backward: grad_sorted[row(t, r)] = gates[t, r] * grad_y[t] (padding rows 0)
    and grad_gates[t, r] = y_sorted[row(t, r)] . grad_y[t] (0 where inactive).

    grad_y (T, d), y_sorted (N, d), gates (T, k), assignment_row (T, k). Returns (N, d), (T, k)."""
    cdt = torch.promote_types(y_sorted.dtype, torch.float32)
    rows, dim = y_sorted.shape
    active = assignment_row >= 0
    grad_cdt = grad_y.to(cdt)[:, None, :]
    contributions = torch.where(active[..., None], gates.to(cdt)[..., None] * grad_cdt, 0.0)
    target = torch.where(active, assignment_row, rows).reshape(-1)  # inactive ranks land in a spare row
    grad_sorted = y_sorted.new_zeros((rows + 1, dim), dtype=cdt).index_add(0, target, contributions.reshape(-1, dim))
    grad_gates = (_assignment_rows(y_sorted.to(cdt), assignment_row) * grad_cdt).sum(-1)
    return grad_sorted[:rows].to(y_sorted.dtype), grad_gates.to(gates.dtype)
