"""SM4's adaptive mechanisms (sm4.training.adaptive): AEA, ALP and the per-token gradient scale."""

import json
import math

import pytest
import torch

from sm4.training import (
    AdaptiveExpertAllocation,
    AdaptiveLearningPace,
    EntropyMeter,
    modality_gradient_scale,
    modality_validation_loss,
    scale_gradient,
)


def run_aea(aea, losses, modality="a"):
    """Feed a scripted loss sequence for one modality; returns k after each epoch."""
    return [aea.step({modality: loss})[modality] for loss in losses]


# ---------------------------------------------------------------------------------------------
# AEA
# ---------------------------------------------------------------------------------------------


def test_aea_initial_state():
    aea = AdaptiveExpertAllocation(["a", "b"], k_max=4)
    assert aea.k == {"a": 1, "b": 1}
    assert aea.best == {"a": math.inf, "b": math.inf}
    assert aea.improved == {"a": True, "b": True} and aea.active == {"a": True, "b": True}
    assert aea.history == [] and aea.epoch == 0


def test_aea_keeps_improving_without_growing():
    aea = AdaptiveExpertAllocation(["a"], k_max=4)
    assert run_aea(aea, [5.0, 4.0, 3.0, 2.0, 1.0]) == [1, 1, 1, 1, 1]
    assert aea.best == {"a": 1.0} and aea.active == {"a": True} and aea.improved == {"a": True}


def test_aea_grows_on_plateau_then_keeps_growth_that_helped():
    aea = AdaptiveExpertAllocation(["a"], k_max=4)
    # 1.0 (best) -> 1.0 plateau: grow to 2 -> 0.9 improves (keep 2) -> 0.95 plateau: grow to 3
    assert run_aea(aea, [1.0, 1.0, 0.9, 0.95]) == [1, 2, 2, 3]
    assert aea.improved == {"a": False} and aea.active == {"a": True} and aea.best == {"a": 0.9}


def test_aea_reverts_and_freezes_when_growth_did_not_help():
    aea = AdaptiveExpertAllocation(["a"], k_max=4)
    assert run_aea(aea, [1.0, 1.0, 1.2]) == [1, 2, 1]
    assert aea.active == {"a": False}
    # frozen for good: neither improvements nor plateaus change anything any more
    assert run_aea(aea, [0.1, 0.1, 0.1, 5.0]) == [1, 1, 1, 1]
    assert aea.best == {"a": 1.0} and aea.active == {"a": False}


def test_aea_equal_loss_is_not_an_improvement():
    aea = AdaptiveExpertAllocation(["a"], k_max=4)
    assert run_aea(aea, [2.0, 2.0]) == [1, 2]


def test_aea_clamps_at_k_max_literal_rule():
    aea = AdaptiveExpertAllocation(["a"], k_max=2)
    # grow to 2, improve, plateau: k+1 = 3 clamped to 2, no improvement: revert 2 -> 1, frozen
    assert run_aea(aea, [1.0, 1.0, 0.9, 0.9, 0.9]) == [1, 2, 2, 2, 1]
    assert aea.active == {"a": False}
    assert all(1 <= h["k"]["a"] <= 2 for h in aea.history)


def test_aea_clamps_at_k_max_without_literal_clamp():
    aea = AdaptiveExpertAllocation(["a"], k_max=2, literal_clamp=False)
    # the clamped growth did not happen, so the revert leaves k at k_max (still frozen)
    assert run_aea(aea, [1.0, 1.0, 0.9, 0.9, 0.9, 0.1]) == [1, 2, 2, 2, 2, 2]
    assert aea.active == {"a": False}
    # a real growth is still reverted
    aea = AdaptiveExpertAllocation(["a"], k_max=4, literal_clamp=False)
    assert run_aea(aea, [1.0, 1.0, 1.0]) == [1, 2, 1]


@pytest.mark.parametrize("literal_clamp", [True, False])
def test_aea_clamps_at_one(literal_clamp):
    aea = AdaptiveExpertAllocation(["a"], k_max=1, literal_clamp=literal_clamp)
    # grow 1 -> 2 clamped to 1, then revert 1 -> 0 clamped to 1
    assert run_aea(aea, [1.0, 1.0, 1.0, 0.5]) == [1, 1, 1, 1]
    assert aea.active == {"a": False}


def test_aea_disabled_keeps_k_max():
    aea = AdaptiveExpertAllocation(["a", "b"], k_max=3, enabled=False)
    assert aea.k == {"a": 3, "b": 3}
    for losses in ({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 2.0}, {"a": 0.5}):
        assert aea.step(losses) == {"a": 3, "b": 3}
    assert len(aea.history) == 4
    assert aea.token_k(torch.tensor([0, 1, 1])).tolist() == [3, 3, 3]


def test_aea_modalities_are_independent():
    aea = AdaptiveExpertAllocation(["a", "b", "c"], k_max=4)
    script = [
        {"a": 1.0, "b": 1.0, "c": 1.0},
        {"a": 0.9, "b": 1.0, "c": 1.0},  # a improves, b and c grow to 2
        {"a": 0.8, "b": 0.9, "c": 1.1},  # b's growth helped, c's did not: c back to 1, frozen
        {"a": 0.8, "b": 0.9, "c": 0.1},  # a and b grow
    ]
    ks = [aea.step(losses) for losses in script]
    assert ks == [
        {"a": 1, "b": 1, "c": 1},
        {"a": 1, "b": 2, "c": 2},
        {"a": 1, "b": 2, "c": 1},
        {"a": 2, "b": 3, "c": 1},
    ]
    assert aea.active == {"a": True, "b": True, "c": False}


def test_aea_absent_modality_is_unchanged():
    aea = AdaptiveExpertAllocation(["a", "b"], k_max=4)
    aea.step({"a": 1.0, "b": 1.0})
    before = (aea.k["b"], aea.best["b"], aea.improved["b"], aea.active["b"])
    aea.step({"a": 1.0})  # a plateaus and grows, b is not evaluated
    assert aea.k == {"a": 2, "b": 1}
    assert (aea.k["b"], aea.best["b"], aea.improved["b"], aea.active["b"]) == before
    aea.step({"b": 1.0})  # b's first plateau: grow (the absent epoch did not count)
    assert aea.k == {"a": 2, "b": 2} and aea.active["b"]
    assert aea.history[1]["val_loss"] == {"a": 1.0}


def test_aea_rejects_bad_input():
    with pytest.raises(ValueError):
        AdaptiveExpertAllocation([], k_max=2)
    with pytest.raises(ValueError):
        AdaptiveExpertAllocation(["a", "a"], k_max=2)
    with pytest.raises(ValueError):
        AdaptiveExpertAllocation(["a"], k_max=0)
    aea = AdaptiveExpertAllocation(["a"], k_max=2)
    with pytest.raises(ValueError, match="unknown"):
        aea.step({"z": 1.0})
    with pytest.raises(ValueError, match="NaN"):
        aea.step({"a": float("nan")})
    assert aea.epoch == 0  # rejected steps change nothing
    aea.step({"a": torch.tensor(1.5)})  # a scalar tensor is accepted
    assert aea.best == {"a": 1.5}


def test_aea_state_dict_json_round_trip_and_identical_continuation():
    aea = AdaptiveExpertAllocation(["a", "b", "c"], k_max=3, literal_clamp=False)
    script = [
        {"a": 1.0, "b": 2.0},  # c never evaluated: best stays +inf
        {"a": 1.0, "b": 1.5},
        {"a": 1.0, "b": 1.5},
    ]
    for losses in script:
        aea.step(losses)
    text = json.dumps(aea.state_dict(), allow_nan=False)  # strict JSON: no bare Infinity
    state = json.loads(text)
    assert state["best"]["c"] == "inf"

    restored = AdaptiveExpertAllocation(["a", "b", "c"], k_max=3, literal_clamp=False)
    restored.load_state_dict(state)
    assert restored.k == aea.k and restored.best == aea.best
    assert restored.best["c"] == math.inf
    assert restored.improved == aea.improved and restored.active == aea.active
    assert restored.history == aea.history

    more = [{"a": 0.5, "b": 1.5, "c": 3.0}, {"a": 0.5, "b": 1.0, "c": 3.0}, {"a": 0.5, "b": 1.0, "c": 3.0}]
    for losses in more:
        assert restored.step(losses) == aea.step(losses)
    assert restored.state_dict() == aea.state_dict()
    assert json.loads(json.dumps(restored.state_dict())) == json.loads(json.dumps(aea.state_dict()))

    with pytest.raises(ValueError, match="k_max"):
        AdaptiveExpertAllocation(["a", "b", "c"], k_max=4, literal_clamp=False).load_state_dict(state)
    with pytest.raises(ValueError, match="modalities"):
        AdaptiveExpertAllocation(["a", "b"], k_max=3, literal_clamp=False).load_state_dict(state)


def test_aea_token_k_lookup():
    aea = AdaptiveExpertAllocation(["text", "image", "audio"], k_max=4)
    aea.step({"text": 1.0, "image": 1.0, "audio": 1.0})
    aea.step({"text": 1.0, "image": 0.5, "audio": 1.0})  # text, audio -> 2
    aea.step({"text": 0.5, "image": 0.5, "audio": 1.0})  # image -> 2, audio reverted -> 1
    assert aea.k == {"text": 2, "image": 2, "audio": 1}
    aea.step({"text": 0.5})  # text -> 3
    ids = torch.tensor([[0, 0, 1, 2], [2, 1, 0, 0]], dtype=torch.int32)
    token_k = aea.token_k(ids)
    assert token_k.dtype == torch.int64 and token_k.shape == ids.shape
    assert token_k.tolist() == [[3, 3, 2, 1], [1, 2, 3, 3]]
    assert aea.token_k(torch.empty(0, dtype=torch.long)).shape == (0,)
    with pytest.raises((IndexError, RuntimeError)):
        aea.token_k(torch.tensor([3]))
    with pytest.raises((IndexError, RuntimeError)):
        aea.token_k(torch.tensor([-1]))
    with pytest.raises(TypeError):
        aea.token_k(torch.tensor([0.0]))


def test_modality_validation_loss_averages_over_tasks():
    task_modalities = {"enrico": ["image", "set"], "avmnist": ["image", "audio"], "push": ["ts"]}
    per_task = {
        "enrico": {"image": 1.0, "set": 2.0},
        "avmnist": {"image": 3.0, "audio": 4.0},
        "push": {"ts": torch.tensor(0.5)},
    }
    assert modality_validation_loss(per_task, task_modalities) == {"image": 2.0, "set": 2.0, "audio": 4.0, "ts": 0.5}
    with pytest.raises(ValueError, match="tasks"):
        modality_validation_loss({"enrico": per_task["enrico"]}, task_modalities)
    with pytest.raises(ValueError, match="losses for"):
        modality_validation_loss({**per_task, "push": {"ts": 0.5, "image": 1.0}}, task_modalities)
    with pytest.raises(ValueError, match="NaN"):
        modality_validation_loss({**per_task, "push": {"ts": float("nan")}}, task_modalities)


# ---------------------------------------------------------------------------------------------
# ALP
# ---------------------------------------------------------------------------------------------


def test_alp_weights_hand_computed():
    alp = AdaptiveLearningPace(["a", "b", "c"])
    assert alp.weights == {"a": 1.0, "b": 1.0, "c": 1.0}  # before the first epoch
    # exp(H) = 1, 2, 3 -> softmax = 1/6, 2/6, 3/6 -> w = 5/6, 4/6, 3/6
    w = alp.step({"a": 0.0, "b": math.log(2.0), "c": math.log(3.0)})
    expected = {"a": 5 / 6, "b": 4 / 6, "c": 3 / 6}
    for m, value in expected.items():
        assert w[m] == pytest.approx(value, abs=1e-12)
    assert sum(w.values()) == pytest.approx(2.0, abs=1e-12)  # M - 1
    assert w["a"] > w["b"] > w["c"]  # inversely ordered to the entropy
    assert alp.weights == w
    assert alp.weight_tensor().tolist() == pytest.approx([5 / 6, 4 / 6, 3 / 6])
    assert alp.weight_tensor(dtype=torch.float64).dtype == torch.float64
    assert alp.task_loss_scale(["a", "b"]) == 1.0  # mode "gradient"
    # large entropies do not overflow
    w = alp.step({"a": 1000.0, "b": 1000.0, "c": 1000.0 + math.log(2.0)})
    assert [w["a"], w["b"], w["c"]] == pytest.approx([0.75, 0.75, 0.5])


def test_entropy_meter_accumulates_over_batches():
    g = torch.Generator().manual_seed(0)
    meter = EntropyMeter(["a", "b", "c"])
    all_e, all_ids = [], []
    for batch, dtype in enumerate([torch.float32, torch.float64, torch.bfloat16]):
        entropy = (torch.rand(50 + batch, generator=g, dtype=torch.float64) * 3).to(dtype)
        ids = torch.randint(0, 3, (50 + batch,), generator=g)
        meter.add(entropy, ids)
        all_e.append(entropy.double())
        all_ids.append(ids)
    e, ids = torch.cat(all_e), torch.cat(all_ids)
    means = meter.epoch_means()
    assert set(means) == {"a", "b", "c"}
    for i, m in enumerate(["a", "b", "c"]):
        assert means[m] == pytest.approx(e[ids == i].mean().item(), rel=1e-12)
    _, counts = meter.read()
    assert sum(counts.values()) == e.numel()
    meter.reset()
    assert meter.epoch_means() == {}


def test_entropy_meter_accepts_token_grids_and_checks_shapes():
    meter = EntropyMeter(["a", "b"])
    meter.add(torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([[0, 1], [0, 1]]))
    assert meter.epoch_means() == {"a": 2.0, "b": 3.5}
    with pytest.raises(ValueError):
        meter.add(torch.ones(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError):
        meter.add(torch.ones(3), torch.zeros(3))
    with pytest.raises((IndexError, RuntimeError)):
        meter.add(torch.ones(1), torch.tensor([2]))


def test_entropy_meter_ignores_non_finite():
    meter = EntropyMeter(["a", "b"])
    meter.add(torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0]), torch.tensor([0, 0, 0, 1, 1]))
    assert meter.epoch_means() == {"a": 2.0, "b": 2.0}
    assert meter.read()[1] == {"a": 2, "b": 1}
    meter.reset()
    meter.add(torch.tensor([float("nan")]), torch.tensor([1]))
    assert meter.epoch_means() == {}  # only NaN -> no tokens


def test_alp_step_from_meter_and_reset():
    alp = AdaptiveLearningPace(["a", "b"])
    alp.add(torch.tensor([0.0, 0.0, float("nan")]), torch.tensor([0, 0, 1]))
    stats = {"q": {"entropy": torch.tensor([math.log(3.0)])}, "k": {"entropy": torch.tensor([math.log(3.0)])}}
    alp.add_routing_stats(stats, torch.tensor([1]))
    w = alp.step()
    # H = {a: 0, b: log 3} -> softmax = 1/4, 3/4
    assert w["a"] == pytest.approx(0.75) and w["b"] == pytest.approx(0.25)
    assert alp.history[-1]["tokens"] == {"a": 2, "b": 2}
    assert alp.meter.epoch_means() == {}  # reset by step


def test_alp_modality_without_tokens_previous():
    alp = AdaptiveLearningPace(["a", "b", "c"])  # missing="previous"
    # epoch 1: c has no tokens and was never measured: out of the softmax, weight 1
    w = alp.step({"a": 0.0, "b": math.log(3.0)})
    assert w == pytest.approx({"a": 0.75, "b": 0.25, "c": 1.0})
    # epoch 2: b has no tokens: keeps its previous H = log 3
    w = alp.step({"a": 0.0, "c": 0.0})
    # exp(H) = 1, 3, 1 -> softmax 1/5, 3/5, 1/5
    assert w == pytest.approx({"a": 0.8, "b": 0.4, "c": 0.8})
    assert alp.entropy == pytest.approx({"a": 0.0, "b": math.log(3.0), "c": 0.0})


def test_alp_modality_without_tokens_neutral():
    alp = AdaptiveLearningPace(["a", "b", "c"], missing="neutral")
    alp.step({"a": 0.0, "b": math.log(3.0), "c": 0.0})
    w = alp.step({"a": 0.0, "c": math.log(3.0)})
    assert w == pytest.approx({"a": 0.75, "b": 1.0, "c": 0.25})
    # fewer than two modalities measured: all ones (1 - softmax of one value would be 0)
    assert alp.step({"a": 0.3}) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert AdaptiveLearningPace(["only"]).step({"only": 2.0}) == {"only": 1.0}


def test_alp_disabled_is_ones_but_logs_entropy():
    alp = AdaptiveLearningPace(["a", "b"], enabled=False)
    alp.add(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    assert alp.step() == {"a": 1.0, "b": 1.0}
    assert alp.weight_tensor().tolist() == [1.0, 1.0]
    assert alp.history[-1]["measured"] == {"a": 0.0, "b": 1.0}
    assert not alp.scales_gradients and not alp.scales_losses


def test_alp_loss_mode():
    alp = AdaptiveLearningPace(["a", "b", "c"], mode="loss")
    assert alp.task_loss_scale(["a", "c"]) == 1.0  # initial weights
    alp.step({"a": 0.0, "b": math.log(2.0), "c": math.log(3.0)})
    assert alp.task_loss_scale(["a", "c"]) == pytest.approx((5 / 6 + 3 / 6) / 2)
    assert alp.task_loss_scale(["b"]) == pytest.approx(4 / 6)
    assert alp.weight_tensor().tolist() == [1.0, 1.0, 1.0]  # no gradient scaling in mode "loss"
    assert alp.scales_losses and not alp.scales_gradients
    with pytest.raises(ValueError, match="unknown"):
        alp.task_loss_scale(["z"])
    with pytest.raises(ValueError):
        AdaptiveLearningPace(["a"], mode="lr")


def test_alp_state_dict_json_round_trip():
    alp = AdaptiveLearningPace(["a", "b", "c"])
    alp.step({"a": 0.0, "b": math.log(2.0)})
    alp.add(torch.tensor([0.5, 1.5, 2.0]), torch.tensor([0, 0, 2]))  # a partial epoch
    state = json.loads(json.dumps(alp.state_dict(), allow_nan=False))
    restored = AdaptiveLearningPace(["a", "b", "c"])
    restored.load_state_dict(state)
    assert restored.weights == alp.weights and restored.entropy == alp.entropy
    assert restored.history == json.loads(json.dumps(alp.history))
    assert restored.meter.epoch_means() == alp.meter.epoch_means()
    for m in (alp, restored):
        m.add(torch.tensor([1.0]), torch.tensor([1]))
    assert restored.step() == alp.step()
    with pytest.raises(ValueError, match="mode"):
        AdaptiveLearningPace(["a", "b", "c"], mode="loss").load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# scale_gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(5, 4), (2, 5, 4)])
def test_scale_gradient_forward_identity_backward_scaled(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    weight = torch.rand(shape[-2], generator=g)  # (T,), broadcast over the batch
    y = scale_gradient(x, weight)
    assert y.dtype == dtype and torch.equal(y, x)
    upstream = torch.randn(shape, generator=g).to(dtype)
    y.backward(upstream)
    compute = torch.promote_types(dtype, torch.float32)
    expected = (upstream.to(compute) * weight.to(compute)[:, None]).to(dtype)
    assert x.grad.dtype == dtype and torch.equal(x.grad, expected)


def test_scale_gradient_gradcheck_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.rand(2, 3, dtype=torch.float64, generator=g)

    # gradcheck compares with finite differences of the forward, which is the identity: give the
    # checked function the forward x * w (the detached term adds x * (w - 1) without a gradient)
    # so its numerical Jacobian is diag(w), the Jacobian scale_gradient's backward must produce.
    def scaled_forward(t):
        return scale_gradient(t, weight) + (t * (weight[..., None] - 1)).detach()

    assert torch.autograd.gradcheck(scaled_forward, (x,))
    assert torch.autograd.gradgradcheck(lambda t: scaled_forward(t) ** 2, (x,))
    # the plain function's Jacobian is diag(w) too (not the identity of its forward)
    jac = torch.autograd.functional.jacobian(lambda t: scale_gradient(t, weight), x)
    expected = torch.diag(weight[..., None].expand(2, 3, 4).reshape(-1)).reshape(2, 3, 4, 2, 3, 4)
    assert torch.equal(jac, expected)


def test_scale_gradient_no_grad_for_weight_and_checks_shapes():
    x = torch.randn(3, 2, requires_grad=True)
    weight = torch.tensor([0.5, 0.0, 2.0], requires_grad=True)
    (scale_gradient(x, weight) * 3).sum().backward()
    assert weight.grad is None
    assert torch.equal(x.grad, torch.tensor([[1.5, 1.5], [0.0, 0.0], [6.0, 6.0]]))
    with pytest.raises(ValueError, match="broadcast"):
        scale_gradient(x, torch.ones(2))
    with torch.no_grad():
        assert scale_gradient(x, weight) is x


def test_modality_gradient_scale_looks_up_weights():
    x = torch.randn(2, 3, 4, requires_grad=True)
    ids = torch.tensor([[0, 1, 2], [2, 2, 0]])
    weights = torch.tensor([1.0, 0.5, 0.25])
    y = modality_gradient_scale(x, ids, weights)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, weights[ids][..., None].expand(2, 3, 4))


def test_modality_gradient_scale_with_alp_weights_end_to_end():
    alp = AdaptiveLearningPace(["a", "b"])
    alp.step({"a": 0.0, "b": math.log(3.0)})  # w = 0.75, 0.25
    x = torch.ones(4, 2, requires_grad=True)
    ids = torch.tensor([0, 1, 1, 0])
    modality_gradient_scale(x, ids, alp.weight_tensor()).sum().backward()
    assert x.grad[:, 0].tolist() == [0.75, 0.25, 0.25, 0.75]


def test_modality_gradient_scale_under_torch_compile():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    ids = torch.tensor([[0, 1, 1], [1, 0, 1]])
    weights = torch.tensor([0.3, 0.7], dtype=torch.float32)

    def f(inp):
        h = modality_gradient_scale(lin(inp), ids, weights)
        return (h * h).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        lin.zero_grad()
        xin = x.clone().requires_grad_()
        loss = fn(xin)
        loss.backward()
        results.append((loss.detach(), xin.grad.clone(), lin.weight.grad.clone()))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=0, atol=1e-12)
    # and the scale really acted: compare with the unscaled gradient of the input
    xin = x.clone().requires_grad_()
    (lin(xin) ** 2).sum().backward()
    assert not torch.allclose(results[0][1], xin.grad)
