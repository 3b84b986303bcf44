"""FLOP formulas of sm4's custom ops for ``torch.utils.flop_counter.FlopCounterMode``, and
``count_flops`` (useful FLOPs of one call, e.g. a model's inference per task).

torch counts its own ops (matmuls, SDPA); the custom ops need formulas. The grouped GEMMs count
the rows that are active (``expert_offsets[-1]``: only the experts that run), which needs the
offsets' value, so the formulas take the raw arguments (a host read, only while counting).
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_registered = False


def _active_rows(expert_offsets) -> int:
    return int(expert_offsets[-1]) if expert_offsets.numel() else 0


def _grouped_mm_flops(a, weight, bias, expert_offsets, gather_index=None, scatter_index=None, scatter_scale=None,
                      num_out_rows=None, transpose_weight=False, activation=0, save_preact=False, *args, out_val=None, **kwargs):
    in_features = weight.shape[2] if transpose_weight else weight.shape[1]
    out_features = weight.shape[1] if transpose_weight else weight.shape[2]
    return 2 * _active_rows(expert_offsets) * in_features * out_features


def _grouped_weight_grad_flops(a, grad, expert_offsets, *args, out_val=None, **kwargs):
    return 2 * _active_rows(expert_offsets) * a.shape[1] * grad.shape[1]


def _gating_forward_flops(x, router_weight, *args, out_val=None, **kwargs):
    return 2 * x.shape[0] * x.shape[1] * router_weight.shape[1]  # the router GEMM


def register_formulas() -> None:
    """Register the formulas once (for the compiled ops and the Triton ones that exist)."""
    global _registered
    if _registered:
        return
    _registered = True
    pairs = [("grouped_mm", _grouped_mm_flops), ("grouped_weight_grad", _grouped_weight_grad_flops),
             ("topk_gating_forward", _gating_forward_flops)]
    for name, formula in pairs:
        for qualified in (name, f"triton_{name}"):
            packet = getattr(torch.ops.sm4, qualified, None) if _has_op(qualified) else None
            if packet is not None:
                register_flop_formula(packet, get_raw=True)(formula)


def _has_op(name: str) -> bool:
    return any(n.split("::", 1)[1].split(".", 1)[0] == name
               for n in torch._C._dispatch_get_all_op_names() if n.startswith("sm4::"))


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` as torch's flop counter sees them (sm4 ops included)."""
    register_formulas()
    # Grad mode on: torch's module tracker (inside FlopCounterMode) fails on views of parameters
    # made under no_grad. Nothing runs backward here, so only the forward is counted.
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()
