"""DenseAttention: nn.MultiheadAttention's outputs, parameters, state dict and initialisation, with
dropout drawn per sample inside a data-parallel share and the key bias frozen (exactly zero grad)."""

import pytest
import torch
from torch import nn

from sm4.modules import batch_share
from sm4.modules.dense_attention import DenseAttention


def pair(batch_first=True, dropout=0.0, bias=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=dropout, bias=bias, batch_first=batch_first, dtype=torch.float64)
    torch.manual_seed(0)
    dense = DenseAttention(16, 4, dropout=dropout, bias=bias, batch_first=batch_first, dtype=torch.float64)
    return mha, dense


@pytest.mark.parametrize("bias", [True, False])
def test_same_initialisation_and_state_dict_as_multihead_attention(bias):
    mha, dense = pair(bias=bias)
    expected, got = mha.state_dict(), dense.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    after = []
    for build in (nn.MultiheadAttention, DenseAttention):  # the same number of draws: later modules unchanged
        torch.manual_seed(0)
        build(16, 4, bias=bias)
        after.append(torch.rand(3))
    assert torch.equal(*after)
    # from_multihead copies without drawing from torch's generator
    state = torch.random.get_rng_state()
    copy = DenseAttention.from_multihead(mha)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in expected.items())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "float3d", "unbatched", "cross"])
def test_outputs_equal_multihead_attention(batch_first, need_weights, masks):
    mha, dense = pair(batch_first)
    with torch.no_grad():  # non-zero biases, so the key bias is exercised
        mha.in_proj_bias.normal_()
        dense.in_proj_bias.copy_(mha.in_proj_bias)
    n, length = 3, 5
    x = torch.randn((n, length, 16) if batch_first else (length, n, 16), dtype=torch.float64)
    kwargs = {}
    key = value = x
    if masks == "padding":
        padding = torch.zeros(n, length, dtype=torch.bool)
        padding[0, -2:] = True
        kwargs["key_padding_mask"] = padding
    elif masks == "causal":
        kwargs.update(attn_mask=torch.triu(torch.ones(length, length, dtype=torch.bool), 1), is_causal=True)
    elif masks == "float3d":
        kwargs["attn_mask"] = torch.randn(n * 4, length, length, dtype=torch.float64)
    elif masks == "unbatched":
        x = key = value = torch.randn(length, 16, dtype=torch.float64)
    elif masks == "cross":
        key = value = torch.randn((n, 7, 16) if batch_first else (7, n, 16), dtype=torch.float64)
    expected = mha(x, key, value, need_weights=need_weights, **kwargs)
    got = dense(x, key, value, need_weights=need_weights, **kwargs)
    torch.testing.assert_close(got[0], expected[0])
    if need_weights:
        torch.testing.assert_close(got[1], expected[1])
    else:
        assert got[1] is None


def test_dropout_is_per_sample_inside_a_share_and_the_key_bias_gets_no_gradient():
    _, dense = pair(dropout=0.3)
    with torch.no_grad():
        dense.in_proj_bias.normal_()
    x = torch.randn(5, 6, 16, dtype=torch.float64)
    with batch_share.sharing(key=11, rows=5):
        whole = dense(x, x, x, need_weights=False)[0]
    for index in range(2):  # each process's rows of the batch see the masks they see alone
        part = x[index::2]
        with batch_share.sharing(key=11, rows=5, index=index, world=2):
            torch.testing.assert_close(dense(part, part, part, need_weights=False)[0], whole[index::2],
                                       rtol=0, atol=1e-12)
    with batch_share.sharing(key=12, rows=5):
        assert not torch.allclose(dense(x, x, x, need_weights=False)[0], whole)  # the key seeds the masks
    whole.square().sum().backward()
    grad = dense.in_proj_bias.grad
    assert torch.count_nonzero(grad[16:32]) == 0 and torch.count_nonzero(grad[:16]) > 0
    assert torch.count_nonzero(grad[32:]) > 0


def test_multihead_attention_key_bias_gradient_is_only_rounding():
    """Why the key bias is frozen: torch's module gives it a gradient that is rounding, not zero."""
    mha, _ = pair()
    mha = mha.float()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    x = torch.randn(4, 6, 16)
    mha(x, x, x)[0].square().sum().backward()
    grad = mha.in_proj_bias.grad
    assert 0 < grad[16:32].abs().max() < 1e-4 * grad[:16].abs().max()


def test_the_dense_models_use_it():
    from sm4.model import SM4Model

    from .test_model import MODALITIES, TASKS, small_config

    for config in (small_config(dense=True), small_config(sparse_attention=False)):
        model = SM4Model(config, MODALITIES, TASKS)
        assert all(isinstance(layer.self_attn, DenseAttention) for layer in model.layers)
