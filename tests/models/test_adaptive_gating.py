"""Adaptive top-k gating: tokens keep experts only until a routing-mass threshold is met."""

import pytest
import torch

from edgemoe.errors import InvalidArgument
from edgemoe.experts import DenseExpert
from edgemoe.models.moe import ExpertProvider, MoEBlock, Router, set_adaptive_gating


def router_with_probs(probs: list[list[float]], top_k: int, norm: bool) -> tuple[Router, torch.Tensor]:
    """A router whose softmax over experts equals `probs` for inputs = one-hot rows."""
    n, E = len(probs), len(probs[0])
    r = Router(n, E, top_k, norm)
    with torch.no_grad():
        r.weight.copy_(torch.log(torch.tensor(probs)).T)  # logits = log p for one-hot inputs
    return r, torch.eye(n)


def test_confident_token_keeps_one_expert():
    r, x = router_with_probs([[0.7, 0.2, 0.05, 0.05], [0.4, 0.35, 0.2, 0.05]], top_k=2, norm=True)
    r.adaptive = 0.6
    w, ids, _ = r(x)
    assert ids.tolist() == [[0, -1], [0, 1]]
    assert torch.allclose(w, torch.tensor([[1.0, 0.0], [0.4 / 0.75, 0.35 / 0.75]]))


def test_without_renormalisation_the_kept_weight_carries_the_top_k_mass():
    r, x = router_with_probs([[0.7, 0.2, 0.05, 0.05]], top_k=2, norm=False)
    r.adaptive = 0.5
    w, ids, _ = r(x)
    assert ids.tolist() == [[0, -1]]
    assert torch.allclose(w, torch.tensor([[0.9, 0.0]]))


def test_full_mass_is_plain_top_k():
    r, x = router_with_probs([[0.4, 0.35, 0.2, 0.05]] * 2, top_k=3, norm=False)
    base = r(x)
    r.adaptive = 1.0
    assert all(torch.equal(a, b) for a, b in zip(base, r(x)))


class Recording(ExpertProvider):
    def __init__(self, table):
        self.table, self.requests = table, []

    def experts(self, layer, ids, x, rows=None):
        self.requests.append(list(ids))
        for e in ids:
            yield e, self.table[e]


@pytest.mark.parametrize("tokens", [1, 5])
def test_block_skips_dropped_experts_and_matches_hand_sum(tokens):
    torch.manual_seed(0)
    H, I, E = 8, 12, 4
    block = MoEBlock(0, Router(H, E, 2, norm_topk=True))
    with torch.no_grad():
        block.router.weight.normal_(0, 3.0)  # peaked routing so that some tokens drop a slot
    table = {e: DenseExpert(torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)) for e in range(E)}
    block.provider = Recording(table)
    set_adaptive_gating(block, 0.6)
    x = torch.randn(1, tokens, H)
    out = block(x)[0]
    w, ids, _ = block.router(x[0])
    expected = torch.zeros(tokens, H)
    for t in range(tokens):
        for slot in range(2):
            if ids[t, slot] >= 0:
                expected[t] += w[t, slot] * table[int(ids[t, slot])](x[0, t : t + 1])[0]
    assert torch.allclose(out, expected, atol=1e-5)
    requested = set(sum(block.provider.requests, []))
    assert requested == {int(i) for i in ids.flatten() if i >= 0}
    assert (ids < 0).any()  # the threshold really dropped something in this set-up


def test_bad_mass_is_rejected():
    with pytest.raises(InvalidArgument):
        set_adaptive_gating(torch.nn.Module(), 0.0)
    with pytest.raises(InvalidArgument):
        set_adaptive_gating(torch.nn.Module(), 1.5)


def test_grouped_softmax_router_covers_its_probabilities_in_their_order():
    """A grouped router with softmax scores: probabilities (0.1, 0.5, 0.3, 0.1) and a
    correction bias (+0.3 on expert 0) that makes it choose experts 0 and 1, in that
    order. Adaptive gating ranks the chosen by probability: expert 1 (0.5) covers a mass
    of 0.4 alone and expert 0 is dropped; the kept weight is renormalised to 1, then
    scaled by 2. Sigmoid scores have no distribution to cover: refused, naming the kind."""
    from edgemoe.models.routers import GroupedRouter

    r = GroupedRouter(4, 4, 2, norm_topk=True, scoring="softmax", correction=True, scaling=2.0)
    with torch.no_grad():
        r.weight.copy_(torch.log(torch.tensor([0.1, 0.5, 0.3, 0.1])).diag())
        r.e_score_correction_bias.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))
    x = torch.ones(1, 4)
    assert r(x)[1].tolist() == [[1, 0]]  # 0.5 then 0.1 + 0.3
    set_adaptive_gating(r, 0.4)
    w, ids, _ = r(x)
    assert ids.tolist() == [[1, -1]] and torch.allclose(w, torch.tensor([[2.0, 0.0]]))
    set_adaptive_gating(r, 0.55)  # 0.5 is not enough: both kept, as without adaptive gating
    w, ids, _ = r(x)
    assert ids.tolist() == [[1, 0]] and torch.allclose(w, torch.tensor([[2 * 5 / 6, 2 / 6]]))
    sig = GroupedRouter(4, 4, 2, norm_topk=True, scoring="sigmoid")
    with pytest.raises(InvalidArgument, match="grouped-sigmoid router"):
        set_adaptive_gating(sig, 0.5)
