"""Replay a routing trace through the expert cache without the model (`edgemoe simulate`).

A user deciding what device or budget a model needs can record (or import) a routing
trace once and then ask, in seconds: what hit rate does each eviction policy reach with
a cache of this size, how many bytes does each token read, how fast would decoding be
at this disk bandwidth, and how well do the expert predictors do on this workload.

Inputs:
- edgemoe's own `.npz` traces (`edgemoe trace`, `generate --record-trace`);
- a CSV whose header names at least `step`, `layer` and `expert`, with optional `phase`
  (0 prefill, 1 decode) and `weight`; other columns are ignored and lines starting with
  `#` are comments. Every `step` is one model forward (a decode step or a prefill chunk,
  counted as one token: a CSV does not say how many a prefill held); within it each layer
  asks for the distinct experts of its rows. Without a `phase` column, a step where some
  layer asks for more than top-k experts is prefill. Other engines (llama.cpp
  forks, vLLM) can log this and compare.

The replay follows the runtime's cache (edgemoe.runtime.cache): one layer request at a
time, experts already cached are served first, each miss is read and inserted, evicting
the policy's victim among the cached experts (the current request's experts that are
already served may go, as in the runtime, which releases them after use). Policies are
the runtime's own classes (edgemoe.runtime.policies), Belady included: the trace is its
own future. Every expert is assumed to be the same size (`expert_bytes`). This is the
runtime with --no-read-ahead: read-ahead keeps a layer's cached experts pinned until its
misses are in, which can change a few evictions at small budgets.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EdgeMoEError
from ..utils import parse_size
from .policies import POLICIES, PolicyContext, make_policy
from .trace import RoutingTrace

CSV_REQUIRED = ("step", "layer", "expert")
PHASES = ("prefill", "decode")


class SimulationError(EdgeMoEError):
    pass


@dataclass
class Forward:
    """One model forward: its phase, token count and per-layer requests in layer order."""

    phase: str
    tokens: int
    requests: list[tuple[int, tuple[int, ...]]]


@dataclass
class Workload:
    """A routing trace as the cache sees it."""

    source: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    forwards: list[Forward]
    trace: RoutingTrace | None = None  # per-token ids, for fitting predictors

    @property
    def total_experts(self) -> int:
        return len(self.moe_layers) * self.num_experts

    def requests(self) -> list[tuple[int, frozenset[int]]]:
        """(layer, ids) for every layer call in order: what the Belady policy replays."""
        return [(layer, frozenset(ids)) for f in self.forwards for layer, ids in f.requests]

    def check_model(self, moe_layers, num_experts, top_k) -> None:  # the Belady policy asks
        pass


@dataclass
class PhaseCounts:
    hits: int = 0
    misses: int = 0
    tokens: int = 0
    forwards: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class SimResult:
    policy: str
    capacity: int  # experts the cache holds
    phases: dict[str, PhaseCounts] = field(default_factory=lambda: {p: PhaseCounts() for p in PHASES})

    def to_dict(self, expert_bytes: int | None, estimate: "Estimate | None") -> dict:
        out = {"policy": self.policy, "cache_experts": self.capacity}
        if expert_bytes:
            out["cache_bytes"] = self.capacity * expert_bytes
        for name, c in self.phases.items():
            d = {"hit_rate": round(c.hit_rate, 6), "hits": c.hits, "misses": c.misses, "tokens": c.tokens,
                 "misses_per_token": round(c.misses / c.tokens, 4) if c.tokens else None}
            if expert_bytes and c.tokens:
                d["bytes_per_token"] = int(c.misses * expert_bytes / c.tokens)
            out[name] = d
        if estimate is not None:
            out["estimate"] = estimate.decode(self.phases["decode"])
        return out


@dataclass
class Estimate:
    """Turns decode misses into stall and tokens/s: each decode token computes every MoE
    layer (`compute_ms_per_layer`) and reads its misses at `bandwidth` with no overlap
    (preloading can only do better)."""

    expert_bytes: int
    bandwidth: float  # bytes/s
    compute_ms_per_layer: float
    layers: int

    def decode(self, c: PhaseCounts) -> dict:
        if not c.tokens:
            return {}
        stall_ms = c.misses * self.expert_bytes / self.bandwidth * 1000 / c.tokens
        compute_ms = self.compute_ms_per_layer * self.layers
        return {"stall_ms_per_token": round(stall_ms, 3), "compute_ms_per_token": round(compute_ms, 3),
                "tokens_per_s": round(1000 / (stall_ms + compute_ms), 3) if stall_ms + compute_ms > 0 else None}


# ----------------------------------------------------------------------------- inputs


def load_workload(path: str | Path, top_k: int | None = None, num_experts: int | None = None) -> Workload:
    """Read a `.npz` routing trace or a CSV (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SimulationError(f"{path}: no such trace file")
    if path.suffix.lower() == ".npz":
        if top_k is not None or num_experts is not None:
            raise SimulationError(f"{path}: --top-k and --num-experts apply to CSV traces only "
                                  "(a .npz trace records them)")
        return from_trace(RoutingTrace.load(path))
    return from_csv(path, top_k, num_experts)


def from_trace(trace: RoutingTrace) -> Workload:
    h = trace.header
    layers = trace.moe_layers
    forwards, row = [], 0
    for n in trace.forward_tokens.tolist():
        block = trace.ids[row : row + n]  # (n, L, k)
        reqs = []
        for li, layer in enumerate(layers):
            # A decode step asks in routing order (the top-k slots), a prefill chunk in id order.
            ids = block[0, li] if n == 1 else np.unique(block[:, li])
            ids = tuple(int(e) for e in ids if e >= 0)
            if ids or "encoder_moe_layers" not in h:  # encoder-decoder: one stack per forward (RoutingTrace.requests)
                reqs.append((layer, ids))
        forwards.append(Forward("decode" if n == 1 else "prefill", n, reqs))
        row += n
    return Workload(str(trace.source), layers, int(h["num_experts"]), int(h["top_k"]), forwards, trace)


def from_csv(path: Path, top_k: int | None, num_experts: int | None) -> Workload:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SimulationError(f"{path}: cannot read the trace: {e}") from None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise SimulationError(f"{path}: empty trace (no header line)")
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    missing = [c for c in CSV_REQUIRED if c not in cols]
    if missing:
        raise SimulationError(f"{path}: the header lacks the column(s) {', '.join(missing)} "
                              f"(it has: {', '.join(cols) or 'nothing'}; required: {', '.join(CSV_REQUIRED)})")
    steps: dict[int, dict] = {}  # step -> {"phase": str|None, "layers": {layer: set}}
    order: list[int] = []
    for lineno, row in enumerate(reader, start=2):
        def num(col: str) -> int:
            value = (row.get(col) or "").strip()
            try:
                v = int(value)
            except ValueError:
                raise SimulationError(f"{path}: data row {lineno - 1}: column {col!r} must be an integer, "
                                      f"got {value!r}") from None
            if v < 0:
                raise SimulationError(f"{path}: data row {lineno - 1}: column {col!r} must be >= 0, got {v}")
            return v

        step, layer, expert = num("step"), num("layer"), num("expert")
        phase = None
        if "phase" in cols and (row.get("phase") or "").strip():
            p = num("phase")
            if p not in (0, 1):
                raise SimulationError(f"{path}: data row {lineno - 1}: phase must be 0 (prefill) or 1 (decode), "
                                      f"got {p}")
            phase = PHASES[p]
        if num_experts is not None and expert >= num_experts:
            raise SimulationError(f"{path}: data row {lineno - 1}: expert {expert} is out of range for "
                                  f"--num-experts {num_experts}")
        if step not in steps:
            steps[step] = {"phase": phase, "layers": {}}
            order.append(step)
        s = steps[step]
        if phase is not None and s["phase"] not in (None, phase):
            raise SimulationError(f"{path}: step {step} is marked both prefill and decode")
        s["phase"] = s["phase"] or phase
        s["layers"].setdefault(layer, set()).add(expert)
    if not steps:
        raise SimulationError(f"{path}: the trace has a header but no rows")
    layers = sorted({layer for s in steps.values() for layer in s["layers"]})
    E = num_experts if num_experts is not None else 1 + max(e for s in steps.values()
                                                             for ids in s["layers"].values() for e in ids)
    counts = [len(ids) for s in steps.values() for ids in s["layers"].values()]
    k = top_k if top_k is not None else int(np.bincount(counts).argmax())  # the usual request size
    forwards = []
    for step in sorted(order):
        s = steps[step]
        reqs = [(layer, tuple(sorted(s["layers"][layer]))) for layer in layers if layer in s["layers"]]
        big = max(len(ids) for _, ids in reqs) > k
        phase = s["phase"] or ("prefill" if big else "decode")
        forwards.append(Forward(phase, 1, reqs))  # a CSV does not say how many tokens a prefill step held
    return Workload(str(path), layers, E, k, forwards, _csv_trace(path, layers, E, k, forwards))


def _csv_trace(path: Path, layers: list[int], E: int, k: int, forwards: list[Forward]) -> RoutingTrace | None:
    """Decode steps whose every layer picked exactly k experts, as a per-token trace that
    the predictors can be fitted and evaluated on (None if there are too few)."""
    rows = []
    for f in forwards:
        by = dict(f.requests)
        if f.phase == "decode" and len(by) == len(layers) and all(len(by[l]) == k for l in layers):
            rows.append([list(by[l]) for l in layers])
    if len(rows) < 4:
        return None
    header = {"format": "edgemoe-routing-trace", "version": 2, "model_type": "csv", "moe_layers": layers,
              "num_experts": E, "top_k": k, "tokens": len(rows), "forwards": len(rows), "lookahead_depth": 0}
    ids = np.asarray(rows, dtype=np.int16)  # (T, L, k)
    return RoutingTrace(header, ids, None, np.ones(len(rows), dtype=np.int32), source=path)


# ----------------------------------------------------------------------------- replay


def parse_cache(spec: str, total: int, expert_bytes: int | None) -> int:
    """A cache size in experts: "25%" or "0.25" (a share of all experts), "64" (a count),
    or "300MB" (bytes, with expert_bytes)."""
    s = str(spec).strip()
    try:
        if s.endswith("%"):
            share = float(s[:-1]) / 100
        elif "." in s and not any(c.isalpha() for c in s):
            share = float(s)
        elif s.isdigit():
            n = int(s)
            if n < 1:
                raise SimulationError(f"--cache {spec!r}: a count of experts must be at least 1")
            return min(n, total)
        else:
            if not expert_bytes:
                raise SimulationError(f"--cache {spec!r} is a size in bytes: give --expert-bytes too")
            n = parse_size(s) // expert_bytes
            if n < 1:
                raise SimulationError(f"--cache {spec!r} holds no whole expert of {expert_bytes} bytes")
            return min(n, total)
    except ValueError:
        raise SimulationError(f"--cache {spec!r}: expected a share (25% or 0.25), a count (64) or a size "
                              "(300MB)") from None
    if not 0 < share <= 1:
        raise SimulationError(f"--cache {spec!r}: a share must be in (0, 1]")
    return max(1, round(share * total))


def simulate(work: Workload, policy: str, capacity: int) -> SimResult:
    """Replay every request through a cache of `capacity` experts under `policy`."""
    if capacity < 1:
        raise SimulationError("the cache must hold at least one expert")
    ctx = PolicyContext(list(work.moe_layers), work.num_experts, work.top_k, work if policy == "belady" else None)
    pol = make_policy(policy, ctx)
    cached: set[tuple[int, int]] = set()
    res = SimResult(policy, capacity)
    for f in work.forwards:
        counts = res.phases[f.phase]
        counts.tokens += f.tokens
        counts.forwards += 1
        pol.on_forward(f.tokens)
        for layer, ids in f.requests:
            pol.on_request(layer, list(ids))
            keys = [(layer, e) for e in ids]
            hits = [key for key in keys if key in cached]
            misses = [key for key in keys if key not in cached]
            for key in hits:  # served first, as the provider does
                counts.hits += 1
                pol.on_access(key)
            for key in misses:
                counts.misses += 1
                if len(cached) >= capacity:
                    victim = pol.victim(cached)
                    cached.discard(victim)
                    pol.on_evict(victim)
                cached.add(key)
                pol.on_insert(key)
                pol.on_access(key)
    return res


def sweep(work: Workload, policies: list[str], points: int = 16) -> dict[str, list[tuple[int, float]]]:
    """Decode hit rate (all phases when there is no decode) over cache sizes from one
    layer's top-k up to every expert."""
    lo, hi = max(1, work.top_k), work.total_experts
    sizes = sorted({int(round(lo + (hi - lo) * i / (points - 1))) for i in range(points)})
    phase = "decode" if any(f.phase == "decode" for f in work.forwards) else "prefill"
    return {p: [(n, simulate(work, p, n).phases[phase].hit_rate) for n in sizes] for p in policies}


def plot_sweep(curves: dict[str, list[tuple[int, float]]], total: int, out: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ax.plot([100 * n / total for n, _ in pts], [100 * h for _, h in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("cache size (% of all experts)")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def predictor_report(work: Workload, fit_fraction: float, ns: list[int]) -> dict:
    """Fit the predictors on the first `fit_fraction` of the per-token trace and evaluate
    them on the rest at distance 1 (recall@n and precision@n)."""
    from .fit import evaluate, fit
    from .predict import PredictorError, make_predictor

    t = work.trace
    if t is None or ((t.ids < 0).any() and "encoder_moe_layers" not in t.header):  # seq2seq -1s: fit.py skips them
        return {"skipped": "needs per-token plain top-k routing (a .npz trace without adaptive gating, or a CSV "
                           "with decode steps of exactly top-k experts per layer)"}
    if len(work.moe_layers) < 2:
        return {"skipped": "needs at least two MoE layers"}
    bounds = np.cumsum(t.forward_tokens)
    cut = int(bounds[min(np.searchsorted(bounds, fit_fraction * len(t.ids)), len(bounds) - 1)])
    if not 2 <= cut < len(t.ids):
        return {"skipped": f"too few tokens ({len(t.ids)}) to split at {fit_fraction}"}
    head, tail = _slice(t, 0, cut), _slice(t, cut, len(t.ids))
    try:
        stats = fit([head], max_distance=2, holdout=0.2)
    except PredictorError as e:
        return {"skipped": str(e)}
    methods = ["freq", "table"] + (["gate", "combined"] if t.lookahead is not None else [])
    out = {"fit_tokens": cut, "eval_tokens": len(t.ids) - cut}
    for m in methods:
        pred = make_predictor(m, stats, None, work.moe_layers, work.num_experts, work.top_k)
        r = evaluate(pred, tail, ns, distance=1)
        out[m] = {"recall": {str(n): round(v, 4) for n, v in r["recall"].items()},
                  "precision": {str(n): round(v, 4) for n, v in r["precision"].items()}}
    return out


def _slice(t: RoutingTrace, a: int, b: int) -> RoutingTrace:
    bounds = np.concatenate([[0], np.cumsum(t.forward_tokens)])
    keep = (bounds[:-1] >= a) & (bounds[1:] <= b)
    look = t.lookahead[a:b] if t.lookahead is not None else None
    weights = t.weights[a:b] if t.weights is not None else None
    header = dict(t.header, tokens=b - a, forwards=int(keep.sum()))
    return RoutingTrace(header, t.ids[a:b], weights, t.forward_tokens[keep], source=t.source, lookahead=look)


__all__ = ["Workload", "Forward", "SimResult", "Estimate", "load_workload", "simulate", "sweep", "parse_cache",
           "plot_sweep", "predictor_report", "POLICIES"]
