"""The reference path on hand-computed cases, invariants, named edges and float64 gradcheck.

Expected values here are computed with Python's math module, not with torch, so they check the
reference independently.
"""

import math

import pytest
import torch

import sm4
from sm4 import reference
from sm4.ops import routing_metadata, topk_gating

from .helpers import router_inputs

# 3 tokens, 4 experts; router_weight = I so the logits are x itself.
#   t0: a clear order 0 > 1 > {2, 3}
#   t1: a tie between experts 2 and 3 for first place -> 2 (lower index) first
#   t2: all four equal -> experts 0 and 1
HAND_X = [[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]]


def softmax(row):
    z = [math.exp(v - max(row)) for v in row]
    return [v / sum(z) for v in z]


def cv2(values):
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return var / (mean**2 + 1e-10)


def hand_case(dtype=torch.float64):
    return torch.tensor(HAND_X, dtype=dtype), torch.eye(4, dtype=dtype)


def test_hand_case_ids_gates_entropy_and_loss_terms_in_eval():
    x, w = hand_case()
    r = topk_gating(x, w, 2, backend="reference")
    assert r.expert_ids.tolist() == [[0, 1], [2, 3], [0, 1]]
    probs = [softmax(row) for row in HAND_X]
    expected_gates = [[p[i] for i in ids] for p, ids in zip(probs, [[0, 1], [2, 3], [0, 1]])]
    torch.testing.assert_close(r.gates, torch.tensor(expected_gates, dtype=torch.float64))
    entropy = [-sum(v * math.log(v) for v in p) for p in probs]
    torch.testing.assert_close(r.entropy, torch.tensor(entropy, dtype=torch.float64))
    importance = [sum(p[e] for p in probs) for e in range(4)]
    torch.testing.assert_close(r.importance, torch.tensor(importance, dtype=torch.float64))
    # Eval: no noise, so load is the hard count of tokens per expert.
    assert r.load.tolist() == [2.0, 2.0, 1.0, 1.0]
    assert r.expert_counts.tolist() == [2, 2, 1, 1]
    assert r.load_loss.item() == pytest.approx(cv2([2, 2, 1, 1]))  # (1/3) / 2.25
    assert r.importance_loss.item() == pytest.approx(cv2(importance))
    assert r.balance_loss(0.05).item() == pytest.approx(0.05 * (cv2([2, 2, 1, 1]) + cv2(importance)))


def test_hand_case_metadata_and_combine():
    x, w = hand_case()
    r = topk_gating(x, w, 2, backend="reference")
    m = routing_metadata(r.expert_ids, 4, backend="reference")
    # flat assignments t*k+r: [0, 1, 2, 3, 0, 1] -> expert order (stable by token, then rank)
    assert m.sorted_assignment.tolist() == [0, 4, 1, 5, 2, 3]
    assert m.sorted_token.tolist() == [0, 2, 0, 2, 1, 1]
    assert m.expert_offsets.tolist() == [0, 2, 4, 5, 6]
    assert m.expert_counts.tolist() == [2, 2, 1, 1]
    assert m.assignment_row.tolist() == [[0, 2], [4, 5], [1, 3]]
    # Row i of y_sorted holds the value 10 + i: each token gets sum_r gate * (10 + its row).
    y_sorted = (10.0 + torch.arange(6, dtype=torch.float64))[:, None]
    y = sm4.ops.unpermute(y_sorted, r.gates, m, backend="reference")
    g = r.gates.tolist()
    expected = [g[0][0] * 10 + g[0][1] * 12, g[1][0] * 14 + g[1][1] * 15, g[2][0] * 11 + g[2][1] * 13]
    torch.testing.assert_close(y[:, 0], torch.tensor(expected, dtype=torch.float64))
    x_sorted = sm4.ops.permute(x, m, backend="reference")
    torch.testing.assert_close(x_sorted, x[[0, 2, 0, 2, 1, 1]])


def test_hand_case_smooth_load_in_training_with_given_noise():
    # Per-token k = (2, 1, 2) and a known noise tensor: every threshold is checked by hand.
    x, w = hand_case()
    noise = torch.tensor([[0.5, -1.0, 0.0, 2.0], [1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 4.0]], dtype=torch.float64)
    noise_std, k = 2.0, 2
    sigma = noise_std / 4
    token_k = torch.tensor([2, 1, 2])
    r = topk_gating(x, w, k, token_k=token_k, training=True, noise_std=noise_std, noise=noise, backend="reference")
    noisy = [[HAND_X[t][e] + sigma * noise[t, e].item() for e in range(4)] for t in range(3)]
    load = [0.0] * 4
    expected_ids = []
    for t, row in enumerate(noisy):
        kt = int(token_k[t])
        order = sorted(range(4), key=lambda e: (-row[e], e))
        expected_ids.append(order[:kt] + [-1] * (k - kt))
        ranked = sorted(row, reverse=True) + [-math.inf]
        for e in range(4):
            threshold = ranked[kt] if e in order[:kt] else ranked[kt - 1]
            load[e] += 0.5 * math.erfc(-(HAND_X[t][e] - threshold) / sigma / math.sqrt(2))
    assert r.expert_ids.tolist() == expected_ids
    torch.testing.assert_close(r.load, torch.tensor(load, dtype=torch.float64))
    assert r.load_loss.item() == pytest.approx(cv2(load))
    # Gates: the noisy softmax at the selected experts, 0 at the inactive rank of token 1.
    probs = [softmax(row) for row in noisy]
    expected_gates = [[probs[t][e] if e >= 0 else 0.0 for e in ids] for t, ids in enumerate(expected_ids)]
    torch.testing.assert_close(r.gates, torch.tensor(expected_gates, dtype=torch.float64))
    # Importance and entropy stay on the clean logits.
    clean = [softmax(row) for row in HAND_X]
    torch.testing.assert_close(r.importance, torch.tensor([sum(p[e] for p in clean) for e in range(4)], dtype=torch.float64))


def test_renormalize_makes_active_gates_sum_to_one():
    x, w = router_inputs(7, 5, 6, dtype=torch.float64)
    token_k = torch.tensor([1, 2, 3, 3, 2, 1, 3])
    r = topk_gating(x, w, 3, token_k=token_k, renormalize=True, backend="reference")
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(7, dtype=torch.float64))
    assert ((r.expert_ids >= 0).sum(-1) == token_k).all()
    assert (r.gates[r.expert_ids < 0] == 0).all()


def test_noise_from_generator_is_reproducible_and_equals_given_noise():
    x, w = router_inputs(5, 4, 3, dtype=torch.float64)
    a = topk_gating(x, w, 2, training=True, generator=torch.Generator().manual_seed(7), backend="reference")
    b = topk_gating(x, w, 2, training=True, generator=torch.Generator().manual_seed(7), backend="reference")
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    c = topk_gating(x, w, 2, training=True, noise=noise, backend="reference")
    for field in ("expert_ids", "gates", "load"):
        assert torch.equal(getattr(a, field), getattr(b, field))
        assert torch.equal(getattr(a, field), getattr(c, field))
    evaluated = topk_gating(x, w, 2, training=False, noise=noise * 100, backend="reference")
    clean = topk_gating(x, w, 2, backend="reference")
    assert torch.equal(evaluated.gates, clean.gates), "no noise may be added in eval mode"


def test_noise_std_zero_uses_hard_counts_while_training():
    x, w = router_inputs(9, 4, 5, dtype=torch.float64)
    r = topk_gating(x, w, 2, training=True, noise_std=0.0, backend="reference")
    assert torch.equal(r.load, r.expert_counts.double())


# ---- named edge cases ------------------------------------------------------------------------


def test_zero_tokens():
    x, w = router_inputs(0, 4, 3)
    r = topk_gating(x, w, 2, training=True, backend="reference")
    assert r.expert_ids.shape == (0, 2) and r.gates.shape == (0, 2) and r.entropy.shape == (0,)
    assert r.expert_counts.tolist() == [0, 0, 0]
    assert r.importance_loss.item() == 0.0 and r.load_loss.item() == 0.0
    m = routing_metadata(r.expert_ids, 3, backend="reference")
    assert m.expert_offsets.tolist() == [0, 0, 0, 0] and m.sorted_token.shape == (0,)
    assert sm4.ops.permute(x, m, backend="reference").shape == (0, 4)
    assert sm4.ops.unpermute(torch.zeros(0, 4), r.gates, m, backend="reference").shape == (0, 4)


def test_one_token_one_expert():
    x, w = router_inputs(1, 4, 1, dtype=torch.float64)
    r = topk_gating(x, w, 1, training=True, backend="reference")
    assert r.expert_ids.tolist() == [[0]]
    assert r.gates.item() == pytest.approx(1.0)
    assert r.entropy.item() == pytest.approx(0.0)
    assert r.importance_loss.item() == 0.0 and r.load_loss.item() == 0.0  # E = 1: CV^2 := 0


def test_k_equals_e_selects_every_expert_and_load_is_exact():
    x, w = router_inputs(6, 4, 5, dtype=torch.float64)
    r = topk_gating(x, w, 5, training=True, backend="reference")
    assert sorted(r.expert_ids[0].tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(6, dtype=torch.float64))
    # Every expert is certainly selected: threshold -inf, Phi = 1.
    torch.testing.assert_close(r.load, torch.full((5,), 6.0, dtype=torch.float64))


def test_prime_number_of_experts_and_everything_to_one_expert():
    x = torch.ones(11, 3, dtype=torch.float64)
    w = torch.zeros(3, 13, dtype=torch.float64)
    w[:, 7] = 1.0  # every token prefers expert 7; the rest tie -> expert 0 second
    r = topk_gating(x, w, 2, backend="reference")
    assert r.expert_ids.tolist() == [[7, 0]] * 11
    m = routing_metadata(r.expert_ids, 13, backend="reference")
    assert m.expert_counts[7] == 11 and m.expert_counts[0] == 11 and m.expert_counts.sum() == 22
    assert (m.expert_counts[[1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12]] == 0).all()  # empty experts


def test_identical_logits_tie_to_the_lower_index():
    x = torch.zeros(4, 3)
    w = torch.randn(3, 8)
    r = topk_gating(x, w, 3, backend="reference")
    assert r.expert_ids.tolist() == [[0, 1, 2]] * 4


def test_very_large_logits_are_stable():
    x, w = router_inputs(5, 4, 6, dtype=torch.float32, scale=1e4)
    r = topk_gating(x, w, 2, training=True, backend="reference")
    for tensor in (r.gates, r.entropy, r.importance, r.load, r.importance_loss, r.load_loss):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_token_is_isolated(bad):
    x, w = router_inputs(6, 4, 5, dtype=torch.float64)
    x[2, 1] = bad
    r = topk_gating(x, w, 2, training=True, generator=torch.Generator().manual_seed(0), backend="reference")
    good = [0, 1, 3, 4, 5]
    clean = topk_gating(x[good], w, 2, training=True, noise=torch.randn(6, 5, generator=torch.Generator().manual_seed(0))[good], backend="reference")
    assert r.expert_ids[2].tolist() == [0, 1]
    assert torch.isnan(r.gates[2]).all() and torch.isnan(r.entropy[2])
    torch.testing.assert_close(r.gates[good], clean.gates)
    torch.testing.assert_close(r.entropy[good], clean.entropy)
    torch.testing.assert_close(r.importance, clean.importance)  # the bad token is left out
    torch.testing.assert_close(r.load, clean.load)
    # The router gradient of the balancing loss stays finite.
    w.requires_grad_(True)
    out = topk_gating(x, w, 2, training=True, generator=torch.Generator().manual_seed(0), backend="reference")
    (out.importance_loss + out.load_loss + out.gates[good].sum()).backward()
    assert torch.isfinite(w.grad).all()


def test_non_contiguous_inputs_give_the_same_routing():
    x, w = router_inputs(8, 6, 5, dtype=torch.float64)
    x_t = x.t().contiguous().t()  # same values, column-major
    w_t = w.t().contiguous().t()
    assert not x_t.is_contiguous() and not w_t.is_contiguous()
    a, b = topk_gating(x, w, 2, backend="reference"), topk_gating(x_t, w_t, 2, backend="reference")
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.gates, b.gates)


# ---- invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,experts,k", [(1, 1, 1), (17, 5, 2), (64, 13, 4), (33, 7, 7)])
def test_metadata_invariants(tokens, experts, k):
    x, w = router_inputs(tokens, 8, experts, dtype=torch.float64)
    token_k = torch.randint(1, k + 1, (tokens,), generator=torch.Generator().manual_seed(3))
    r = topk_gating(x, w, k, token_k=token_k, backend="reference")
    m = routing_metadata(r.expert_ids, experts, backend="reference")
    active = r.expert_ids >= 0
    num_assignments = int(active.sum())
    assert m.expert_offsets[-1] == num_assignments == int(token_k.sum())
    assert (m.expert_offsets.diff() >= 0).all() and torch.equal(m.expert_offsets.diff(), m.expert_counts)
    # inverse o order = identity on the active assignments
    flat_rows = m.assignment_row.reshape(-1)
    active_flat = active.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(m.sorted_assignment[flat_rows[active_flat]], active_flat)
    assert (flat_rows[~active.reshape(-1)] == -1).all()
    # each row of expert e holds an assignment to e; stability: tokens ascend within an expert
    sorted_experts = r.expert_ids.reshape(-1)[m.sorted_assignment[:num_assignments]]
    bounds = m.expert_offsets.tolist()
    for e in range(experts):
        assert (sorted_experts[bounds[e] : bounds[e + 1]] == e).all()
        assert (m.sorted_assignment[bounds[e] : bounds[e + 1]].diff() > 0).all()
    assert torch.equal(m.sorted_token, m.sorted_assignment // k)


def test_routing_metadata_token_k_masks_ranks():
    ids = torch.tensor([[0, 1, 2], [2, 1, 0]])
    m = routing_metadata(ids, 3, token_k=torch.tensor([1, 2]), backend="reference")
    assert m.expert_counts.tolist() == [1, 1, 1]
    assert m.assignment_row.tolist() == [[0, -1, -1], [2, 1, -1]]


def test_cv_squared_definition():
    assert reference.cv_squared(torch.tensor([1.0, 1.0, 1.0])).item() == 0.0
    assert reference.cv_squared(torch.tensor([0.0, 0.0])).item() == 0.0
    assert reference.cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(cv2([1.0, 3.0]))


# ---- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
def test_gating_gradcheck_float64(training, renormalize):
    x, w = router_inputs(6, 4, 5, dtype=torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    noise = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    token_k = torch.tensor([1, 2, 3, 2, 1, 3])

    def gating(x, w):
        r = topk_gating(x, w, 3, token_k=token_k, training=training, noise=noise, renormalize=renormalize, backend="reference")
        return r.gates, r.importance_loss, r.load_loss

    assert torch.autograd.gradcheck(gating, (x, w))


def test_entropy_is_not_differentiated():
    x, w = router_inputs(4, 3, 5, dtype=torch.float64)
    x.requires_grad_(True)
    r = topk_gating(x, w, 2, backend="reference")
    assert not r.entropy.requires_grad


def test_permute_unpermute_gradcheck_float64():
    x, w = router_inputs(5, 3, 4, dtype=torch.float64)
    r = topk_gating(x, w, 2, token_k=torch.tensor([1, 2, 2, 1, 2]), backend="reference")
    m = routing_metadata(r.expert_ids, 4, backend="reference")
    x.requires_grad_(True)
    gates = r.gates.detach().requires_grad_(True)
    y_sorted = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sm4.ops.permute(x, m, backend="reference"), (x,))
    assert torch.autograd.gradcheck(lambda y, g: sm4.ops.unpermute(y, g, m, backend="reference"), (y_sorted, gates))
