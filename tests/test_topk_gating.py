"""Fused top-k gating on every kernel backend (cpu, triton, cuda) against the float64 reference.

Inputs are rounded to the tested dtype first, and the reference runs in float64 on the rounded
values with the same noise, so ids must be identical and routing values agree to fp32 accuracy
(every backend accumulates in fp32). Gradients of x and router_weight come back in their own dtype
and are compared with that dtype's tolerance.
"""

import math

import pytest
import torch

from sm4 import ops

from .helpers import TOLERANCES, kernel_device, skip_unless_runs

BACKENDS = ["cpu", "triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUTING_FIELDS = ("gates", "entropy", "importance", "load", "importance_loss", "load_loss")
# Routing values are fp32 computations on exactly representable inputs; the smooth load divides
# by sigma = noise_std / E, which amplifies logit rounding by up to ~E / 2.5.
ROUTING_TOL = dict(atol=2e-5, rtol=2e-4)




def make_inputs(tokens, dim, experts, dtype, seed=0, weight_dtype=None, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(tokens, dim, generator=g)).to(dtype)
    w = (torch.randn(dim, experts, generator=g) / math.sqrt(max(dim, 1))).to(weight_dtype or dtype)
    return x, w


def run(backend, x, w, k, **kwargs):
    device = kernel_device(backend)
    kwargs = {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
    return ops.topk_gating(x.to(device), w.to(device), k, backend=backend, **kwargs)


def reference(x, w, k, **kwargs):
    return ops.topk_gating(x.double(), w.double(), k, backend="reference", **kwargs)


def assert_routing_equal(out, ref, msg=""):
    assert torch.equal(out.expert_ids.cpu(), ref.expert_ids), f"{msg}: expert ids differ"
    assert torch.equal(out.expert_counts.cpu(), ref.expert_counts), f"{msg}: counts differ"
    for field in ROUTING_FIELDS:
        got, want = getattr(out, field).cpu().double(), getattr(ref, field)
        torch.testing.assert_close(got, want, **ROUTING_TOL, equal_nan=True, msg=f"{msg}: {field}")


def loss_of(routing, seed=3):
    """A loss that reaches every differentiable output: gates, importance and load terms."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(routing.gates.shape, generator=g, dtype=torch.float64).to(routing.gates)
    per_expert = torch.randn(routing.importance.shape, generator=g, dtype=torch.float64).to(routing.gates)
    return ((routing.gates * weights).nansum() + routing.importance_loss + 0.5 * routing.load_loss
            + 1e-3 * (routing.importance * per_expert).sum() + 1e-3 * (routing.load * per_expert).sum())


CONFIGS = [
    # name: (T, d, E, k, per-token k, training, renormalize)
    ("paper medium, eval", (96, 64, 32, 2, False, False, False)),
    ("training, per-token k", (61, 24, 16, 2, True, True, False)),
    ("E prime, renormalize", (45, 20, 13, 3, True, True, True)),
    ("k = E", (19, 12, 6, 6, False, True, False)),
    ("E = 1", (17, 8, 1, 1, False, True, False)),
    ("T = 1, d odd", (1, 7, 5, 2, False, True, True)),
    ("E = 67 > one 64-lane tile", (23, 16, 67, 4, True, True, False)),
    ("several CPU token blocks", (300, 64, 32, 2, True, True, False)),
    # The CUDA forward's tilings: 64 tokens a block with 16-byte weight rows (E % 4 == 0), and
    # 32 tokens a block for E > 128 with d past one 32-feature tile (a partial last tile).
    ("E = 128, three CUDA blocks", (130, 40, 128, 2, False, True, True)),
    ("E = 160 > 128, three CUDA blocks", (70, 45, 160, 3, True, True, False)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,config", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradients_match_reference(backend, name, config, dtype):
    skip_unless_runs(backend)
    tokens, dim, experts, k, per_token_k, training, renormalize = config
    x, w = make_inputs(tokens, dim, experts, dtype)
    kwargs = dict(training=training, renormalize=renormalize, noise_std=1.0)
    if per_token_k:
        kwargs["token_k"] = torch.randint(1, k + 1, (tokens,), generator=torch.Generator().manual_seed(1))
    if training:
        kwargs["noise"] = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(2))
    ref_x, ref_w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference(ref_x, ref_w, k, **kwargs)
    xk, wk = x.clone().to(kernel_device(backend)).requires_grad_(True), w.clone().to(kernel_device(backend)).requires_grad_(True)
    out = ops.topk_gating(xk, wk, k, backend=backend, **{key: (v.to(xk.device) if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()})
    assert_routing_equal(out, ref, f"{backend} {name} {dtype}")
    loss_of(ref).backward()
    loss_of(out).backward()
    assert xk.grad.dtype == dtype and wk.grad.dtype == dtype
    grad_tol = TOLERANCES[dtype] if dtype != torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xk.grad.cpu().double(), ref_x.grad, **grad_tol)
    torch.testing.assert_close(wk.grad.cpu().double(), ref_w.grad, **grad_tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_noise_matches_reference_exactly_in_training(backend):
    skip_unless_runs(backend)
    x, w = make_inputs(40, 16, 8, torch.float32)
    device = kernel_device(backend)
    out = ops.topk_gating(x.to(device), w.to(device), 2, training=True, backend=backend,
                          generator=torch.Generator(device=device).manual_seed(5))
    ref = ops.topk_gating(x.to(device), w.to(device), 2, training=True, backend="reference",
                          generator=torch.Generator(device=device).manual_seed(5))
    assert torch.equal(out.expert_ids, ref.expert_ids)
    torch.testing.assert_close(out.load, ref.load, **ROUTING_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_weight_in_fp32_with_bf16_tokens(backend):
    skip_unless_runs(backend)
    x, w = make_inputs(33, 32, 12, torch.bfloat16, weight_dtype=torch.float32)
    assert_routing_equal(run(backend, x, w, 2), reference(x, w, 2), "bf16 x, fp32 W")


@pytest.mark.parametrize("backend", BACKENDS)
def test_named_edge_cases(backend):
    skip_unless_runs(backend)
    # T = 0
    x, w = make_inputs(0, 8, 5, torch.float32)
    out = run(backend, x, w, 2, training=True)
    assert out.expert_ids.shape == (0, 2) and out.expert_counts.tolist() == [0] * 5
    assert out.load_loss.item() == 0.0 and out.importance_loss.item() == 0.0
    # identical logits: ties go to the lower index
    x = torch.ones(9, 4)
    w = torch.zeros(4, 7)
    assert run(backend, x, w, 3).expert_ids.cpu().tolist() == [[0, 1, 2]] * 9
    # every token prefers one expert (the others tie -> expert 0 next); E prime
    w = torch.zeros(4, 11)
    w[:, 9] = 1.0
    out = run(backend, x, w, 2)
    assert out.expert_ids.cpu().tolist() == [[9, 0]] * 9
    assert out.expert_counts.cpu().tolist() == [9] + [0] * 8 + [9, 0]
    # very large logits: a stable softmax
    x, w = make_inputs(20, 8, 6, torch.float32, scale=1e4)
    noise = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    out = run(backend, x, w, 2, training=True, noise=noise)
    for field in ROUTING_FIELDS:
        assert torch.isfinite(getattr(out, field)).all(), field
    ref = reference(x, w, 2, training=True, noise=noise)
    assert torch.equal(out.expert_ids.cpu(), ref.expert_ids)
    torch.testing.assert_close(out.gates.cpu().double(), ref.gates, **ROUTING_TOL)
    # non-contiguous x (column-major) and int32 token_k
    x, w = make_inputs(30, 10, 7, torch.float32)
    x_t = x.t().contiguous().t()
    token_k = torch.randint(1, 3, (30,), dtype=torch.int32)
    assert_routing_equal(run(backend, x_t, w, 2, token_k=token_k), reference(x, w, 2, token_k=token_k), "non-contiguous")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_token_among_good_ones(backend, bad):
    skip_unless_runs(backend)
    x, w = make_inputs(24, 16, 9, torch.float32)
    x[5, 3] = bad
    noise = torch.randn(24, 9, generator=torch.Generator().manual_seed(0))
    xk = x.to(kernel_device(backend)).requires_grad_(True)
    wk = w.to(kernel_device(backend)).requires_grad_(True)
    out = ops.topk_gating(xk, wk, 3, training=True, noise=noise.to(xk.device), backend=backend)
    ref = reference(x, w, 3, training=True, noise=noise)
    assert_routing_equal(out, ref, "nan token")
    assert torch.isnan(out.gates[5]).all() and torch.isnan(out.entropy[5])
    (out.importance_loss + out.load_loss + out.gates[torch.arange(24) != 5].sum()).backward()
    assert torch.isfinite(wk.grad).all(), "the router gradient must stay finite"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_noise_row_excludes_the_token(backend, bad):
    """The noisy logits decide the routing: a token whose noise row is not finite is a non-finite
    token (routed to the lowest experts, NaN gates, out of importance and load), as in the
    reference; before, the kernels counted it, and importance/load differed by up to 2.0."""
    skip_unless_runs(backend)
    x, w = make_inputs(24, 16, 9, torch.float32)
    noise = torch.randn(24, 9, generator=torch.Generator().manual_seed(0))
    noise[7, 4] = bad
    xk = x.clone().to(kernel_device(backend)).requires_grad_(True)
    wk = w.clone().to(kernel_device(backend)).requires_grad_(True)
    out = ops.topk_gating(xk, wk, 3, training=True, noise=noise.to(xk.device), backend=backend)
    ref_x, ref_w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference(ref_x, ref_w, 3, training=True, noise=noise)
    assert_routing_equal(out, ref, "non-finite noise row")
    assert torch.isnan(out.gates[7]).all() and torch.isnan(out.entropy[7])
    keep = torch.arange(24) != 7
    (out.importance_loss + out.load_loss + out.gates[keep.to(xk.device)].sum()).backward()
    (ref.importance_loss + ref.load_loss + ref.gates[keep].sum()).backward()
    torch.testing.assert_close(wk.grad.cpu().double(), ref_w.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xk.grad.cpu().double(), ref_x.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("noise_std", [0.5, 8.0, 64.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_smooth_load_across_the_normal_cdf(backend, noise_std):
    """sigma = noise_std / E from 1/32 to 4: the smooth load's Phi((l - threshold) / sigma) is taken
    deep in both tails, near 1/2 and in between (the CPU kernel's fp32 Phi is an erfc fit, not libm),
    and its density drives the load gradient."""
    skip_unless_runs(backend)
    x, w = make_inputs(64, 24, 16, torch.float32)
    noise = torch.randn(64, 16, generator=torch.Generator().manual_seed(6))
    kwargs = dict(training=True, noise=noise, noise_std=noise_std)
    ref_x, ref_w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = reference(ref_x, ref_w, 3, **kwargs)
    xk = x.to(kernel_device(backend)).requires_grad_(True)
    wk = w.to(kernel_device(backend)).requires_grad_(True)
    out = ops.topk_gating(xk, wk, 3, backend=backend, **{key: (v.to(xk.device) if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()})
    assert_routing_equal(out, ref, f"{backend} noise_std={noise_std}")
    for routing in (ref, out):
        (routing.load * torch.linspace(-1, 1, 16, dtype=routing.load.dtype, device=routing.load.device)).sum().backward()
    torch.testing.assert_close(xk.grad.cpu().double(), ref_x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wk.grad.cpu().double(), ref_w.grad, atol=1e-4, rtol=1e-4)


def test_cpu_kernel_gradcheck_float64():
    skip_unless_runs("cpu")
    x, w = make_inputs(9, 6, 5, torch.float64)
    noise = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    token_k = torch.tensor([1, 2, 3, 3, 2, 1, 2, 3, 1])
    for training in (False, True):
        for renormalize in (False, True):
            def gating(x, w):
                r = ops.topk_gating(x, w, 3, token_k=token_k, training=training, renormalize=renormalize, noise=noise, noise_std=2.0, backend="cpu")
                return r.gates, r.importance, r.load, r.importance_loss, r.load_loss

            assert torch.autograd.gradcheck(gating, (x.clone().requires_grad_(True), w.clone().requires_grad_(True)))


OPS = {
    "cpu": ("topk_gating_forward", "topk_gating_backward"),
    "triton": ("triton_topk_gating_forward", "triton_topk_gating_backward"),
    "cuda": ("topk_gating_forward", "topk_gating_backward"),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    skip_unless_runs(backend)
    device = kernel_device(backend)
    forward = getattr(torch.ops.sm4, OPS[backend][0]).default
    backward = getattr(torch.ops.sm4, OPS[backend][1]).default
    x, w = make_inputs(21, 8, 6, torch.float32)
    x, w = x.to(device), w.to(device)
    noise = torch.randn(21, 6, device=device)
    token_k = torch.randint(1, 3, (21,), device=device)
    for args in [(x, w, noise, token_k, 2, 0.25, True), (x, w, None, None, 3, 0.0, False)]:
        torch.library.opcheck(forward, args)
        torch.library.opcheck(forward, (x.clone().requires_grad_(True), w.clone().requires_grad_(True), *args[2:]))
    gates, ids, _, _, _, _, runner, logits = forward(x, w, noise, token_k, 2, 0.25, True)
    torch.library.opcheck(backward, (torch.randn_like(gates), torch.randn(6, device=device), torch.randn(6, device=device), logits, noise, ids, runner, 0.25, True))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend):
    skip_unless_runs(backend)
    x, w = make_inputs(32, 16, 8, torch.float32)
    w.requires_grad_(True)
    noise = torch.randn(32, 8)

    def step(x, w):
        r = ops.topk_gating(x, w, 2, training=True, noise=noise, backend=backend)
        return r.gates.sum() + r.balance_loss(0.1)

    compiled = torch.compile(step, fullgraph=True)
    eager_loss = step(x, w)
    (eager_grad,) = torch.autograd.grad(eager_loss, w)
    compiled_loss = compiled(x, w)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, w)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_auto_dispatch_uses_the_cpu_kernel():
    skip_unless_runs("cpu")
    from sm4 import dispatch

    assert dispatch.select("topk_gating", [torch.zeros(2, 2)])[0] == "cpu"


@pytest.mark.parametrize("experts", [1, 2, 13])
def test_balance_terms_match_cv_squared(experts):
    """The kernels' finishing step (one autograd node for both CV^2 terms, closed-form backward)
    against the reference's cv_squared, values and gradients, including all-equal and all-zero."""
    from sm4 import reference, routing

    g = torch.Generator().manual_seed(7)
    cases = [torch.rand(experts, generator=g, dtype=torch.float64) * 5, torch.full((experts,), 2.0, dtype=torch.float64),
             torch.zeros(experts, dtype=torch.float64)]
    for importance in cases:
        load = torch.rand(experts, generator=g, dtype=torch.float64)
        got = routing.balance_terms(importance, load)
        want = (reference.cv_squared(importance), reference.cv_squared(load))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if experts > 1:
            inputs = (importance.clone().requires_grad_(True), load.clone().requires_grad_(True))
            assert torch.autograd.gradcheck(lambda i, l: routing.balance_terms(i, l), inputs)
            reference_grads = torch.autograd.grad(sum(reference.cv_squared(v) for v in inputs), inputs)
            torch.testing.assert_close(torch.autograd.grad(sum(routing.balance_terms(*inputs)), inputs), reference_grads)


@pytest.mark.parametrize("backend", ["cuda"])
def test_token_with_non_finite_noise_is_excluded_like_the_reference(backend):
    """The reference treats a token whose noise row is non-finite as a non-finite token (NaN gates,
    not counted in importance or load); the CUDA kernel must too."""
    skip_unless_runs(backend)
    x, w = make_inputs(24, 16, 9, torch.float32)
    noise = torch.randn(24, 9, generator=torch.Generator().manual_seed(0))
    noise[7, 2] = math.nan
    out = run(backend, x, w, 3, training=True, noise=noise)
    assert_routing_equal(out, reference(x, w, 3, training=True, noise=noise), "non-finite noise row")
