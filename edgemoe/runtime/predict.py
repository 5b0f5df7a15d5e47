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

Fitted statistics are stored beside the converted model as `predictor.npz`
(predictor_stats.py). For a forward of N > 1 rows (a prefill chunk), the experts are
ranked by the probability that at least one row picks them, 1 - prod_rows(1 - p).

This module is what the runtime runs. Fitting and evaluating predictors on recorded
traces is offline work, in fit.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .predictor_stats import PREDICTOR_FILE, PredictorError, PredictorStats

__all__ = ["METHODS", "FITTED", "PREDICTOR_FILE", "PredictorError", "PredictorStats", "GateLookahead", "gate_probs",
           "Predictor", "FreqPredictor", "TablePredictor", "GatePredictor", "CombinedPredictor", "make_predictor"]

METHODS = ("freq", "table", "gate", "combined")
FITTED = ("freq", "table", "combined")  # methods that need predictor.npz


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

    def ranked(self, target: int, pos: int, ids: dict, x: torch.Tensor | None, n: int) -> list[tuple[int, float]]:
        """`top` with each expert's probability of being used at `target` (for N rows:
        that at least one row uses it), most likely first."""
        if x is not None and x.shape[0] == 1:
            if not all(isinstance(v, list) for v in ids.values()):
                ids = {q: v if isinstance(v, list) else np.asarray(v).reshape(-1).tolist() for q, v in ids.items()}
            p = self.probs_one(target, pos, ids, x)
            top = sorted(range(len(p)), key=p.__getitem__, reverse=True)[:n]
            return [(e, min(1.0, float(p[e]))) for e in top]
        p = self.probs(target, pos, ids, x)
        agg = p[0] if len(p) == 1 else 1.0 - np.prod(1.0 - np.clip(p, 0.0, 1.0), axis=0)
        top = np.argsort(-agg, kind="stable")[:n].tolist()
        return [(e, min(1.0, float(agg[e]))) for e in top]


class FreqPredictor(Predictor):
    """Each layer's frequency prior, whatever came before."""

    name = "freq"

    def __init__(self, stats: PredictorStats):
        super().__init__(len(stats.moe_layers), stats.num_experts, stats.top_k, stats.max_distance)
        self.stats = stats

    def probs(self, target, pos, ids, x):
        n = len(ids[pos])
        return np.broadcast_to(self.stats.freq[target], (n, self.E))

    def probs_one(self, target, pos, ids, x):
        return self.stats.freq[target].tolist()


class TablePredictor(FreqPredictor):
    """EdgeMoE's path tables, backing off to the frequency prior beyond their distance."""

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


class GatePredictor(Predictor):
    """The target layer's router applied to the current MoE input (gate look-ahead)."""

    name = "gate"

    def __init__(self, gate: GateLookahead | None, num_layers: int, num_experts: int, top_k: int,
                 stats: PredictorStats | None = None, max_distance: int = 2):
        super().__init__(num_layers, num_experts, top_k, max_distance)
        self.gate, self.stats = gate, stats

    def tau(self, d: int, target: int) -> float:
        """The fitted softmax temperature for `target` at distance d (1 where none was fitted)."""
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


class CombinedPredictor(Predictor):
    """alpha * table + (1 - alpha) * gate, with the fitted alpha per target and distance."""

    name = "combined"
    needs_rows = True

    def __init__(self, table: TablePredictor, gate: GatePredictor):
        super().__init__(table.L, table.E, table.k, table.max_distance)
        self.table, self.gate, self.stats = table, gate, table.stats

    def alpha(self, target: int, d: int) -> float:
        """The table's weight for `target` at distance d (0, the gate alone, beyond the fit)."""
        return self.stats.alpha(d, target) if d <= self.stats.max_distance else 0.0

    def probs(self, target, pos, ids, x):
        a = self.alpha(target, target - pos)
        if a >= 1:
            return self.table.probs(target, pos, ids, x)
        g = self.gate.probs(target, pos, ids, x)
        return g if a <= 0 else a * self.table.probs(target, pos, ids, x) + (1 - a) * g

    def probs_one(self, target, pos, ids, x):
        a = self.alpha(target, target - pos)
        if a >= 1:
            return self.table.probs_one(target, pos, ids, x)
        g = self.gate.probs_one(target, pos, ids, x)
        if a <= 0:
            return g
        t = self.table.probs_one(target, pos, ids, x)
        return [a * u + (1 - a) * v for u, v in zip(t, g)]


def make_predictor(method: str, stats: PredictorStats | None, gate: GateLookahead | None,
                   moe_layers: Sequence[int], num_experts: int, top_k: int) -> Predictor:
    """A predictor by name; `stats` is required for the fitted methods, `gate` for gate
    and combined at run time (evaluation on traces reads their look-ahead logits instead: fit.py)."""
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
