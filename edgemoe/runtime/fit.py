"""Offline work on routing traces: fitting the expert predictors' statistics
(`edgemoe fit-predictor`) and evaluating predictors on a recorded trace.

Nothing here runs while a model generates: the runtime only reads what `fit` wrote
(predictor_stats.py) and asks the predictors of predict.py. This module sits in runtime/,
beside trace.py, because both sides share that file format and those predictor classes;
a package of its own would hold this one module and import everything back from here.

Fitting counts, on the traces' tokens, each layer's expert frequencies and the path
tables for every (distance, target); the combined predictor's alpha and the gate's tau
are chosen per target and distance on held-back forwards (see `fit`). Evaluation scores
every token of a trace as the predictor would at run time, with the expert ids and gate
look-ahead logits the trace recorded (`trace_scores`).

Traces of encoder-decoder models (seq2seq.Seq2SeqTraceRecorder: header
"encoder_moe_layers") hold -1 at the positions of the stack a forward did not run, and
where expert capacity dropped a token: each (distance, target) pair counts and scores
only the rows in which both positions routed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .predict import CombinedPredictor, FreqPredictor, GatePredictor, Predictor, TablePredictor, gate_probs
from .predictor_stats import (PREDICTOR_FORMAT, PREDICTOR_VERSION, PathTable, PredictorError, PredictorStats,
                              sorted_rows)

DEFAULT_BETA = 4.0
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TAUS = (0.5, 1.0, 2.0)


# ----------------------------------------------------------------------------- fitting


def _onehot(ids: np.ndarray, E: int) -> np.ndarray:
    """(T, k) ids -> (T, E) float32 inclusion (-1: no expert)."""
    out = np.zeros((len(ids), E), np.float32)
    for s in range(ids.shape[1]):
        rows = np.nonzero(ids[:, s] >= 0)[0]
        out[rows, ids[rows, s].astype(np.int64)] = 1.0
    return out


def _routed(ids: np.ndarray, *positions: int) -> np.ndarray:
    """(T,) rows whose every listed position routed (a seq2seq trace's other stack and
    capacity drops are -1); all rows of a plain trace."""
    return np.all([(ids[:, p] >= 0).all(axis=1) for p in positions], axis=0)


def _partial(traces) -> bool:
    """Whether -1 ids are expected: traces of an encoder-decoder model."""
    return any("encoder_moe_layers" in t.header for t in traces)


def _count_tables(ids: np.ndarray, E: int, D: int) -> tuple[dict, dict]:
    """ids (T, L, k) -> one- and two-layer path tables for every (distance, target)."""
    L = ids.shape[1]
    t1, t2 = {}, {}
    for d in range(1, D + 1):
        for j in range(d, L):
            rows = ids[_routed(ids, j, j - d)]
            if len(rows):
                t1[(d, j)] = PathTable.count(sorted_rows(rows[:, j - d]), _onehot(rows[:, j], E))
            rows = ids[_routed(ids, j, j - d, j - d - 1)] if j - d >= 1 else ids[:0]
            if len(rows):
                t2[(d, j)] = PathTable.count(np.concatenate([sorted_rows(rows[:, j - d - 1]),
                                                            sorted_rows(rows[:, j - d])], axis=1),
                                             _onehot(rows[:, j], E))
    return t1, t2


def fit(traces: Sequence, max_distance: int = 2, beta: float = DEFAULT_BETA, holdout: float = 0.2) -> PredictorStats:
    """Fit frequency priors, path tables and combination weights from routing traces
    (RoutingTrace objects of one model). The combination weights are chosen on the last
    `holdout` share of the forwards with tables counted on the rest, then the tables are
    counted again on everything."""
    if not traces:
        raise PredictorError("no routing traces to fit a predictor on")
    h = traces[0].header
    for t in traces[1:]:
        t.check_model(h["moe_layers"], h["num_experts"], h["top_k"])
    L, E, k = len(h["moe_layers"]), int(h["num_experts"]), int(h["top_k"])
    D = max(1, min(max_distance, L - 1))
    ids = np.concatenate([t.ids for t in traces]).astype(np.int16)  # (T, L, k)
    if (ids < 0).any() and not _partial(traces):
        raise PredictorError("the routing traces were recorded with adaptive gating (dropped slots); "
                             "record them with plain top-k routing to fit a predictor")
    if len(ids) < 2:
        raise PredictorError("the routing traces hold fewer than 2 tokens")
    # Distances the traces' gate look-ahead logits cover: the combination is tuned for those.
    gate_depth = min((t.lookahead.shape[2] if t.lookahead is not None else 0) for t in traces)
    gate_depth = min(gate_depth, D)
    look = np.concatenate([t.lookahead[:, :, :gate_depth] for t in traces]) if gate_depth else None  # (T, L, Dg, E)
    # Split at a forward boundary so held-back rows are whole windows.
    bounds = np.cumsum(np.concatenate([t.forward_tokens for t in traces]))
    cut = int(bounds[np.searchsorted(bounds, (1 - holdout) * len(ids))]) if holdout > 0 else len(ids)
    cut = cut if 0 < cut < len(ids) else max(1, int((1 - holdout) * len(ids)))

    def stats_for(rows: np.ndarray, alpha=None, tau=None) -> PredictorStats:
        freq = np.stack([_onehot(rows[_routed(rows, j), j], E).mean(0) if _routed(rows, j).any()
                         else np.zeros(E, np.float32) for j in range(L)]).astype(np.float32)
        t1, t2 = _count_tables(rows, E, D)
        header = {"format": PREDICTOR_FORMAT, "version": PREDICTOR_VERSION, "model_type": h.get("model_type", ""),
                  "moe_layers": list(h["moe_layers"]), "num_experts": E, "top_k": k, "max_distance": D,
                  "beta": beta, "alpha": alpha or [[0.5] * L for _ in range(D)],
                  "tau": tau or [[1.0] * L for _ in range(D)]}
        return PredictorStats(header, freq, t1, t2)

    alpha = [[1.0] * L for _ in range(D)]  # table only where no gate logits were recorded
    tau = [[1.0] * L for _ in range(D)]
    if gate_depth and cut < len(ids):
        part = stats_for(ids[:cut])
        held, held_look = ids[cut:], look[cut:]
        for d in range(1, gate_depth + 1):
            for j in range(d, L):
                m = _routed(held, j, j - d)
                if not m.any():
                    continue
                rows, rows_look = held[m], held_look[m]
                truth = _onehot(rows[:, j], E)
                table = part.table_probs(j, d, rows[:, j - d], rows[:, j - d - 1] if j - d >= 1 else None)
                best = None
                for t in TAUS:
                    gate = gate_probs(rows_look[:, j - d, d - 1], k, t)
                    for a in ALPHAS:
                        s = a * table + (1 - a) * gate
                        # Recall at k and k+1 first; the Brier score breaks ties.
                        score = (round(sum(recall_at(s, truth, n) for n in (k, k + 1)), 6),
                                 -float(np.mean((s - truth) ** 2)))
                        if best is None or score > best[0]:
                            best = (score, a, t)
                alpha[d - 1][j], tau[d - 1][j] = best[1], best[2]
    from .._version import __version__

    out = stats_for(ids, alpha, tau)
    out.header["gate_depth"] = gate_depth
    out.header["fitted_on"] = [{"source": str(t.source), "tokens": int(t.ids.shape[0])} for t in traces]
    out.header["holdout_tokens"] = int(len(ids) - cut) if gate_depth else 0
    out.header["created_by"] = f"edgemoe {__version__}"
    return out


def recall_at(scores: np.ndarray, truth: np.ndarray, n: int) -> float:
    """Share of the true (row, expert) picks among each row's n highest scores."""
    top = np.argpartition(-scores, min(n, scores.shape[1]) - 1, axis=1)[:, :n]
    hits = np.take_along_axis(truth, top, axis=1).sum()
    return float(hits / max(truth.sum(), 1))


# ----------------------------------------------------------------------------- evaluation


def trace_scores(predictor: Predictor, trace, target: int, d: int) -> np.ndarray:
    """(T, E) probabilities for every token of a trace at position `target`, predicted
    from `d` MoE layers earlier, from the expert ids and the gate look-ahead logits the
    trace recorded (a predictor's `probs` would need the model's activations)."""
    if isinstance(predictor, CombinedPredictor):
        a = predictor.alpha(target, d)
        if a >= 1:
            return trace_scores(predictor.table, trace, target, d)
        g = trace_scores(predictor.gate, trace, target, d)
        return g if a <= 0 else a * trace_scores(predictor.table, trace, target, d) + (1 - a) * g
    if isinstance(predictor, TablePredictor):
        s = target - d
        return predictor.stats.table_probs(target, d, trace.ids[:, s], trace.ids[:, s - 1] if s >= 1 else None)
    if isinstance(predictor, FreqPredictor):
        return np.broadcast_to(predictor.stats.freq[target], (trace.ids.shape[0], predictor.E))
    if isinstance(predictor, GatePredictor):
        if trace.lookahead is None or trace.lookahead.shape[2] < d:
            raise PredictorError(f"{trace.source}: the trace has no gate look-ahead logits at distance {d}; "
                                 "record it with 'edgemoe trace'")
        return gate_probs(trace.lookahead[:, target - d, d - 1], predictor.k, predictor.tau(d, target))
    raise PredictorError(f"a {type(predictor).__name__} cannot be evaluated on a routing trace")


def evaluate(predictor: Predictor, trace, ns: Sequence[int], distance: int = 1) -> dict:
    """Token-level recall@n and precision@n of `predictor` on a trace, over every target
    position that has a source `distance` MoE layers earlier. Returns
    {"recall": {n: r}, "precision": {n: p}, "per_layer": {target: {n: recall}}, "tokens": T}."""
    L, k = trace.ids.shape[1], trace.ids.shape[2]
    E = int(trace.header["num_experts"])
    if (trace.ids < 0).any() and not _partial([trace]):
        raise PredictorError(f"{trace.source}: recorded with adaptive gating (dropped slots); "
                             "evaluate on a trace with plain top-k routing")
    hits = {n: 0.0 for n in ns}
    total = 0.0
    rows = 0
    per_layer = {}
    for j in range(distance, L):
        m = _routed(trace.ids, j, j - distance)
        if not m.any():
            continue
        truth = _onehot(trace.ids[m, j], E)
        scores = np.asarray(trace_scores(predictor, trace, j, distance), dtype=np.float32)[m]
        per_layer[j] = {}
        for n in ns:
            r = recall_at(scores, truth, n)
            per_layer[j][n] = r
            hits[n] += r * float(truth.sum())
        total += float(truth.sum())
        rows += len(truth)
    recall = {n: float(hits[n] / total) for n in ns} if total else {n: 0.0 for n in ns}
    precision = {n: float(hits[n] / (n * rows)) for n in ns} if rows else {n: 0.0 for n in ns}
    return {"recall": recall, "precision": precision, "per_layer": per_layer, "tokens": int(trace.ids.shape[0]),
            "top_k": k}
