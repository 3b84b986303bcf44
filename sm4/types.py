"""The structured results that the ops return.

Both are ``NamedTuple`` s, so they unpack like tuples, print readably, and pass through
``torch.compile`` and ``torch.utils._pytree`` as ordinary containers.
"""

from typing import NamedTuple

import torch


class RoutingResult(NamedTuple):
    """What top-k gating decides for a batch of ``T`` tokens over ``E`` experts.

    ``k_max`` is the ``k`` passed to the op; with a per-token k, ranks ``>= k_t`` of token ``t``
    are *inactive*: their id is ``-1`` and their gate ``0``.

    Fields (``fp`` is float32, or float64 when the input is float64):
        expert_ids:   (T, k_max) int64. Experts by decreasing noisy logit, ties to the lower
                      index; ``-1`` for inactive ranks.
        gates:        (T, k_max) fp. Softmax probability of the noisy logits at each selected
                      expert (renormalised over the active ranks if asked); 0 for inactive ranks;
                      NaN for every active rank of a token whose logits are not finite.
        entropy:      (T,) fp. ``-sum_e p_e log p_e`` of the clean softmax; a statistic, not
                      differentiated. NaN for a token whose logits are not finite.
        expert_counts:(E,) int64. Active assignments per expert (all tokens).
        importance:   (E,) fp. ``sum_t p_e(t)`` of the clean softmax over the finite tokens.
        load:         (E,) fp. Smooth estimate of the number of finite tokens routed to each
                      expert (hard counts when the noise std is 0, e.g. at evaluation).
        importance_loss: () fp. ``CV^2(importance)``.
        load_loss:    () fp. ``CV^2(load)``.
    """

    expert_ids: torch.Tensor
    gates: torch.Tensor
    entropy: torch.Tensor
    expert_counts: torch.Tensor
    importance: torch.Tensor
    load: torch.Tensor
    importance_loss: torch.Tensor
    load_loss: torch.Tensor

    def balance_loss(self, weight: float) -> torch.Tensor:
        """The auxiliary load-balancing loss ``weight * (CV^2(importance) + CV^2(load))``."""
        return weight * (self.importance_loss + self.load_loss)


class RoutingMetadata(NamedTuple):
    """Where each assignment goes when the tokens are laid out in expert order.

    There are ``N = T * k_max`` rows in expert order, sized for the worst case so no size has to
    reach the host. The first ``A = expert_offsets[-1]`` rows are the active assignments, expert by
    expert, and within an expert by (token, rank): the order is stable. Rows ``A..N`` are padding;
    ops write zeros there.

    Fields:
        expert_counts:     (E,) int64. Rows of each expert.
        expert_offsets:    (E + 1,) int64. Expert ``e`` owns rows ``offsets[e]:offsets[e+1]``.
        sorted_assignment: (N,) int64. Flat assignment index ``t * k_max + r`` held by each row.
        sorted_token:      (N,) int64. Token of each row (``sorted_assignment // k_max``); the
                           gather index of ``permute``.
        assignment_row:    (T, k_max) int64. Row of each assignment, ``-1`` if inactive; the
                           inverse of ``sorted_assignment`` on the active assignments.
    """

    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_assignment: torch.Tensor
    sorted_token: torch.Tensor
    assignment_row: torch.Tensor


class MoEOutput(NamedTuple):
    """Output of the composite MoE ops: ``output`` (T, d_out) in x's dtype, and the routing."""

    output: torch.Tensor
    routing: RoutingResult
