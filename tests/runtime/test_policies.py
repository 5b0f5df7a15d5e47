"""Eviction policies: their orderings, the paper's score, Belady's optimality, and the
routing traces Belady replays."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest

import edgemoe
from edgemoe.errors import EdgeMoEError
from edgemoe.runtime.policies import POLICIES, PolicyContext, make_policy
from edgemoe.runtime.trace import TRACE_FORMAT, TRACE_VERSION, RoutingTrace, TraceError, TraceRecorder

from store.helpers import PROMPTS, make_checkpoint, make_converted, run_prompts


def ctx(layers=(0, 1, 2, 3), experts=4, k=1, trace=None) -> PolicyContext:
    return PolicyContext(list(layers), experts, k, trace)


def synthetic_trace(ids: np.ndarray, num_experts: int) -> RoutingTrace:
    """A trace of one token per forward: ids (T, L, k)."""
    T, L, k = ids.shape
    header = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "model_type": "test", "moe_layers": list(range(L)),
              "num_experts": num_experts, "top_k": k, "tokens": T, "forwards": T}
    return RoutingTrace(header, ids.astype(np.int16), None, np.ones(T, np.int32), "synthetic")


def test_registry_lists_the_four_policies():
    assert {"lru", "lfu", "edgemoe", "belady"} <= set(POLICIES)
    with pytest.raises(EdgeMoEError, match="unknown cache policy"):
        make_policy("fifo", ctx())


def test_lru_evicts_least_recent_unprotected():
    p = make_policy("lru", ctx())
    for key in [(0, 0), (0, 1), (0, 2)]:
        p.on_insert(key)
    p.on_access((0, 0))
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    assert p.victim([(0, 0), (0, 2)]) == (0, 2)  # (0, 1) is protected: skip it


def test_lfu_counts_requests_and_breaks_ties_by_recency():
    p = make_policy("lfu", ctx())
    for key in [(0, 0), (0, 1), (0, 2)]:
        p.on_insert(key)
    p.on_request(0, [0, 1])
    p.on_request(0, [0])
    p.on_access((0, 1))
    assert p.victim([(0, 0), (0, 1), (0, 2)]) == (0, 2)  # never requested
    assert p.victim([(0, 0), (0, 1)]) == (0, 1)  # 1 request vs 2


def test_edgemoe_score_is_frequency_over_forward_distance():
    """L = -f / d with d the distance going forward from the current layer (1 = next
    layer, S = the current layer itself); the highest L goes first."""
    p = make_policy("edgemoe", ctx())
    freqs = {(2, 0): 4, (0, 1): 4, (1, 2): 8, (3, 3): 1}
    for key, f in freqs.items():
        p.on_insert(key)
        for _ in range(f):
            p.on_request(key[0], [key[1]])
    p.on_request(1, [])  # layer 1 runs now
    assert [p.distance(l) for l in range(4)] == [3, 4, 1, 2]
    scores = {k: p.score(k) for k in freqs}
    assert scores == {(2, 0): -4.0, (0, 1): -4 / 3, (1, 2): -2.0, (3, 3): -0.5}
    order, left = [], list(freqs)
    while left:
        v = p.victim(left)
        order.append(v)
        left.remove(v)
    assert order == [(3, 3), (0, 1), (1, 2), (2, 0)]


def simulate(policy, requests, capacity: int) -> int:
    """The provider's protocol on a cache of `capacity` equal slots; returns misses."""
    cache, misses = set(), 0
    for layer, ids in requests:
        policy.on_request(layer, ids)
        keys = [(layer, e) for e in ids]
        pinned = {k for k in keys if k in cache}
        for k in sorted(pinned) + [k for k in keys if k not in pinned]:
            if k not in cache:
                if len(cache) == capacity:
                    v = policy.victim([c for c in cache if c not in pinned])
                    cache.remove(v)
                    policy.on_evict(v)
                cache.add(k)
                policy.on_insert(k)
                misses += 1
            policy.on_access(k)
            pinned.discard(k)
    return misses


def optimum(requests, capacity: int) -> int:
    """Fewest misses over every possible sequence of eviction choices (exhaustive)."""

    @functools.lru_cache(maxsize=None)
    def best(i: int, cache: frozenset) -> int:
        if i == len(requests):
            return 0
        layer, ids = requests[i]
        return load(i, cache, [(layer, e) for e in ids if (layer, e) not in cache])

    def load(i, cache, missing):
        # Hits are used first, so by the time misses load nothing is protected any more:
        # any cached expert may go, the ones this layer just used included.
        if not missing:
            return best(i + 1, cache)
        k, rest = missing[0], missing[1:]
        if len(cache) < capacity:
            return 1 + load(i, cache | {k}, rest)
        return 1 + min(load(i, (cache - {v}) | {k}, rest) for v in cache)

    return best(0, frozenset())


def random_requests(rng: random.Random, L: int, E: int, k: int, T: int):
    ids = np.array([[rng.sample(range(E), k) for _ in range(L)] for _ in range(T)])  # (T, L, k)
    return ids, [(layer, tuple(int(e) for e in ids[t, layer])) for t in range(T) for layer in range(L)]


@pytest.mark.parametrize("seed", range(40))
def test_belady_is_optimal_for_single_expert_requests(seed):
    """With top-1 routing every request is one expert: classic paging, where evicting the
    expert used furthest in the future is optimal."""
    rng = random.Random(seed)
    L, E = rng.choice([(2, 4), (3, 3)])
    ids, requests = random_requests(rng, L, E, 1, rng.randint(3, 7))
    capacity = rng.randint(1, 4)
    belady = simulate(make_policy("belady", ctx(range(L), E, 1, synthetic_trace(ids, E))), requests, capacity)
    assert belady == optimum(requests, capacity)


def test_belady_bounds_the_other_policies():
    """With top-2 routing the provider serves cached experts first, so the order of loads
    depends on the cache; furthest-next-use per layer request is then near-optimal, not
    exact. Over many random traces it still beats every online policy."""
    rng = random.Random(0)
    totals = dict.fromkeys(["belady", "optimum", "lru", "lfu", "edgemoe"], 0)
    for _ in range(60):
        L, E, k = 3, 5, 2
        ids, requests = random_requests(rng, L, E, k, rng.randint(4, 6))
        capacity = rng.randint(k, 2 * k + 1)
        totals["belady"] += simulate(make_policy("belady", ctx(range(L), E, k, synthetic_trace(ids, E))),
                                     requests, capacity)
        totals["optimum"] += optimum(requests, capacity)
        for name in ("lru", "lfu", "edgemoe"):
            totals[name] += simulate(make_policy(name, ctx(range(L), E, k)), requests, capacity)
    assert totals["optimum"] <= totals["belady"] <= 1.02 * totals["optimum"], totals
    assert all(totals["belady"] < totals[n] for n in ("lru", "lfu", "edgemoe")), totals


def test_belady_refuses_a_run_that_diverges_from_the_trace():
    ids = np.array([[[0], [1]], [[2], [3]]])
    p = make_policy("belady", ctx((0, 1), 4, 1, synthetic_trace(ids, 4)))
    p.on_request(0, [0])
    with pytest.raises(EdgeMoEError, match="routing diverged from the trace synthetic at request 1"):
        p.on_request(1, [2])


def test_belady_needs_a_matching_trace():
    with pytest.raises(EdgeMoEError, match="needs a routing trace"):
        make_policy("belady", ctx())
    ids = np.zeros((2, 2, 1), np.int16)
    with pytest.raises(TraceError, match="recorded on a different model"):
        make_policy("belady", ctx((0, 1, 2), 4, 1, synthetic_trace(ids, 4)))


# ----------------------------------------------------------------------------- traces


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("policies")
    hf = make_checkpoint(d / "hf", "qwen2_moe", tokenizer_dir)
    return hf, make_converted(hf, d / "conv")


def test_trace_roundtrip_and_replay(tiny, tmp_path):
    hf, conv = tiny
    engine = edgemoe.load(hf)
    rec = TraceRecorder(engine.model)
    run_prompts(engine, PROMPTS, 5)
    path = tmp_path / "t.npz"
    saved = rec.save(path)
    engine.close()
    t = RoutingTrace.load(path)
    assert t.header["tokens"] == sum(len(p) for p in PROMPTS) + 2 * 4  # the last token needs no forward
    assert t.forward_tokens.tolist() == [len(PROMPTS[0])] + [1] * 4 + [len(PROMPTS[1])] + [1] * 4
    np.testing.assert_array_equal(t.ids, saved.ids)
    assert t.weights.dtype == np.float16 and t.ids.shape == (t.header["tokens"], len(t.moe_layers), 2)
    assert len(t.requests()) == len(t.forward_tokens) * len(t.moe_layers)
    # The same run replays under belady; another prompt does not.
    engine = edgemoe.load(conv, memory=None, cache_policy="belady", trace=path)
    assert engine.generate(PROMPTS[0], max_tokens=5, ignore_eos=True).stats.extra["trace_position"] > 0
    with pytest.raises(EdgeMoEError, match="diverged"):
        engine.generate([0, 9, 9, 9], max_tokens=2)
    engine.close()


def test_trace_files_are_validated(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="cannot read routing trace"):
        RoutingTrace.load(bad)
    with pytest.raises(TraceError, match="not found"):
        RoutingTrace.load(tmp_path / "missing.npz")
    obj = tmp_path / "pickle.npz"
    np.savez(obj, header=np.array([{"a": 1}], dtype=object), ids=np.zeros((1, 1, 1)), forward_tokens=np.ones(1))
    with pytest.raises(TraceError, match="cannot read"):  # object arrays would need pickle: refused
        RoutingTrace.load(obj)
    ids = np.zeros((3, 2, 1), np.int16)
    t = synthetic_trace(ids, 4)
    t.forward_tokens = np.array([1, 1], np.int32)  # only 2 of the 3 tokens
    t.save(tmp_path / "short.npz")
    with pytest.raises(TraceError, match="do not add up"):
        RoutingTrace.load(tmp_path / "short.npz")


def test_trace_option_only_with_belady(tiny, tmp_path):
    with pytest.raises(EdgeMoEError, match="only used by --cache-policy belady"):
        edgemoe.load(tiny[1], cache_policy="lru", trace=tmp_path / "x.npz")
