"""Expert predictors: which experts will a later MoE layer pick, before its router runs?

Positions count MoE layers in execution order (0 .. L-1). When the MoE layer at position
i has routed, the runtime knows, for every token row of the forward, the experts chosen
at positions i and i-1 and the MoE block's input x_i (N, H). A predictor turns that into
a probability for each expert e of position j = i + d (the distance d >= 1) that a
row's top-k at j includes e:

- freq      per-layer frequency prior: P(e in top-k at j), counted on traces.
- table     EdgeMoE's path statistics: the probability given the expert sets of the
            two MoE layers before the target (positions j-d-1 and j-d), counted on traces.
            Keys seen rarely or never back off with Dirichlet smoothing, first to the set
            of one layer (position j-d), then to the frequency prior:
                p1 = (c1 + beta * p0) / (n1 + beta),   p2 = (c2 + beta * p1) / (n2 + beta)
            where c counts the key's tokens that picked e at j and n the key's tokens.
- gate      gate look-ahead (as in Pre-gated MoE, ProMoE): the router of position j
            applied to x_i; needs no fitting (the routers are resident). Its softmax is
            turned into inclusion probabilities as min(1, k * softmax(logits / tau)).
- combined  alpha * table + (1 - alpha) * gate, with alpha and tau chosen per target
            layer and distance on held-back forwards of the fitting traces.

Fitted statistics are stored beside the converted model as `predictor.npz` (numpy's zip
of plain arrays, read with allow_pickle=False; see `PredictorStats`). For a forward of
N > 1 rows (a prefill chunk), the experts are ranked by the probability that at least
one row picks them, 1 - prod_rows(1 - p).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import EdgeMoEError
from ..utils import save_npz_atomic

PREDICTOR_FILE = "predictor.npz"
PREDICTOR_FORMAT = "edgemoe-expert-predictor"
PREDICTOR_VERSION = 1
METHODS = ("freq", "table", "gate", "combined")
FITTED = ("freq", "table", "combined")  # methods that need predictor.npz
DEFAULT_BETA = 4.0
ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TAUS = (0.5, 1.0, 2.0)


class PredictorError(EdgeMoEError):
    pass


# ----------------------------------------------------------------------------- gate look-ahead


class GateLookahead:
    """The routers of every MoE position (resident modules, shared with the model), each
    scoring with its own kind's semantics (biases, sigmoid scores, correction biases)."""

    def __init__(self, routers: Sequence):
        self.routers = list(routers)  # position -> Router

    @classmethod
    def from_model(cls, model) -> "GateLookahead":
        return cls([b.router for b in model.moe_blocks()])

    @torch.no_grad()
    def logits(self, x: torch.Tensor, target: int) -> torch.Tensor:
        """Router logits of position `target` on an earlier position's MoE input x (N, H),
        in the form whose softmax ranks experts as that router does."""
        return self.routers[target].lookahead_logits(x)  # (N, E)


def gate_probs(logits: np.ndarray | torch.Tensor, top_k: int, tau: float = 1.0) -> np.ndarray:
    """Inclusion probabilities min(1, k * softmax(logits / tau)) over the last axis."""
    z = np.asarray(logits, dtype=np.float32) / tau
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return np.minimum(1.0, top_k * p)


# ----------------------------------------------------------------------------- fitted statistics


def _sorted_rows(ids: np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(ids, dtype=np.int16), axis=-1)


@dataclass
class PathTable:
    """Counts for one (distance, target) pair: key rows -> (inclusion counts (E,), tokens)."""

    keys: np.ndarray  # (K, w) int16, each half sorted
    counts: np.ndarray  # (K, E) float32
    n: np.ndarray  # (K,) int32

    def lookup(self) -> dict[tuple, int]:
        return {tuple(row): i for i, row in enumerate(self.keys.tolist())}

    @classmethod
    def count(cls, keys: np.ndarray, onehot: np.ndarray) -> "PathTable":
        uniq, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        counts = np.zeros((len(uniq), onehot.shape[1]), np.float32)
        np.add.at(counts, inv, onehot)
        return cls(uniq.astype(np.int16), counts, np.bincount(inv, minlength=len(uniq)).astype(np.int32))


class PredictorStats:
    """What fitting learns from routing traces: frequency priors, path tables for each
    (distance, target) and the combination weights. Saved as predictor.npz:

        header    uint8 JSON: {"format", "version", "model_type", "moe_layers", "num_experts",
                  "top_k", "max_distance", "beta", "alpha": [[...]], "tau": [[...]],
                  "fitted_on": [{"source", "tokens"}], "created_by"}
                  alpha/tau are indexed [distance - 1][target position]
        freq      float32 (L, E)
        t1_index  int32 (R1, 2)      (distance, target) of each one-layer row
        t1_keys   int16 (R1, k)      expert set at position target - distance
        t1_counts float32 (R1, E);  t1_n int32 (R1,)
        t2_index, t2_keys (R2, 2k: sets at target - distance - 1 and target - distance),
        t2_counts, t2_n              the same for the two-layer table
    """

    def __init__(self, header: dict, freq: np.ndarray, t1: dict, t2: dict, source: str | Path = "<memory>"):
        self.header = header
        self.freq = freq  # (L, E)
        self.t1: dict[tuple[int, int], PathTable] = t1
        self.t2: dict[tuple[int, int], PathTable] = t2
        self.source = source
        self._lookups: dict = {}

    # --- facts

    @property
    def moe_layers(self) -> list[int]:
        return list(self.header["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.header["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.header["top_k"])

    @property
    def max_distance(self) -> int:
        return int(self.header["max_distance"])

    @property
    def beta(self) -> float:
        return float(self.header["beta"])

    def alpha(self, d: int, j: int) -> float:
        return float(self.header["alpha"][d - 1][j])

    def tau(self, d: int, j: int) -> float:
        return float(self.header["tau"][d - 1][j])

    def check_model(self, moe_layers: list[int], num_experts: int, top_k: int) -> None:
        if list(moe_layers) != self.moe_layers or num_experts != self.num_experts or top_k != self.top_k:
            raise PredictorError(
                f"{self.source}: fitted on a different model (MoE layers {self.moe_layers}, {self.num_experts} "
                f"experts, top-{self.top_k}; this model: {list(moe_layers)}, {num_experts}, top-{top_k}); "
                "re-run 'edgemoe fit-predictor'")

    # --- scoring

    def _table(self, which: int, d: int, j: int) -> tuple[PathTable | None, dict]:
        tables = self.t1 if which == 1 else self.t2
        t = tables.get((d, j))
        if t is None:
            return None, {}
        key = (which, d, j)
        if key not in self._lookups:
            self._lookups[key] = t.lookup()
        return t, self._lookups[key]

    def table_probs(self, j: int, d: int, src: np.ndarray, prev: np.ndarray | None) -> np.ndarray:
        """(N, E) smoothed path-table probabilities for target j at distance d, from the
        expert sets (N, k) at positions j-d (src) and j-d-1 (prev, None at the first layer)."""
        p = np.repeat(self.freq[j][None, :], len(src), axis=0)  # (N, E): the frequency prior
        beta = self.beta
        s1 = _sorted_rows(src)
        for which, keys in ((1, s1), (2, np.concatenate([_sorted_rows(prev), s1], axis=1) if prev is not None else None)):
            table, look = self._table(which, d, j)
            if table is None or keys is None:
                continue
            idx = np.fromiter((look.get(row, -1) for row in map(tuple, keys.tolist())), np.int64, len(keys))
            m = idx >= 0
            if m.any():
                i = idx[m]
                p[m] = (table.counts[i] + beta * p[m]) / (table.n[i][:, None] + beta)
        return p

    def table_probs_one(self, j: int, d: int, src: list, prev: list | None) -> list[float]:
        """table_probs for one token (expert id lists), in plain Python: the decode path."""
        if not hasattr(self, "_freq_list"):
            self._freq_list = self.freq.tolist()
            self._rows: dict = {}
        p = self._freq_list[j]
        beta = self.beta
        s1 = tuple(sorted(src))
        for which, key in ((1, s1), (2, tuple(sorted(prev)) + s1 if prev is not None else None)):
            if key is None:
                continue
            table, look = self._table(which, d, j)
            i = look.get(key) if table is not None else None
            if i is None:
                continue
            row = self._rows.get((which, d, j, i))
            if row is None:
                row = self._rows[(which, d, j, i)] = (table.counts[i].tolist(), float(table.n[i]))
            counts, n = row
            p = [(c + beta * q) / (n + beta) for c, q in zip(counts, p)]
        return p

    # --- storage

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename)."""
        arrays = {"header": np.frombuffer(json.dumps(self.header).encode(), dtype=np.uint8),
                  "freq": self.freq.astype(np.float32)}
        for name, tables, width in (("t1", self.t1, self.top_k), ("t2", self.t2, 2 * self.top_k)):
            items = sorted(tables.items())
            idx = [np.full((len(t.n), 2), dj, np.int32) for dj, t in items]
            arrays[f"{name}_index"] = np.concatenate(idx) if idx else np.zeros((0, 2), np.int32)
            arrays[f"{name}_keys"] = (np.concatenate([t.keys for _, t in items]) if items
                                      else np.zeros((0, width), np.int16))
            arrays[f"{name}_counts"] = (np.concatenate([t.counts for _, t in items]) if items
                                        else np.zeros((0, self.num_experts), np.float32))
            arrays[f"{name}_n"] = np.concatenate([t.n for _, t in items]) if items else np.zeros(0, np.int32)
        save_npz_atomic(path, arrays)

    @classmethod
    def load(cls, path: str | Path) -> "PredictorStats":
        path = Path(path)
        if not path.exists():
            raise PredictorError(f"{path}: expert predictor not found; fit one with 'edgemoe fit-predictor'")
        if not path.is_file():  # a directory or a named pipe (which would block the read forever)
            raise PredictorError(f"{path}: not a regular file; fit the predictor again with 'edgemoe fit-predictor'")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = set(z.files)
                need = {"header", "freq"} | {f"t{w}_{p}" for w in (1, 2) for p in ("index", "keys", "counts", "n")}
                if not need <= files:
                    raise PredictorError(f"{path}: not an edgemoe expert predictor (arrays: {', '.join(sorted(files))})")
                header = json.loads(z["header"].tobytes().decode())
                arrays = {name: z[name] for name in need - {"header"}}
        except PredictorError:
            raise
        except Exception as e:  # zip, npy and JSON errors all mean an unusable file
            raise PredictorError(f"{path}: cannot read expert predictor: {e}") from None
        if not isinstance(header, dict) or header.get("format") != PREDICTOR_FORMAT:
            raise PredictorError(f"{path}: not an edgemoe expert predictor")
        if header.get("version") != PREDICTOR_VERSION:
            raise PredictorError(f"{path}: predictor version {header.get('version')!r} is not supported "
                                 f"(expected {PREDICTOR_VERSION})")
        try:
            L, E, k, D = len(header["moe_layers"]), int(header["num_experts"]), int(header["top_k"]), \
                int(header["max_distance"])
            float(header["beta"])
            ok = (arrays["freq"].shape == (L, E) and np.shape(header["alpha"]) == (D, L)
                  and np.shape(header["tau"]) == (D, L))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise PredictorError(f"{path}: predictor header and arrays do not agree")
        tables = []
        for w, width in ((1, k), (2, 2 * k)):
            index, keys, counts, n = (arrays[f"t{w}_{p}"] for p in ("index", "keys", "counts", "n"))
            R = len(n)
            if (index.shape != (R, 2) or keys.shape != (R, width) or counts.shape != (R, E)
                    or (R and (keys.min() < 0 or keys.max() >= E))):
                raise PredictorError(f"{path}: table t{w} is malformed")
            out = {}
            if R:
                bounds = np.flatnonzero(np.any(np.diff(index, axis=0) != 0, axis=1)) + 1
                for a, b in zip(np.r_[0, bounds], np.r_[bounds, R]):
                    d, j = (int(v) for v in index[a])
                    out[(d, j)] = PathTable(keys[a:b].astype(np.int16), counts[a:b].astype(np.float32),
                                            n[a:b].astype(np.int32))
            tables.append(out)
        return cls(header, arrays["freq"].astype(np.float32), tables[0], tables[1], path)


# ----------------------------------------------------------------------------- fitting


def _onehot(ids: np.ndarray, E: int) -> np.ndarray:
    """(T, k) ids -> (T, E) float32 inclusion."""
    out = np.zeros((len(ids), E), np.float32)
    np.put_along_axis(out, ids.astype(np.int64), 1.0, axis=1)
    return out


def _count_tables(ids: np.ndarray, E: int, D: int) -> tuple[dict, dict]:
    """ids (T, L, k) -> one- and two-layer path tables for every (distance, target)."""
    L = ids.shape[1]
    t1, t2 = {}, {}
    for d in range(1, D + 1):
        for j in range(d, L):
            y = _onehot(ids[:, j], E)
            src = _sorted_rows(ids[:, j - d])
            t1[(d, j)] = PathTable.count(src, y)
            if j - d >= 1:
                t2[(d, j)] = PathTable.count(np.concatenate([_sorted_rows(ids[:, j - d - 1]), src], axis=1), y)
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
    if (ids < 0).any():
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
        freq = np.stack([_onehot(rows[:, j], E).mean(0) for j in range(L)]).astype(np.float32)
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
                truth = _onehot(held[:, j], E)
                table = part.table_probs(j, d, held[:, j - d], held[:, j - d - 1] if j - d >= 1 else None)
                best = None
                for t in TAUS:
                    gate = gate_probs(held_look[:, j - d, d - 1], k, t)
                    for a in ALPHAS:
                        s = a * table + (1 - a) * gate
                        # Recall at k and k+1 first; the Brier score breaks ties.
                        score = (round(sum(recall_at(s, truth, n) for n in (k, k + 1)), 6),
                                 -float(np.mean((s - truth) ** 2)))
                        if best is None or score > best[0]:
                            best = (score, a, t)
                alpha[d - 1][j], tau[d - 1][j] = best[1], best[2]
    from .. import __version__

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


# ----------------------------------------------------------------------------- predictors


class Predictor:
    """Ranks the experts of a later MoE position. Subclasses implement `probs`."""

    name = ""
    needs_rows = False  # whether `probs` reads the expert ids of earlier layers

    def __init__(self, num_layers: int, num_experts: int, top_k: int, max_distance: int):
        self.L, self.E, self.k = num_layers, num_experts, top_k
        self.max_distance = max_distance

    def probs(self, target: int, pos: int, ids: dict[int, np.ndarray], x: torch.Tensor | None) -> np.ndarray:
        """(N, E) inclusion probabilities for position `target` after position `pos` has
        routed; ids maps positions (pos, pos-1 where they ran) to (N, k) expert ids and
        x is the MoE input at pos."""
        raise NotImplementedError

    def probs_one(self, target: int, pos: int, ids: dict[int, list], x: torch.Tensor | None) -> list[float]:
        """`probs` for a single token row, as a list (ids: position -> list of expert ids)."""
        arr = {p: np.asarray([v], dtype=np.int16) for p, v in ids.items()}
        return self.probs(target, pos, arr, x)[0].tolist()

    def top(self, target: int, pos: int, ids: dict, x: torch.Tensor | None, n: int) -> list[int]:
        """The n experts most likely used at `target` (the runtime's question). With one
        token row, `ids` may map positions to plain lists (the fast decode path)."""
        if x is not None and x.shape[0] == 1:
            if not all(isinstance(v, list) for v in ids.values()):
                ids = {q: v if isinstance(v, list) else np.asarray(v).reshape(-1).tolist() for q, v in ids.items()}
            p = self.probs_one(target, pos, ids, x)
            return sorted(range(len(p)), key=p.__getitem__, reverse=True)[:n]
        p = self.probs(target, pos, ids, x)
        agg = p[0] if len(p) == 1 else 1.0 - np.prod(1.0 - np.clip(p, 0.0, 1.0), axis=0)
        if n >= len(agg):
            return np.argsort(-agg, kind="stable").tolist()
        part = np.argpartition(-agg, n - 1)[:n]
        return part[np.argsort(-agg[part], kind="stable")].tolist()

    def rank(self, target: int, pos: int, ids: dict[int, np.ndarray], x: torch.Tensor | None) -> list[tuple[int, float]]:
        """(expert, probability that some row uses it), most likely first."""
        p = self.probs(target, pos, ids, x)
        agg = p[0] if len(p) == 1 else 1.0 - np.prod(1.0 - np.clip(p, 0.0, 1.0), axis=0)
        order = np.argsort(-agg, kind="stable")
        return [(int(e), float(agg[e])) for e in order]

    def scores_from_trace(self, trace, target: int, d: int) -> np.ndarray:
        """(T, E) probabilities for every token of a trace (for evaluation)."""
        raise NotImplementedError


class FreqPredictor(Predictor):
    name = "freq"

    def __init__(self, stats: PredictorStats):
        super().__init__(len(stats.moe_layers), stats.num_experts, stats.top_k, stats.max_distance)
        self.stats = stats

    def probs(self, target, pos, ids, x):
        n = len(ids[pos])
        return np.broadcast_to(self.stats.freq[target], (n, self.E))

    def probs_one(self, target, pos, ids, x):
        return self.stats.freq[target].tolist()

    def scores_from_trace(self, trace, target, d):
        return np.broadcast_to(self.stats.freq[target], (trace.ids.shape[0], self.E))


class TablePredictor(FreqPredictor):
    name = "table"
    needs_rows = True

    def probs(self, target, pos, ids, x):
        d = target - pos
        if d > self.stats.max_distance:
            return super().probs(target, pos, ids, x)
        return self.stats.table_probs(target, d, ids[pos], ids.get(pos - 1))

    def probs_one(self, target, pos, ids, x):
        d = target - pos
        if d > self.stats.max_distance:
            return super().probs_one(target, pos, ids, x)
        return self.stats.table_probs_one(target, d, ids[pos], ids.get(pos - 1))

    def scores_from_trace(self, trace, target, d):
        s = target - d
        return self.stats.table_probs(target, d, trace.ids[:, s], trace.ids[:, s - 1] if s >= 1 else None)


class GatePredictor(Predictor):
    name = "gate"

    def __init__(self, gate: GateLookahead | None, num_layers: int, num_experts: int, top_k: int,
                 stats: PredictorStats | None = None, max_distance: int = 2):
        super().__init__(num_layers, num_experts, top_k, max_distance)
        self.gate, self.stats = gate, stats

    def tau(self, d: int, target: int) -> float:
        s = self.stats
        return s.tau(d, target) if s is not None and d <= s.max_distance else 1.0

    def probs(self, target, pos, ids, x):
        logits = self.gate.logits(x, target).numpy()
        return gate_probs(logits, self.k, self.tau(target - pos, target))

    def probs_one(self, target, pos, ids, x):
        z = self.gate.logits(x, target).view(-1).tolist()  # (E,) as floats
        tau = self.tau(target - pos, target)
        m = max(z)
        e = [math.exp((v - m) / tau) for v in z]
        scale = self.k / sum(e)
        return [min(1.0, v * scale) for v in e]

    def scores_from_trace(self, trace, target, d):
        if trace.lookahead is None or trace.lookahead.shape[2] < d:
            raise PredictorError(f"{trace.source}: the trace has no gate look-ahead logits at distance {d}; "
                                 "record it with 'edgemoe trace'")
        return gate_probs(trace.lookahead[:, target - d, d - 1], self.k, self.tau(d, target))


class CombinedPredictor(Predictor):
    name = "combined"
    needs_rows = True

    def __init__(self, table: TablePredictor, gate: GatePredictor):
        super().__init__(table.L, table.E, table.k, table.max_distance)
        self.table, self.gate, self.stats = table, gate, table.stats

    def _alpha(self, target: int, d: int) -> float:
        return self.stats.alpha(d, target) if d <= self.stats.max_distance else 0.0

    def probs(self, target, pos, ids, x):
        a = self._alpha(target, target - pos)
        if a >= 1:
            return self.table.probs(target, pos, ids, x)
        g = self.gate.probs(target, pos, ids, x)
        return g if a <= 0 else a * self.table.probs(target, pos, ids, x) + (1 - a) * g

    def probs_one(self, target, pos, ids, x):
        a = self._alpha(target, target - pos)
        if a >= 1:
            return self.table.probs_one(target, pos, ids, x)
        g = self.gate.probs_one(target, pos, ids, x)
        if a <= 0:
            return g
        t = self.table.probs_one(target, pos, ids, x)
        return [a * u + (1 - a) * v for u, v in zip(t, g)]

    def scores_from_trace(self, trace, target, d):
        a = self._alpha(target, d)
        if a >= 1:
            return self.table.scores_from_trace(trace, target, d)
        g = self.gate.scores_from_trace(trace, target, d)
        return g if a <= 0 else a * self.table.scores_from_trace(trace, target, d) + (1 - a) * g


def make_predictor(method: str, stats: PredictorStats | None, gate: GateLookahead | None,
                   moe_layers: Sequence[int], num_experts: int, top_k: int) -> Predictor:
    """A predictor by name; `stats` is required for the fitted methods, `gate` for gate
    and combined at run time (evaluation on traces reads the look-ahead logits instead)."""
    if method not in METHODS:
        raise PredictorError(f"unknown predictor {method!r} (choose from {', '.join(METHODS)})")
    if method in FITTED and stats is None:
        raise PredictorError(f"predictor {method!r} needs fitted statistics ({PREDICTOR_FILE}); "
                             "record a trace with 'edgemoe trace' and run 'edgemoe fit-predictor'")
    if stats is not None:
        stats.check_model(list(moe_layers), num_experts, top_k)
    num_layers = len(moe_layers)
    if method == "freq":
        return FreqPredictor(stats)
    if method == "table":
        return TablePredictor(stats)
    gp = GatePredictor(gate, num_layers, num_experts, top_k, stats, stats.max_distance if stats else 2)
    if method == "gate":
        return gp
    return CombinedPredictor(TablePredictor(stats), gp)


# ----------------------------------------------------------------------------- evaluation


def evaluate(predictor: Predictor, trace, ns: Sequence[int], distance: int = 1) -> dict:
    """Token-level recall@n and precision@n of `predictor` on a trace, over every target
    position that has a source `distance` MoE layers earlier. Returns
    {"recall": {n: r}, "precision": {n: p}, "per_layer": {target: {n: recall}}, "tokens": T}."""
    L, k = trace.ids.shape[1], trace.ids.shape[2]
    E = int(trace.header["num_experts"])
    if (trace.ids < 0).any():
        raise PredictorError(f"{trace.source}: recorded with adaptive gating (dropped slots); "
                             "evaluate on a trace with plain top-k routing")
    hits = {n: 0.0 for n in ns}
    total = 0.0
    rows = 0
    per_layer = {}
    for j in range(distance, L):
        truth = _onehot(trace.ids[:, j], E)
        scores = np.asarray(predictor.scores_from_trace(trace, j, distance), dtype=np.float32)
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
