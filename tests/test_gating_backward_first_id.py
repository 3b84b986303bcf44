"""sm4::topk_gating_backward reads each token's first expert id in place (stride k, no column
copy): a token whose first id is -1 still raises, naming the token (its row), on the cpu kernel."""

import pytest
import torch

from sm4 import ops

pytestmark = pytest.mark.skipif("cpu" not in ops.dispatch.implemented_ops(), reason="the cpu backend (sm4._C) is not built")


@pytest.mark.parametrize("bad_token", [0, 2, 4])
def test_a_token_without_a_first_expert_raises_naming_it(bad_token):
    tokens, experts, k = 5, 4, 2
    ids = torch.tensor([[0, 1], [2, -1], [1, 3], [3, 0], [1, 2]])
    ids[bad_token] = -1
    with pytest.raises(ValueError, match=rf"expert_ids\[:, 0\] \(each token's first expert\) .* \[0, 4\), but flat entry "
                                         rf"{bad_token} is -1"):
        torch.ops.sm4.topk_gating_backward(torch.zeros(tokens, k), torch.zeros(experts), torch.zeros(experts),
                                           torch.randn(tokens, experts), None, ids, torch.full((tokens,), -1), 0.0, False)
    ids[bad_token] = torch.tensor([1, -1])  # k_t = 1 is fine
    grad = torch.ops.sm4.topk_gating_backward(torch.zeros(tokens, k), torch.zeros(experts), torch.zeros(experts),
                                              torch.randn(tokens, experts), None, ids, torch.full((tokens,), -1), 0.0, False)
    assert grad.shape == (tokens, experts)
