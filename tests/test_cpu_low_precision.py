"""bf16 / fp16 expert layers on the cpu backend compute in fp32 where the CPU has no bf16 matrix
unit (sm4/compute_dtype.py): outputs and gradients keep their dtypes, errors against float64 stay
within 2x plain PyTorch's in the same dtype, under both policies (fp32 upcast and native)."""

import pytest
import torch

from sm4 import compute_dtype, ops

pytestmark = pytest.mark.skipif("cpu" not in ops.dispatch.implemented_ops(), reason="the cpu backend (sm4._C) is not built")

LOW = [torch.bfloat16, torch.float16]


def _inputs(dtype, tokens, d=12, h=20, experts=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (tokens, k), generator=g)
    if tokens:
        ids[0, 1] = -1  # an inactive rank
    gates = torch.rand(tokens, k, generator=g) * (ids >= 0)
    params = dict(x=torch.randn(tokens, d, generator=g), w1=torch.randn(experts, d, h, generator=g) * d**-0.5,
                  b1=torch.randn(experts, h, generator=g) * 0.1, w2=torch.randn(experts, h, d, generator=g) * h**-0.5,
                  b2=torch.randn(experts, d, generator=g) * 0.1, gates=gates)
    meta = ops.routing_metadata(ids, experts, backend="cpu")
    return {n: t.to(dtype) if n != "gates" else t for n, t in params.items()}, meta


def _run(layer, params, meta, dtype, backend):
    p = leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in params.items()}
    if layer == "expert_ffn":
        y = ops.expert_ffn(p["x"], p["w1"], p["b1"], p["w2"], p["b2"], p["gates"], meta, backend=backend)
    else:
        y = ops.expert_linear(p["x"], p["w1"], p["b1"], p["gates"], meta, backend=backend)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
    used = [n for n in leaves if leaves[n].grad is not None]
    return y, {n: leaves[n].grad for n in used}


@pytest.mark.parametrize("policy", ["fp32", "native"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layer", ["expert_linear", "expert_ffn"])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_low_precision_within_twice_plain_pytorch(monkeypatch, layer, dtype, policy, tokens):
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", policy)
    params, meta = _inputs(dtype, tokens)
    truth, truth_grads = _run(layer, params, meta, torch.float64, "reference")
    plain, plain_grads = _run(layer, params, meta, dtype, "reference")
    got, got_grads = _run(layer, params, meta, dtype, "cpu")
    assert got.dtype == dtype and got.shape == truth.shape
    assert set(got_grads) == set(truth_grads)
    eps = torch.finfo(dtype).eps

    def check(name, a, p, t):
        assert a.dtype == p.dtype, name
        err, plain_err = (a.double() - t).abs().max().item() if t.numel() else 0.0, (p.double() - t).abs().max().item() if t.numel() else 0.0
        scale = t.abs().max().item() if t.numel() else 1.0
        # 2x plain PyTorch's error, plus one ulp at the tensor's own scale: with T = 1 each gradient
        # is one rounded sample, and plain PyTorch's rounding can happen to land near the truth
        allowed = 2 * plain_err + eps * scale
        assert err <= allowed, f"{name}: {err} vs plain {plain_err}"

    check("output", got, plain, truth)
    for name in truth_grads:
        check(f"grad {name}", got_grads[name], plain_grads[name], truth_grads[name])


def test_policy_on_this_cpu(monkeypatch):
    monkeypatch.delenv("SM4_CPU_LOW_PRECISION", raising=False)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if compute_dtype._native_matmul(torch.bfloat16) else torch.float32
    assert compute_dtype.expert_compute_dtype(torch.bfloat16, cpu) == expected
    assert compute_dtype.expert_compute_dtype(torch.float32, cpu) == torch.float32
    assert compute_dtype.expert_compute_dtype(torch.float64, cpu) == torch.float64
    assert compute_dtype.expert_compute_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", "fp32")
    assert compute_dtype.expert_compute_dtype(torch.float16, cpu) == torch.float32
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", "native")
    assert compute_dtype.expert_compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", "fast")
    with pytest.raises(ValueError, match="SM4_CPU_LOW_PRECISION must be one of auto, fp32, native, got 'fast'"):
        compute_dtype.expert_compute_dtype(torch.bfloat16, cpu)


@pytest.mark.parametrize("policy, kernel_dtype", [("fp32", torch.float32), ("native", torch.bfloat16)])
def test_the_kernels_see_the_policys_dtype(monkeypatch, policy, kernel_dtype):
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", policy)
    seen = []
    real = torch.ops.sm4.grouped_mm

    class Spy:
        def __call__(self, *args, **kwargs):
            seen.append(args[0].dtype)
            return real(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(torch.ops.sm4, "grouped_mm", Spy())
    x = torch.randn(9, 8, dtype=torch.bfloat16, requires_grad=True)
    router = torch.randn(8, 4, dtype=torch.bfloat16)
    w = torch.randn(4, 8, 6, dtype=torch.bfloat16, requires_grad=True)
    y = ops.moe_linear(x, router, w, None, 2, backend="cpu").output
    y.sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert seen and set(seen) == {kernel_dtype}


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_moe_qkv_and_ffn_keep_dtypes(monkeypatch, dtype):
    monkeypatch.setenv("SM4_CPU_LOW_PRECISION", "fp32")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 8, generator=g).to(dtype).requires_grad_()
    routers = tuple(torch.randn(8, 3, generator=g).to(dtype) for _ in range(3))
    w = torch.randn(3, 3, 8, 8, generator=g).to(dtype).requires_grad_()
    out = ops.moe_qkv(x, routers, w, None, 2, backend="cpu")[0]
    out.float().sum().backward()
    assert out.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    w1 = torch.randn(3, 8, 16, generator=g).to(dtype).requires_grad_()
    w2 = torch.randn(3, 16, 8, generator=g).to(dtype).requires_grad_()
    y = ops.moe_ffn(x, routers[0], w1, None, w2, None, 2, backend="cpu").output
    y.float().sum().backward()
    assert y.dtype == dtype and w1.grad.dtype == dtype and w2.grad.dtype == dtype
