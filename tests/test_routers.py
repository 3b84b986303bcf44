"""Modality- and task-specific routers (the papers' routing ablations): several routers over one
set of experts, each token routed by its own, in one gating call (sm4.ops.router_input_for)."""

import pytest
import torch

from sm4 import SparseMoEAttention, SparseMoEFFN, ops
from sm4.model import ModelConfig, SM4Model


def test_router_input_gives_each_token_its_router():
    x = torch.randn(6, 4, dtype=torch.float64)
    index = torch.tensor([0, 2, 1, 0, 2, 2])
    weights = torch.randn(3 * 4, 5, dtype=torch.float64)
    logits = ops.router_input_for(x, index, 3) @ weights
    for t in range(6):
        torch.testing.assert_close(logits[t], x[t] @ weights[4 * index[t]:4 * (index[t] + 1)])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ffn_with_two_routers_equals_two_single_router_ffns(backend):
    torch.manual_seed(0)
    layer = SparseMoEFFN(8, 16, num_experts=4, top_k=2, num_routers=2, backend=backend, dtype=torch.float64).eval()
    x = torch.randn(10, 8, dtype=torch.float64)
    index = torch.tensor([0, 1] * 5)
    out = layer(x, router_index=index)
    for r in (0, 1):
        single = SparseMoEFFN(8, 16, num_experts=4, top_k=2, backend=backend, dtype=torch.float64).eval()
        single.load_state_dict({**layer.state_dict(), "router": layer.router[8 * r:8 * (r + 1)]})
        rows = index == r
        torch.testing.assert_close(out[rows], single(x[rows]))
    with pytest.raises(ValueError, match="pass router_index"):
        layer(x)
    with pytest.raises(ValueError, match="router_index must have shape \\(10,\\)"):
        layer(x, router_index=index[:5])


def test_attention_routers_are_separate_per_kind():
    torch.manual_seed(0)
    layer = SparseMoEAttention(8, 2, batch_first=True, num_experts=4, num_routers=2).eval()
    assert layer.routers.shape == (3, 2 * 8, 4)
    x = torch.randn(2, 5, 8)
    zeros = torch.zeros(2, 5, dtype=torch.long)
    before = layer(x, x, x, router_index=zeros)[0]
    with torch.no_grad():
        layer.routers[:, 8:] += torch.randn(3, 8, 4)  # the second routers only
    torch.testing.assert_close(layer(x, x, x, router_index=zeros)[0], before)
    assert not torch.allclose(layer(x, x, x, router_index=torch.ones_like(zeros))[0], before)


@pytest.mark.parametrize("mode", ["modality", "task"])
def test_model_router_modes(mode):
    torch.manual_seed(0)
    config = ModelConfig(latent_tokens=3, width=16, cross_head_dim=8, latent_heads=2, latent_head_dim=8, heads=4,
                         ffn_hidden=16, num_experts=4, top_k=2, num_freq_bands=2, dropout=0.0, router_mode=mode)
    modalities = {"a": ("sequence", (5, 2)), "b": ("tabular", (3, 1))}
    model = SM4Model(config, modalities, {"ab": (("a", "b"), 3), "b": (("b",), 1)})
    routers = 2  # two modalities, or two tasks
    assert model.layers[0].ffn.router.shape == (routers * 16, 4)
    out = model("ab", {"a": torch.randn(4, 5, 2), "b": torch.randn(4, 3, 1)})
    out.sum().backward()
    assert model.layers[0].ffn.router.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="router_mode"):
        ModelConfig(router_mode="token").validate()
