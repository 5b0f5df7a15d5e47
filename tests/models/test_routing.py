"""Router and MoE block against values computed by hand on hand-set weights."""

from __future__ import annotations

import math

import pytest
import torch

from edgemoe.cpu import Linear
from edgemoe.models.base import MLP
from edgemoe.experts import DenseExpert
from edgemoe.models.moe import InRAMProvider, MoEBlock, Router

H = 4  # hidden size; the router weight is the identity, so router logits == x
E = 4
# Two tokens with known router logits. Token 0 ranks experts 1 > 0 > 2 > 3,
# token 1 ranks 3 > 2 > 0 > 1.
X = [[1.0, 2.0, 0.5, -1.0], [0.2, -0.3, 0.9, 1.5]]


def softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


def silu(v: float) -> float:
    return v / (1 + math.exp(-v))


def make_router(top_k: int, norm_topk: bool) -> Router:
    r = Router(H, E, top_k, norm_topk)
    with torch.no_grad():
        r.weight.copy_(torch.eye(E, H))
    return r


@pytest.mark.parametrize("norm_topk", [False, True])
def test_router_softmax_then_topk(norm_topk):
    weights, ids, logits = make_router(2, norm_topk)(torch.tensor(X))
    assert ids.tolist() == [[1, 0], [3, 2]]
    assert torch.equal(logits, torch.tensor(X))
    p0, p1 = softmax(X[0]), softmax(X[1])
    want = [[p0[1], p0[0]], [p1[3], p1[2]]]
    if norm_topk:
        want = [[w / sum(row) for w in row] for row in want]
    assert weights.flatten().tolist() == pytest.approx([w for row in want for w in row], abs=1e-6)
    # Hand values for token 0: softmax([1, 2, 0.5, -1]) gives 0.6095 and 0.2242 for the
    # top two; renormalised they are e^2 / (e^2 + e^1) = 0.7311 and 0.2689.
    if norm_topk:
        assert weights[0].tolist() == pytest.approx([0.731059, 0.268941], abs=1e-6)
    else:
        assert weights[0].tolist() == pytest.approx([0.609460, 0.224208], abs=1e-6)


def test_renormalised_softmax_equals_topk_then_softmax():
    """Mixtral's routing (top-k of the logits, then softmax over those k) is softmax then
    top-k then renormalise."""
    weights, ids, _ = make_router(3, True)(torch.tensor(X))
    assert ids.tolist() == [[1, 0, 2], [3, 2, 0]]
    for row, token in enumerate(X):
        picked = [token[e] for e in ids[row].tolist()]
        assert weights[row].tolist() == pytest.approx(softmax(picked), abs=1e-6)


def test_top1_keeps_raw_probability_without_renormalising():
    weights, ids, _ = make_router(1, False)(torch.tensor(X))
    assert ids.tolist() == [[1], [3]]
    assert weights[:, 0].tolist() == pytest.approx([softmax(X[0])[1], softmax(X[1])[3]], abs=1e-6)
    weights, _, _ = make_router(1, True)(torch.tensor(X))
    assert weights.tolist() == [[1.0], [1.0]]


# Expert e computes down(silu(gate x) * up x) with gate = I, up = (e + 1) I, down = I,
# i.e. expert_e(x)_j = silu(x_j) * (e + 1) * x_j: easy to write out by hand.
def make_experts(layer: int = 0) -> dict[tuple[int, int], DenseExpert]:
    eye = torch.eye(H)
    return {(layer, e): DenseExpert(eye, (e + 1) * eye, eye) for e in range(E)}


def expert_by_hand(e: int, x: list[float]) -> list[float]:
    return [silu(v) * (e + 1) * v for v in x]


def make_block(top_k: int, norm_topk: bool, shared: bool, provider_cls=InRAMProvider) -> MoEBlock:
    block = MoEBlock(0, Router(H, E, top_k, norm_topk), shared=MLP(H, H, "silu") if shared else None,
                     shared_gate=Linear(H, 1, bias=False) if shared else None)
    with torch.no_grad():
        block.router.weight.copy_(torch.eye(E, H))
        if shared:
            # Shared expert: down(silu(gate x) * up x) with gate = I, up = 0.5 I, down = -I.
            block.shared.gate.weight.copy_(torch.eye(H))
            block.shared.up.weight.copy_(0.5 * torch.eye(H))
            block.shared.down.weight.copy_(-torch.eye(H))
            block.shared_gate.weight.copy_(torch.tensor([[0.5, -1.0, 0.25, 2.0]]))
    block.provider = provider_cls(make_experts())
    return block


def block_by_hand(x: list[float], top_k: int, norm_topk: bool, shared: bool) -> list[float]:
    probs = softmax(x)
    ranked = sorted(range(E), key=lambda e: -probs[e])[:top_k]
    w = [probs[e] for e in ranked]
    if norm_topk:
        w = [v / sum(w) for v in w]
    out = [0.0] * H
    for e, we in zip(ranked, w):
        out = [o + we * y for o, y in zip(out, expert_by_hand(e, x))]
    if shared:
        s = [-(silu(v) * 0.5 * v) for v in x]
        g = 1 / (1 + math.exp(-(0.5 * x[0] - 1.0 * x[1] + 0.25 * x[2] + 2.0 * x[3])))
        out = [o + g * v for o, v in zip(out, s)]
    return out


@pytest.mark.parametrize(
    "top_k,norm_topk,shared", [(2, False, False), (2, True, False), (3, False, True), (1, True, True)]
)
def test_moe_block_is_weighted_sum_of_experts(top_k, norm_topk, shared):
    block = make_block(top_k, norm_topk, shared)
    with torch.no_grad():
        out = block(torch.tensor([X]))  # (1, 2, H): the multi-token path
        single = block(torch.tensor([X[:1]]))  # (1, 1, H): the single-token path
    for t, x in enumerate(X):
        assert out[0, t].tolist() == pytest.approx(block_by_hand(x, top_k, norm_topk, shared), abs=1e-5)
    assert single[0, 0].tolist() == pytest.approx(block_by_hand(X[0], top_k, norm_topk, shared), abs=1e-5)


def test_routing_hook_sees_layer_ids_weights_and_logits():
    block = make_block(2, True, False)
    seen = []
    block.hook = lambda layer, ids, weights, logits: seen.append((layer, ids, weights, logits))
    with torch.no_grad():
        block(torch.tensor([X]))
    [(layer, ids, weights, logits)] = seen
    assert layer == 0
    assert ids.tolist() == [[1, 0], [3, 2]]
    assert weights.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    assert torch.equal(logits, torch.tensor(X))


class ReversedProvider(InRAMProvider):
    """Yields the requested experts in the reverse order, as a cache-first provider may."""

    def __init__(self, experts):
        super().__init__(experts)
        self.requests = []

    def experts(self, layer, ids, x, rows=None):
        self.requests.append(list(ids))
        for e in reversed(list(ids)):
            yield e, self.table[(layer, e)]


def test_expert_arrival_order_is_bit_identical():
    torch.manual_seed(0)
    x = torch.randn(1, 9, H)  # many tokens, so several experts are shared between tokens
    for tokens in (x, x[:, :1]):
        a = make_block(3, False, True)
        b = make_block(3, False, True, provider_cls=ReversedProvider)
        with torch.no_grad():
            assert torch.equal(a(tokens), b(tokens))
        # The block asks for each needed expert once per forward.
        [wanted] = b.provider.requests
        assert len(wanted) == len(set(wanted))


def test_grouped_lookahead_orders_as_the_choice():
    """Look-ahead scores of a grouped sigmoid router with a correction bias: corrected
    scores past 1 keep their order (no tie at a clamp) and experts of the group the router
    drops sit at the bottom. Logits 0 give sigmoid 0.5 everywhere; biases (0.9, 0.7, 0,
    -0.2) make the corrected scores (1.4, 1.2, 0.5, 0.3). Groups {0, 1} and {2, 3}, one
    kept (scored by its top two): the first; the choice is experts 0 then 1."""
    from edgemoe.models.routers import NEVER, GroupedRouter

    r = GroupedRouter(2, 4, 2, norm_topk=True, scoring="sigmoid", correction=True, n_group=2, topk_group=1,
                      masked_score=float("-inf"))
    with torch.no_grad():
        r.weight.zero_()
        r.e_score_correction_bias.copy_(torch.tensor([0.9, 0.7, 0.0, -0.2]))
    x = torch.ones(1, 2)
    assert r(x)[1].tolist() == [[0, 1]]
    z = r.lookahead_logits(x)[0]
    assert z[0] > z[1] > 0 and z[2] == z[3] == NEVER
    r.n_group = 1  # no groups: every corrected score ranked, 0.5 itself at logit 0
    z = r.lookahead_logits(x)[0]
    assert z[0] > z[1] > z[2] > z[3] and abs(z[2]) < 1e-6
