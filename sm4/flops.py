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
    _register_cpu_attention()
    pairs = [("grouped_mm", _grouped_mm_flops), ("grouped_weight_grad", _grouped_weight_grad_flops),
             ("topk_gating_forward", _gating_forward_flops)]
    for name, formula in pairs:
        for qualified in (name, f"triton_{name}"):
            packet = getattr(torch.ops.sm4, qualified, None) if _has_op(qualified) else None
            if packet is not None:
                register_flop_formula(packet, get_raw=True)(formula)


def _cpu_flash_attention_flops(query, key, value, *args, out_shape=None, **kwargs):
    """query, key, value: the shapes (torch passes shapes to formulas without get_raw)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)  # the registry passes shapes


def _register_cpu_attention() -> None:
    """torch's counter knows the CUDA SDPA kernels but not the CPU flash one (which CPU SDPA
    dispatches to): without this, attention is silently absent from CPU counts."""
    from torch.utils.flop_counter import flop_registry

    packet = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if packet is not None and packet not in flop_registry:
        register_flop_formula(packet)(_cpu_flash_attention_flops)


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


# The papers' convention (thop / fvcore style): multiply-accumulates of the linear layers (dense
# GEMMs, sm4's grouped GEMMs over the rows that run, the router GEMMs) and of the norm layers (one
# per element: the affine scale and shift); attention's score and value products (bmm, SDPA) and
# element-wise ops are not counted.
_LINEAR_OPS = ("mm", "addmm", "grouped_mm", "triton_grouped_mm", "topk_gating_forward", "triton_topk_gating_forward")
_NORMS = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.GroupNorm)


def count_macs(model: torch.nn.Module, *args, **kwargs) -> int:
    """Multiply-accumulates of ``model(*args, **kwargs)`` in the papers' convention (see above):
    torch's flop counter's linear-layer ops / 2, plus one per element of every norm layer's input."""
    register_formulas()
    norm_macs = []

    def count_norm(module, inputs, output):
        norm_macs.append(inputs[0].numel())

    hooks = [m.register_forward_hook(count_norm) for m in model.modules() if isinstance(m, _NORMS)]
    try:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    counts = counter.get_flop_counts()["Global"]
    linear = sum(count for op, count in counts.items() if _op_name(op) in _LINEAR_OPS)
    return linear // 2 + sum(norm_macs)


def _op_name(op) -> str:
    """aten.addmm.default / sm4.grouped_mm -> 'addmm' / 'grouped_mm'."""
    return str(op).split("::")[-1].split(".")[-2 if str(op).count(".") >= 2 else -1]
