"""What code written for ``nn.MultiheadAttention`` expects of a module in its place.

* Exceptions that are both what torch raises for a mistake (``AssertionError`` from its shape
  checks, ``RuntimeError`` from its mask-shape checks) and what sm4 raises (``ValueError`` /
  ``TypeError`` naming the argument), so ``except AssertionError`` written against torch and
  ``except ValueError`` written against sm4 both keep working.
* ``NO_PACKED_PROJECTION``: the value of ``in_proj_weight``. torch's encoder reads that attribute
  in its inference fast-path checks; a tensor with ``__torch_function__`` makes those checks
  decline ("some Tensor argument has_torch_function") instead of crashing on None or running
  the dense fused kernel on weights that do not exist; any real use of it raises.
* Nested-tensor input (what ``nn.TransformerEncoder`` makes from a padding mask): to padded
  tensors plus a padding mask, and the output back to the query's nested layout.
"""

import torch


class AttentionValueError(ValueError, AssertionError):
    """A bad shape or value where ``nn.MultiheadAttention`` raises ``AssertionError``."""


class AttentionTypeError(TypeError, AssertionError):
    """A bad dtype where ``nn.MultiheadAttention`` raises ``AssertionError`` (e.g. a uint8 mask)."""


class AttentionRuntimeError(ValueError, RuntimeError):
    """A bad shape or value where ``nn.MultiheadAttention`` raises ``RuntimeError`` (mask shapes,
    is_causal without a mask, mismatched batch or feature sizes)."""


class RuntimeTypeError(TypeError, RuntimeError):
    """A bad dtype where torch's layers raise ``RuntimeError`` (e.g. an integer src into LayerNorm)."""


def jit_script_refusal(module) -> RuntimeError:
    """The error of ``torch.jit.script`` on an sm4 module (raised from ``__prepare_scriptable__``)."""
    return RuntimeError(
        f"torch.jit.script does not support {type(module).__name__}: its experts run as torch.library custom ops "
        "chosen by Python dispatch, which TorchScript cannot compile. Use torch.compile(model) (fullgraph works) "
        "or torch.export.export(model, args) (eval) instead."
    )


class _NoPackedProjection(torch.Tensor):
    """An empty tensor standing for a packed Q/K/V projection that does not exist."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__repr__:
            return "SparseMoEAttention.in_proj_weight (none: the Q/K/V projections are mixtures of experts)"
        if getattr(func, "__name__", None) == "__get__":  # attribute reads (.shape, .requires_grad, ...)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise TypeError(
            "SparseMoEAttention has no packed in_proj_weight: its Q/K/V projections are mixtures of linear experts "
            "(parameters routers / expert_weight / expert_bias, or {q,k,v}_router / {q,k,v}_expert_weight, and "
            "{q,k,v}_proj_weight for dense ones). in_proj_weight exists only so that torch's fast-path checks, "
            f"which read it, decline; it cannot be used ({getattr(func, '__name__', func)} was called on it)."
        )


NO_PACKED_PROJECTION = torch.Tensor._make_subclass(_NoPackedProjection, torch.empty(0), False)


def unnest(tensor: torch.Tensor, name: str):
    """A nested (N, ragged L, C) tensor -> (padded (N, L_max, C) with zeros, lengths list[int]).

    Strided and jagged layouts both work; a plain tensor comes back as (tensor, None)."""
    if not tensor.is_nested:
        return tensor, None
    if tensor.dim() != 3:
        raise AttentionValueError(f"a nested {name} must be (N, ragged L, C), got a {tensor.dim()}-D nested tensor")
    lengths = [part.shape[0] for part in tensor.unbind()]
    return torch.nested.to_padded_tensor(tensor, 0.0), lengths


def padding_mask(lengths, max_length: int, device) -> torch.Tensor:
    """(N, max_length) bool, True past each sequence's length (= padding, as key_padding_mask)."""
    return torch.arange(max_length, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]


def renest(padded: torch.Tensor, lengths, like: torch.Tensor) -> torch.Tensor:
    """(N, L_max, C) -> a nested tensor of the given lengths, in ``like``'s layout (differentiable)."""
    return torch.nested.as_nested_tensor([padded[i, :length] for i, length in enumerate(lengths)], layout=like.layout)
