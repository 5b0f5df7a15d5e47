"""Expert predictors on synthetic routing traces with known answers, their storage, and
the gate look-ahead recorded by the trace recorder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgemoe
from edgemoe.runtime.fit import evaluate, fit, trace_scores
from edgemoe.runtime.predict import PredictorError, PredictorStats, gate_probs, make_predictor
from edgemoe.runtime.trace import TRACE_FORMAT, RoutingTrace, TraceRecorder

from store.helpers import PROMPTS, make_checkpoint

L, E, K = 5, 8, 2
LAYERS = list(range(L))


def synthetic(ids: np.ndarray, lookahead: np.ndarray | None = None, window: int = 50) -> RoutingTrace:
    """A trace from (T, L, k) ids, in forwards of `window` tokens."""
    T = len(ids)
    fwd = np.full(T // window, window, np.int32)
    if T % window:
        fwd = np.append(fwd, T % window).astype(np.int32)
    header = {"format": TRACE_FORMAT, "version": 2, "model_type": "test", "moe_layers": LAYERS, "num_experts": E,
              "top_k": K, "tokens": T, "forwards": len(fwd),
              "lookahead_depth": 0 if lookahead is None else lookahead.shape[2]}
    return RoutingTrace(header, ids.astype(np.int16), None, fwd, lookahead=lookahead)


def path_ids(T: int, seed: int) -> np.ndarray:
    """Deterministic paths: layer j's pair of experts is a fixed function of the pairs at
    layers j-2 and j-1 (and layer 1's of layer 0's). Layer 0 is random."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((T, L, K), np.int64)
    pairs = [tuple(p) for p in np.array(np.triu_indices(E, 1)).T]  # 28 distinct pairs
    table = np.random.default_rng(99).integers(0, len(pairs), size=(L, len(pairs), len(pairs)))
    index = {p: i for i, p in enumerate(pairs)}
    for t in range(T):
        ids[t, 0] = pairs[rng.integers(len(pairs))]
        ids[t, 1] = pairs[table[1, 0, index[tuple(ids[t, 0])]]]
        for j in range(2, L):
            a, b = index[tuple(ids[t, j - 2])], index[tuple(ids[t, j - 1])]
            ids[t, j] = pairs[table[j, a, b]]
    return ids


def onehot_logits(ids: np.ndarray, scale: float = 10.0) -> np.ndarray:
    """(T, L, D=1, E) look-ahead logits that point exactly at the next layer's experts."""
    T = len(ids)
    look = np.zeros((T, L, 1, E), np.float32)
    for j in range(1, L):
        np.put_along_axis(look[:, j - 1, 0], ids[:, j].astype(np.int64), scale, axis=1)
    return look.astype(np.float16)


def rank(pred, target: int, pos: int, ids: dict, x) -> list[tuple[int, float]]:
    """(expert, probability that some row uses it), most likely first: the aggregate
    that Predictor.top ranks by, with its values."""
    p = pred.probs(target, pos, ids, x)  # (N, E)
    agg = p[0] if len(p) == 1 else 1.0 - np.prod(1.0 - np.clip(p, 0.0, 1.0), axis=0)  # (E,)
    order = np.argsort(-agg, kind="stable")
    return [(int(e), float(agg[e])) for e in order]


# ----------------------------------------------------------------------------- fitted predictors


def test_path_table_recovers_deterministic_paths():
    train = synthetic(path_ids(30000, seed=1))
    held = synthetic(path_ids(2000, seed=2))
    stats = fit([train], max_distance=1)
    table = make_predictor("table", stats, None, LAYERS, E, K)
    r = evaluate(table, held, [K, K + 1], distance=1)
    assert r["recall"][K] == pytest.approx(1.0)
    assert r["precision"][K] == pytest.approx(1.0)
    assert r["recall"][K + 1] == pytest.approx(1.0) and r["precision"][K + 1] == pytest.approx(K / (K + 1))
    freq = evaluate(make_predictor("freq", stats, None, LAYERS, E, K), held, [K], distance=1)
    assert freq["recall"][K] < 0.5  # paths carry the information, frequencies do not


def test_frequency_prior_ranks_the_most_frequent_experts():
    rng = np.random.default_rng(0)
    weights = np.array([0.3, 0.25, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02])
    ids = np.stack([np.stack([rng.choice(E, K, replace=False, p=weights) for _ in range(L)]) for _ in range(4000)])
    stats = fit([synthetic(ids)], max_distance=1)
    pred = make_predictor("freq", stats, None, LAYERS, E, K)
    for j in range(1, L):
        ranked = rank(pred, j, j - 1, {j - 1: ids[:1, j - 1]}, None)
        assert [e for e, _ in ranked[:3]] == [0, 1, 2]
        probs = [p for _, p in ranked]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(K, abs=1e-3)


def test_unseen_keys_back_off_to_one_layer_then_to_frequency():
    """Layer 2 depends only on layer 1. Held-out tokens whose (layer 0, layer 1) pair was
    never seen still get layer 2 right through the one-layer table; a layer-1 set never
    seen at all falls back to the frequency prior."""
    rng = np.random.default_rng(3)
    T = 6000
    ids = np.zeros((T, L, K), np.int64)
    for t in range(T):
        for j in range(L):
            ids[t, j] = rng.choice(E, K, replace=False)
        ids[t, 1] = [t % 4, 4 + t % 4]  # 4 possible sets at layer 1 ...
        ids[t, 2] = (ids[t, 1] + 1) % E  # ... each fixing layer 2
    ids[:, 0] = [0, 1]  # training: a single layer-0 set
    stats = fit([synthetic(ids)], max_distance=1)
    pred = make_predictor("table", stats, None, LAYERS, E, K)
    held = ids[:8].copy()
    held[:, 0] = [6, 7]  # a two-layer key never seen in training
    p = pred.probs(2, 1, {1: held[:, 1], 0: held[:, 0]}, None)  # (8, E)
    top = np.argsort(-p, axis=1)[:, :K]
    assert all(set(top[i]) == set(held[i, 2]) for i in range(8))
    unseen = np.array([[2, 3]])  # a layer-1 set never seen: the frequency prior
    np.testing.assert_allclose(pred.probs(2, 1, {1: unseen, 0: unseen}, None)[0], stats.freq[2], rtol=1e-6)


def test_combination_weights_follow_the_better_predictor():
    """Gate logits exact, paths random -> alpha near 0; the reverse -> alpha near 1."""
    rng = np.random.default_rng(5)
    rand = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(5000)])
    gate_good = fit([synthetic(rand, onehot_logits(rand))], max_distance=1)
    assert max(gate_good.header["alpha"][0][1:]) <= 0.2
    comb = make_predictor("combined", gate_good, None, LAYERS, E, K)
    held = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(500)])
    assert evaluate(comb, synthetic(held, onehot_logits(held)), [K])["recall"][K] == pytest.approx(1.0)

    paths = path_ids(20000, seed=4)
    noise = rng.normal(size=(len(paths), L, 1, E)).astype(np.float16)
    table_good = fit([synthetic(paths, noise)], max_distance=1)
    assert min(table_good.header["alpha"][0][1:]) >= 0.8
    held = path_ids(500, seed=6)
    r = evaluate(make_predictor("combined", table_good, None, LAYERS, E, K),
                 synthetic(held, rng.normal(size=(500, L, 1, E)).astype(np.float16)), [K])
    assert r["recall"][K] > 0.95


def test_rank_aggregates_rows_as_any_row_uses_it():
    stats = fit([synthetic(path_ids(3000, seed=1))], max_distance=1)
    pred = make_predictor("freq", stats, None, LAYERS, E, K)
    rows = np.zeros((3, K), np.int16)
    ranked = dict(rank(pred, 2, 1, {1: rows}, None))
    for e in range(E):
        assert ranked[e] == pytest.approx(1 - (1 - stats.freq[2, e]) ** 3, abs=1e-5)


def test_gate_probs_are_capped_inclusion_probabilities():
    p = gate_probs(np.array([[10.0, 0, 0, 0]]), top_k=2)
    assert p[0, 0] == 1.0 and p.sum() < 2 + 1e-6
    assert np.argmax(gate_probs(np.array([[0.0, 3.0, 1.0]]), 1, tau=0.5)) == 1


# ----------------------------------------------------------------------------- storage


def test_save_load_round_trip(tmp_path):
    trace = synthetic(path_ids(3000, seed=1), onehot_logits(path_ids(3000, seed=1)))
    stats = fit([trace], max_distance=2)
    stats.save(tmp_path / "p.npz")
    back = PredictorStats.load(tmp_path / "p.npz")
    assert back.header == json.loads(json.dumps(stats.header))
    for m in ("freq", "table", "combined"):
        a = make_predictor(m, stats, None, LAYERS, E, K)
        b = make_predictor(m, back, None, LAYERS, E, K)
        for d in (1, 2):
            np.testing.assert_array_equal(trace_scores(a, trace, 3, d), trace_scores(b, trace, 3, d))


def test_bad_predictor_files_are_refused(tmp_path):
    stats = fit([synthetic(path_ids(500, seed=1))], max_distance=1)
    good = tmp_path / "p.npz"
    stats.save(good)
    with pytest.raises(PredictorError, match="not found"):
        PredictorStats.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PredictorError, match="junk.npz: cannot read"):
        PredictorStats.load(tmp_path / "junk.npz")
    # An object array would need unpickling: refused, never loaded.
    np.savez(tmp_path / "pickled.npz", header=np.array([{"a": 1}], dtype=object))
    with pytest.raises(PredictorError, match="pickled.npz"):
        PredictorStats.load(tmp_path / "pickled.npz")
    with pytest.raises(PredictorError, match="different model"):
        make_predictor("table", PredictorStats.load(good), None, [0, 1, 2], E, K)
    with pytest.raises(PredictorError, match="needs fitted statistics"):
        make_predictor("table", None, None, LAYERS, E, K)
    with pytest.raises(PredictorError, match="unknown predictor"):
        make_predictor("oracle", stats, None, LAYERS, E, K)


# ----------------------------------------------------------------------------- on a real model


def test_recorded_lookahead_is_the_later_router_on_this_input(tmp_path, tokenizer_dir):
    hf = make_checkpoint(tmp_path / "hf", "mixtral", tokenizer_dir, num_hidden_layers=4)
    engine = edgemoe.load(hf)
    inputs = {}
    blocks = list(engine.model.moe_blocks())
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, b in enumerate(blocks)]
    rec = TraceRecorder(engine.model, lookahead=2)
    with torch.inference_mode():
        engine.model(torch.tensor([PROMPTS[0]]))
    trace = rec.trace()
    rec.detach()
    for h in hooks:
        h.remove()
    assert trace.lookahead.shape == (len(PROMPTS[0]), 4, 2, 4)
    for i in range(4):
        for d in (1, 2):
            got = torch.from_numpy(trace.lookahead[:, i, d - 1].astype(np.float32))
            if i + d < 4:
                want = torch.nn.functional.linear(inputs[i], blocks[i + d].router.weight).float()
                torch.testing.assert_close(got, want.half().float())
            else:
                assert not got.any()
    path = tmp_path / "t.npz"
    trace.save(path)
    back = RoutingTrace.load(path)
    np.testing.assert_array_equal(back.lookahead, trace.lookahead)
    assert back.header["version"] == 2 and back.header["lookahead_depth"] == 2
    assert all(b.hook is None for b in blocks) and not any(b._forward_pre_hooks for b in blocks)
    engine.close()


def test_single_row_fast_path_matches_the_batched_one():
    trace = synthetic(path_ids(3000, seed=1), onehot_logits(path_ids(3000, seed=1)).astype(np.float32))
    stats = fit([trace], max_distance=2)
    from edgemoe.models.routers import Router
    from edgemoe.runtime.predict import GateLookahead

    routers = []
    for i in range(L):
        r = Router(16, E, K, norm_topk=True)
        with torch.no_grad():
            r.weight.copy_(torch.randn(E, 16, generator=torch.Generator().manual_seed(i)))
        routers.append(r)
    gate = GateLookahead(routers)
    x = torch.randn(1, 16)
    for m in ("freq", "table", "gate", "combined"):
        pred = make_predictor(m, stats, gate, LAYERS, E, K)
        for j, pos in ((2, 1), (3, 1), (1, 0)):
            rows = {pos: trace.ids[5:6, pos], pos - 1: trace.ids[5:6, pos - 1]} if pos else {0: trace.ids[5:6, 0]}
            batched = pred.probs(j, pos, rows, x)[0]
            one = pred.probs_one(j, pos, {q: r[0].tolist() for q, r in rows.items()}, x)
            np.testing.assert_allclose(one, batched, rtol=1e-5, atol=1e-6)
            top = pred.top(j, pos, rows, x, 3)
            assert len(set(top)) == 3 and min(batched[top]) >= max(np.delete(batched, top)) - 1e-6
