"""The SM4 encoder layer end to end (``sm4.modules.SM4EncoderLayer``), against a plain PyTorch one.

One layer at the papers' medium shape: 32 sequences x 24 tokens, d = 64, 8 heads, FFN h = 128,
E = 32 experts per group, k = 2, batch-first, pre-norm, dropout 0.1. Modes: ``forward`` (eval
mode under no_grad) and ``forward_backward`` (train mode: router noise, dropout, and the
balancing loss added to the loss).

Paths: ``plain_loop`` is the same layer as a user would write it without sm4: for each of the
four expert groups (Q, K, V single-linear experts, each with its own router, and the FFN) a
softmax top-k router, then for each expert ``nonzero`` -> gather -> F.linear (-> GELU ->
F.linear) -> ``index_add`` (as in ``bench_grouped_gemm.plain_loop``), and a simple balancing
loss (CV^2 of importance and of the hard load, which is cheaper than sm4's smooth load);
``torch_grouped_mm`` is SM4EncoderLayer(backend="cpu") with its experts and gating swapped onto
the transformers-style peer (benchmarks/peers/swap.py: the same layer, only the experts differ);
``reference``, ``cpu``, ``cuda``, ``triton`` are ``SM4EncoderLayer(backend=...)``. Targets (issue
#13): cpu at least 5x plain_loop and 1.5x torch_grouped_mm, forward+backward at medium.

FLOPs (useful, forward; forward+backward counts 3x): gating 2*T*d*E per router (4 routers),
Q/K/V experts 2*T*k*d*d each, FFN experts 2*T*k*2*d*h, attention 4*B*L*L*d, output projection
2*T*d*d (T = B*L). Bytes: input and output once, every parameter once (a lower bound).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sm4.modules import collect_aux_loss
from sm4.modules.encoder import SM4EncoderLayer

from .bench_grouped_gemm import skip_reason
from .peers.swap import use_torch_grouped_mm_experts

from .shapes import PAPER

# name: (batch B, tokens L, d, heads, h, E, k): the papers' three settings
SHAPES = {name: (s["batch"], s["tokens"], s["d"], s["heads"], s["h"], s["E"], s["k"]) for name, s in PAPER.items()}
PATHS = ["plain_loop", "torch_grouped_mm", "reference", "cpu", "cuda", "triton"]  # baselines first: speedups need them
DROPOUT = 0.1


def _cv_squared(values):
    return values.var() / (values.mean() ** 2 + 1e-10)


def plain_moe(x, router, w1, b1, w2, b2, k, training, noise_std=1.0):
    """A plain per-expert MoE over x (T, d): linear experts (w2 None) or FFN experts.

    Returns (output (T, out), balancing terms CV^2(importance) + CV^2(hard load)).
    """
    logits = x @ router
    experts = router.shape[1]
    if training and noise_std > 0:
        logits = logits + torch.randn_like(logits) * (noise_std / experts)
    probs = torch.softmax(logits, dim=-1)
    top_gates, top_ids = probs.topk(k, dim=-1)
    out = x.new_zeros(x.shape[0], w1.shape[2] if w2 is None else w2.shape[2])
    for e in range(experts):
        token, rank = (top_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        y = F.linear(x[token], w1[e].t(), b1[e])
        if w2 is not None:
            y = F.linear(F.gelu(y), w2[e].t(), b2[e])
        out = out.index_add(0, token, top_gates[token, rank, None] * y)
    load = torch.bincount(top_ids.reshape(-1), minlength=experts).to(probs.dtype)
    return out, _cv_squared(probs.sum(0)) + _cv_squared(load)


class PlainLoopEncoderLayer(nn.Module):
    """The SM4 encoder layer (pre-norm, batch-first, no masks) with plain per-expert loops, holding
    a copy of an SM4EncoderLayer's parameters (so in eval mode the two compute the same)."""

    def __init__(self, layer: SM4EncoderLayer):
        super().__init__()
        attn, ffn = layer.self_attn, layer.ffn
        copy = lambda t: nn.Parameter(t.detach().clone())
        self.routers = copy(attn.routers)  # (3, d, E)
        self.expert_weight = copy(attn.expert_weight)  # (3, E, d, d)
        self.expert_bias = copy(attn.expert_bias)  # (3, E, d)
        self.out_proj = nn.Linear(attn.embed_dim, attn.embed_dim)
        self.out_proj.load_state_dict(attn.out_proj.state_dict())
        self.router, self.w1, self.b1, self.w2, self.b2 = (copy(t) for t in (ffn.router, ffn.w1, ffn.b1, ffn.w2, ffn.b2))
        self.norm1, self.norm2 = nn.LayerNorm(attn.embed_dim), nn.LayerNorm(attn.embed_dim)
        self.norm1.load_state_dict(layer.norm1.state_dict())
        self.norm2.load_state_dict(layer.norm2.state_dict())
        self.num_heads, self.top_k, self.dropout = attn.num_heads, attn.moe.top_k, DROPOUT
        self.weight = attn.moe.balance_loss_weight
        self.aux_loss = None

    def forward(self, x):
        batch, length, dim = x.shape
        flat = self.norm1(x).reshape(-1, dim)
        heads, aux = [], 0.0
        for g in range(3):
            y, balance = plain_moe(flat, self.routers[g], self.expert_weight[g], self.expert_bias[g], None, None,
                                   self.top_k, self.training)
            heads.append(y.view(batch, length, self.num_heads, -1).transpose(1, 2))
            aux = aux + balance
        p = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(*heads, dropout_p=p).transpose(1, 2).reshape(batch, length, dim)
        x = x + F.dropout(self.out_proj(attended), p, self.training)
        y, balance = plain_moe(self.norm2(x).reshape(-1, dim), self.router, self.w1, self.b1, self.w2, self.b2,
                               self.top_k, self.training)
        self.aux_loss = self.weight * (aux + balance)
        return x + F.dropout(y.view(batch, length, dim), p, self.training)


def layer_flops(batch, length, dim, hidden, experts, k):
    tokens = batch * length
    gating = 4 * 2 * tokens * dim * experts
    qkv = 3 * 2 * tokens * k * dim * dim
    ffn = 2 * tokens * k * 2 * dim * hidden
    attention = 4 * batch * length * length * dim
    out_proj = 2 * tokens * dim * dim
    return gating + qkv + ffn + attention + out_proj


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sm4_encoder_layer(benchmark, record, device, shape, path, mode):
    peer = path == "torch_grouped_mm"
    reason = None if peer else skip_reason(path, device) or skip_reason(path, device, op="expert_linear")
    if peer and device.type != "cpu":
        reason = "the torch_grouped_mm layer is the CPU peer here (its sm4 parts run on the cpu backend)"
    if reason:
        pytest.skip(reason)
    batch, length, dim, heads, hidden, experts, k = SHAPES[shape]
    torch.manual_seed(0)
    layer = SM4EncoderLayer(dim, heads, hidden, dropout=DROPOUT, batch_first=True, num_experts=experts, top_k=k,
                            balance_loss_weight=0.05, backend={"plain_loop": None, "torch_grouped_mm": "cpu"}.get(path, path),
                            device=device)
    if peer:
        use_torch_grouped_mm_experts(layer)
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(1)).to(device)
    if path == "plain_loop":
        plain = PlainLoopEncoderLayer(layer).to(device)
        with torch.no_grad():  # the baseline computes the same layer
            torch.testing.assert_close(plain.eval()(x), layer.eval()(x), atol=1e-4, rtol=1e-4)
        layer = plain
    training = mode != "forward"
    layer.train(training)
    x.requires_grad_(training)

    def run():
        if training:
            y = layer(x)
            aux = layer.aux_loss if path == "plain_loop" else collect_aux_loss(layer)
            (y.square().mean() + aux).backward()
        else:
            with torch.no_grad():
                layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    benchmark(run)
    forward_flops = layer_flops(batch, length, dim, hidden, experts, k)
    parameter_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    record(f"sm4_encoder_layer_{mode}", shape, path, flops=forward_flops * (3 if training else 1),
           bytes_moved=(2 * x.numel() * x.element_size() + parameter_bytes) * (2 if training else 1))
