"""The checks of ``SM4EncoderLayer.forward``'s arguments, before any submodule runs.

Without them a bad argument surfaces from deep inside: a wrong feature size as LayerNorm's
RuntimeError, a wrong mask as the attention's error naming ``attn_mask`` (not ``src_mask``).
Each error names the layer's own argument with the expected and the received value, and is both
the class torch's ``nn.TransformerEncoderLayer`` raises for that mistake and sm4's
``ValueError`` / ``TypeError`` (see ``_mha_compat``). Shapes and dtypes only: nothing reads tensor
data (token_k's and router_index's values are checked by the ops, on CPU tensors).
"""

import torch

from .._checks import received

from ._mha_compat import AttentionRuntimeError, AttentionTypeError, AttentionValueError, RuntimeTypeError

OWNER = "SM4EncoderLayer"


def _mask_dtype(name: str, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise AttentionTypeError(f"{OWNER}: {name} must be bool (True = not allowed) or floating point (added), "
                                 f"got {mask.dtype}")


def check_forward_arguments(layer, src, src_mask, src_key_padding_mask, is_causal, token_k, router_index) -> None:
    """Raise on the first bad argument of ``layer.forward`` (shapes as documented there)."""
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"{OWNER}: src must be a torch.Tensor, got {received(src)}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"{OWNER}: is_causal must be a bool, got {received(is_causal)}")
    if src.is_nested:  # ragged: the attention checks the nested layout itself
        return
    d_model = layer.norm1.normalized_shape[0]
    order = "(N, L, C)" if layer.self_attn.batch_first else "(L, N, C)"
    if src.dim() not in (2, 3):
        raise AttentionValueError(f"{OWNER}: src must be {order} or unbatched (L, C), got shape {tuple(src.shape)}")
    if src.shape[-1] != d_model:
        raise AttentionRuntimeError(f"{OWNER}: src must have d_model = {d_model} features (last dim), got shape "
                                    f"{tuple(src.shape)}")
    if not src.is_floating_point():
        raise RuntimeTypeError(f"{OWNER}: src must be a floating-point tensor, got {src.dtype}")
    batched = src.dim() == 3
    length = src.shape[1 if batched and layer.self_attn.batch_first else 0]
    batch = src.shape[0 if layer.self_attn.batch_first else 1] if batched else None
    heads = layer.self_attn.num_heads
    if src_mask is not None:
        _mask_dtype("src_mask", src_mask)
        allowed = [(length, length), ((batch if batched else 1) * heads, length, length)]
        if tuple(src_mask.shape) not in allowed:
            raise AttentionRuntimeError(f"{OWNER}: src_mask must have shape {allowed[0]} or {allowed[1]} (L = {length}, "
                                        f"nhead = {heads}), got {tuple(src_mask.shape)}")
    elif is_causal:
        raise AttentionRuntimeError(f"{OWNER}: is_causal=True is a hint about src_mask and needs it, got src_mask=None "
                                    "(nn.Transformer.generate_square_subsequent_mask makes one)")
    if src_key_padding_mask is not None:
        _mask_dtype("src_key_padding_mask", src_key_padding_mask)
        expected = (batch, length) if batched else (length,)
        if tuple(src_key_padding_mask.shape) != expected:
            raise AttentionValueError(f"{OWNER}: src_key_padding_mask must have shape {expected} (N, L), got "
                                      f"{tuple(src_key_padding_mask.shape)}")
    leading = tuple(src.shape[:-1])
    for name, value in (("token_k", token_k), ("router_index", router_index)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{OWNER}: {name} must be a torch.Tensor of shape src.shape[:-1] = {leading}, got "
                            f"{received(value)}")
        if value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OWNER}: {name} must be int32 or int64, got {value.dtype}")
        if tuple(value.shape) != leading:
            raise ValueError(f"{OWNER}: {name} must have shape src.shape[:-1] = {leading}, got {tuple(value.shape)}")
