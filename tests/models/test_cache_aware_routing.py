"""Cache-aware routing (models/routers.py `cache_route`, after arXiv 2412.00099): a chosen
expert that is not in memory is swapped for a resident one whose routing score is within
the margin; hand-computed swaps and weights, both code paths (one row / many rows) alike,
grouped routers, refusals, and end to end: off = the same tokens, on = swaps reported."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import edgemoe
from edgemoe import assets
from edgemoe.errors import InvalidArgument
from edgemoe.experts import DenseExpert
from edgemoe.models.moe import ExpertProvider, InRAMProvider, MoEBlock, set_cache_aware_routing
from edgemoe.models.routers import (GroupedRouter, InputScaledRouter, Router, SparseMixerRouter, cache_route,
                                    prefer_resident)

P = [[0.40, 0.25, 0.20, 0.15]]  # one token's routing probabilities over 4 experts; top-2 = {0, 1}


def router_with_probs(probs, top_k: int = 2, norm: bool = True, hidden: int = 4) -> tuple[Router, torch.Tensor]:
    """A softmax router whose probabilities for the one-hot inputs returned are `probs`."""
    n, E = len(probs), len(probs[0])
    r = Router(hidden, E, top_k, norm)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, :n] = torch.log(torch.tensor(probs, dtype=torch.float64)).float().T
    return r, torch.eye(hidden)[:n]


class Held(ExpertProvider):
    """Serves a table of experts and says a fixed set of them is resident."""

    def __init__(self, table, held):
        self.table, self.held, self.requests, self.notes = table, set(held), [], []

    def experts(self, layer, ids, x, rows=None):
        self.requests.append(sorted(ids))
        for e in ids:
            yield e, self.table[e]

    def resident(self, layer):
        return set(self.held)

    def note_cache_routing(self, layer, slots, swapped):
        self.notes.append((slots, swapped))


class OneBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def moe_blocks(self):
        return [self.block]


@pytest.mark.parametrize("margin, resident, want, swapped", [
    (0.06, {2, 3}, [0, 2], 1),  # weakest chosen (1: 0.25) -> best resident (2: 0.20), 0.05 apart
    (0.04, {2, 3}, [0, 1], 0),  # 0.05 apart: outside the margin
    (0.30, {2, 3}, [3, 2], 2),  # then 0 (0.40) -> 3 (0.15), 0.25 apart
    (0.30, {1, 3}, [3, 1], 1),  # 1 is resident and stays; 0 -> 3
    (0.30, {0, 1}, [0, 1], 0),  # both resident: nothing to do
    (0.30, set(), [0, 1], 0),  # nothing resident: nothing to prefer
])
def test_hand_computed_swaps(margin, resident, want, swapped):
    scores = torch.tensor(P)
    ids = torch.tensor([[0, 1]])
    for rows in (1, 3):  # the one-row (decode) path and the vectorised one
        new, n = prefer_resident(scores.expand(rows, -1), ids.expand(rows, -1), resident, margin)
        assert new.tolist() == [want] * rows and n == swapped * rows


def test_dropped_slots_are_left_alone():
    scores = torch.tensor(P * 2)
    ids = torch.tensor([[0, -1], [0, 1]])
    for r in range(2):
        new, n = prefer_resident(scores[r:r + 1], ids[r:r + 1], {3}, 0.3)
        assert new.tolist() == [[[3, -1]], [[0, 3]]][r] and n == 1
    new, n = prefer_resident(scores, ids, {3}, 0.3)
    assert new.tolist() == [[3, -1], [0, 3]] and n == 2


def test_both_paths_agree_on_random_routing():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        N, E, k = 6, 16, 4
        scores = torch.softmax(torch.randn(N, E, generator=g) * 2, dim=-1)
        ids = torch.topk(scores, k, dim=-1).indices
        resident = set(torch.randperm(E, generator=g)[: int(torch.randint(0, E, (1,), generator=g))].tolist())
        margin = float(torch.rand(1, generator=g)) * 0.3
        many, n = prefer_resident(scores, ids, resident, margin)
        ones = [prefer_resident(scores[i:i + 1], ids[i:i + 1], resident, margin) for i in range(N)]
        assert many.tolist() == [o[0][0].tolist() for o in ones] and n == sum(o[1] for o in ones)
        for i in range(N):  # a swap always lands on a resident expert within the margin, never a duplicate
            assert len(set(many[i].tolist())) == k
            for old, new in zip(ids[i].tolist(), many[i].tolist()):
                if old != new:
                    assert old not in resident and new in resident
                    assert scores[i, old] - scores[i, new] <= margin + 1e-7


@pytest.mark.parametrize("norm", [True, False])
def test_block_output_uses_the_swapped_expert_with_router_weights(norm):
    torch.manual_seed(0)
    H, I, E = 4, 6, 4
    router, x = router_with_probs(P, norm=norm)
    block = MoEBlock(0, router)
    table = {e: DenseExpert(torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)) for e in range(E)}
    block.provider = Held(table, {2, 3})
    plain = block(x)  # routing off: experts 0 and 1
    set_cache_aware_routing(OneBlock(block), 0.06)
    out = block(x)
    assert block.provider.requests == [[0, 1], [0, 2]]
    assert block.provider.notes == [(2, 1)]
    w0, w2 = (0.40 / 0.60, 0.20 / 0.60) if norm else (0.40, 0.20)  # the router's weights for the set {0, 2}
    want = w0 * table[0](x) + w2 * table[2](x)
    assert torch.allclose(out, want, atol=1e-6)
    assert not torch.allclose(out, plain)
    set_cache_aware_routing(OneBlock(block), None)  # off again: back to the plain routing
    assert torch.equal(block(x), plain)


def test_unchanged_rows_keep_their_weights_bit_for_bit():
    router, x = router_with_probs([[0.40, 0.25, 0.20, 0.15], [0.1, 0.2, 0.3, 0.4]], norm=True)
    w, ids, logits = router(x)
    w2, ids2, n = cache_route(router, logits, w, ids, {2, 3}, 0.06)
    assert n == 1 and ids2.tolist() == [[0, 2], [3, 2]]
    assert torch.equal(w2[1], w[1])


def test_in_ram_provider_changes_nothing():
    torch.manual_seed(1)
    H, I, E = 4, 6, 4
    router, x = router_with_probs(P)
    block = MoEBlock(0, router)
    block.provider = InRAMProvider({(0, e): DenseExpert(torch.randn(I, H), torch.randn(I, H), torch.randn(H, I))
                                    for e in range(E)})
    plain = block(x)
    set_cache_aware_routing(OneBlock(block), 1.0)
    assert torch.equal(block(x), plain)


def grouped(scoring="softmax", **kw) -> GroupedRouter:
    r = GroupedRouter(4, 4, 2, norm_topk=True, scoring=scoring, **kw)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    return r


def test_grouped_router_margin_on_choice_scores_within_kept_groups():
    # Two groups {0, 1} and {2, 3}, one kept; logits make softmax scores ~ P with group 0 kept.
    r = grouped(n_group=2, topk_group=1, group_score="max")
    logits = torch.log(torch.tensor(P))
    w, ids, lg = r.forward(logits)  # one-hot-free: weight = eye, so logits = input
    assert sorted(ids[0].tolist()) == [0, 1]
    # Expert 2 is resident and within the margin, but its group was not kept: no swap.
    w2, ids2, n = cache_route(r, lg, w, ids, {2, 3}, 0.5)
    assert n == 0 and torch.equal(ids2, ids)
    # Without group limits it is a candidate; weights: its softmax score, renormalised, scaled.
    r = grouped(scaling=2.0)
    w, ids, lg = r.forward(logits)
    w2, ids2, n = cache_route(r, lg, w, ids, {2}, 0.06)
    assert n == 1 and ids2.tolist() == [[0, 2]]
    assert torch.allclose(w2, torch.tensor([[0.40 / 0.60 * 2, 0.20 / 0.60 * 2]]), atol=1e-6)


def test_grouped_sigmoid_with_correction_bias_ranks_by_corrected_score():
    r = grouped("sigmoid", correction=True)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.3, 0.0]))
    z = torch.tensor([[2.0, 1.0, 0.0, 0.5]])  # sigmoid .881 .731 .5 .622; corrected .881 .731 .8 .622 -> {0, 2}
    w, ids, lg = r.forward(z)
    assert sorted(ids[0].tolist()) == [0, 2]
    s = torch.sigmoid(z)
    # 2 (corrected .8) is not resident; 1 (.731) is, 0.069 below.
    w2, ids2, n = cache_route(r, lg, w, ids, {0, 1}, 0.07)
    assert n == 1 and sorted(ids2[0].tolist()) == [0, 1]
    want = s[0, ids2[0]] / s[0, ids2[0]].sum()
    assert torch.allclose(w2[0], want, atol=1e-6)
    assert cache_route(r, lg, w, ids, {0, 1}, 0.06)[2] == 0


class OwnWeights(Router):
    kind = "own"

    def forward(self, x):
        w, ids, logits = super().forward(x)
        return w * 2, ids, logits


@pytest.mark.parametrize("router", [InputScaledRouter(4, 4, 1), SparseMixerRouter(4, 4, 0.01), OwnWeights(4, 4, 2, True)])
def test_router_kinds_it_cannot_apply_to_are_refused(router):
    model = OneBlock(MoEBlock(0, router))
    with pytest.raises(InvalidArgument, match=f"{router.kind} router does not support it"):
        set_cache_aware_routing(model, 0.1)


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, math.nan, True, "0.1"])
def test_margin_is_checked(bad):
    model = OneBlock(MoEBlock(0, Router(4, 4, 2, True)))
    with pytest.raises(InvalidArgument, match="margin"):
        set_cache_aware_routing(model, bad)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    from edgemoe.store.convert import convert

    conv = tmp_path_factory.mktemp("cache_routing") / "conv"
    convert(assets.MODEL_DIR, conv)
    e = edgemoe.load(conv)
    fixed = e.info["min_budget_bytes"] - e.info["min_cache_bytes"]
    small = fixed + int(0.4 * e.info["expert_bytes"])
    e.close()
    return conv, small


PROMPT = "def fibonacci(n):\n    "


def generate(conv, n=16, **kw):
    engine = edgemoe.load(conv, threads=1, **kw)
    try:
        r = engine.generate(PROMPT, max_tokens=n, ignore_eos=True)
    finally:
        engine.close()
    return r.token_ids, r.stats.extra


def test_off_gives_the_same_tokens_and_on_reports_swaps(bundled):
    conv, small = bundled
    ref = edgemoe.load(assets.MODEL_DIR, threads=1)
    want = ref.generate(PROMPT, max_tokens=16, ignore_eos=True).token_ids
    ref.close()
    tokens, s = generate(conv, memory=small, prefetch=False)
    assert tokens == want and "cache_aware_routing" not in s
    tokens, s = generate(conv, memory=small, prefetch=False, cache_aware_routing=0.2)
    assert s["cache_aware_routing"] == 0.2
    assert s["rerouted_slots"] > 0 and 0 < s["reroute_rate"] <= 1 and s["decode_rerouted_per_token"] > 0
    assert s["routed_slots"] % 16 == 0 and s["routed_slots"] >= 15 * 16  # 8 layers x top-2 per token
    # Fewer reads: swapped experts were in memory already.
    _, base = generate(conv, memory=small, prefetch=False)
    assert s["misses"] < base["misses"]
    # Without prefetching the cache evolves deterministically: the same swaps each run.
    again, s2 = generate(conv, memory=small, prefetch=False, cache_aware_routing=0.2)
    assert again == tokens and s2["rerouted_slots"] == s["rerouted_slots"]


def test_read_ahead_keeps_runs_deterministic(bundled):
    """Read-ahead reserves its room in the compute thread, so the cache (and cache-aware
    routing, which sees it) evolves the same in every run whatever the loader's timing
    (with the room taken in the loader thread, 12 runs gave 7 different outcomes)."""
    conv, small = bundled
    outcomes = set()
    for _ in range(8):
        tokens, s = generate(conv, n=24, memory=small, prefetch=False, cache_aware_routing=0.2)
        outcomes.add((tuple(tokens), s["rerouted_slots"], s["misses"]))
    assert len(outcomes) == 1


def test_options_are_checked(bundled, tmp_path, capsys):
    conv, small = bundled
    with pytest.raises(InvalidArgument, match="io-free"):
        edgemoe.load(conv, mode="io-free", cache_aware_routing=0.1)
    with pytest.raises(InvalidArgument, match="margin"):
        edgemoe.load(conv, cache_aware_routing=2.0)
    from edgemoe.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="converted model"):
        edgemoe.load(assets.MODEL_DIR, cache_aware_routing=0.1)
    from edgemoe.cli import main

    assert main(["generate", str(conv), "-p", PROMPT, "-n", "4", "--ignore-eos", "--memory", str(small),
                 "--cache-aware-routing", "0.1", "--json"]) == 0
    import json

    s = json.loads(capsys.readouterr().out)["stats"]
    assert s["cache_aware_routing"] == 0.1 and "rerouted_per_token" in s
    assert main(["generate", str(conv), "-p", PROMPT, "-n", "4", "--cache-aware-routing", "0"]) == 1
    assert "margin" in capsys.readouterr().err
