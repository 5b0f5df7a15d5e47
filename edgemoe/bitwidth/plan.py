"""`edgemoe plan`: each expert's storage format, from a profile, for a quality-loss
tolerance or a size budget.

The paper's search (EdgeMoE section 4) puts the K least important experts at the low
bitwidth and the rest at the high one, growing K while the loss stays under the
tolerance. With several bitwidths the same idea becomes a path of single-expert moves:

1. For each expert, its candidate formats as points (stored bytes, predicted loss) from
   the profile; the moves down its lower convex hull (from the top format to the
   smallest) each save bytes at a predicted loss per byte saved (the slope), and those
   slopes only grow along the hull.
2. All experts' moves merged in order of slope form one path from "every expert at the
   top format" to "every expert at its smallest hull format": position k applies the k
   cheapest moves. Along it size falls and predicted loss rises as slowly as the
   profile allows (the greedy solution of this multiple-choice knapsack).
3. --target-size S: the first position whose stored expert bytes are <= S, then
   leftover bytes are spent on the upgrades that cut the predicted loss most per byte
   while the total stays <= S. Sizes are the store's (4 KiB-aligned blobs), so the
   converted model's experts take exactly the planned bytes.
4. --max-loss P: the position where the predicted loss reaches P, then *measured*: the
   model with that plan is evaluated on the calibration text, and the search gallops and
   bisects along the path on measured losses (at most --max-evals evaluations) to the
   furthest position measured within P. The returned plan's measured calibration loss is
   <= P (position 0, all experts at the top format, is taken as the reference).
5. --bytes-per-token B with --cache-size C: the first path position whose expected
   expert bytes read per decoded token (edgemoe.bitwidth.traffic: a cache of C bytes
   holding the most frequently routed blobs) are <= B.

Experts that share one blob (the profile's `shares`: a merged group, per-layer pruning's
padding) are one unit throughout: one format, their bytes once, their sensitivities
summed, so `convert --plan` keeps them shared and stores exactly the planned bytes.

Loss is the relative perplexity increase over the original model on the calibration
text (edgemoe.evaluate.relative_loss); the profile's sensitivities are increases in mean
NLL, scaled by the measured/predicted slope of the profile's full-measurement check
(`pooled_slope`) and summed over experts for a prediction (so predicted loss =
exp(slope * sum) - 1).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .._version import __version__
from ..errors import EdgeMoEError, InvalidArgument
from ..utils import format_bytes, parse_size
from .apply import Key, canonical, to_plan
from .measure import calibration_measurer
from .traffic import Traffic, first_within, traffic, unit_frequencies

DEFAULT_MAX_EVALS = 10
# Share of calibration windows the --max-loss search holds back to check its choice on.
DEFAULT_HOLDBACK = 0.25
# Share of a --max-loss tolerance kept in reserve: the search holds the calibration loss to
# (1 - margin) x the tolerance, because text the plan was not chosen on loses more. On the
# bundled model the held-out text lost 1.2-1.6x the calibration loss along the plan path, 1.2-1.3x
# near 2% (edgemoe_lab/results/plan_margin.md); 0.35 covers up to 1.54x: a 2% plan lost 1.68% there.
DEFAULT_MARGIN = 0.35
ESTIMATES = ("sensitivity", "taylor")


def parse_loss(text: str) -> float:
    """'2%' -> 0.02, '0.02' -> 0.02. A bare number must be a fraction below 1."""
    s = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)", s)
    if not m:
        raise InvalidArgument(f"--max-loss must be a non-negative percentage like 2% or a fraction like 0.02, got {text!r}")
    v = float(m.group(1))
    if m.group(2):
        v /= 100
    elif v >= 1:
        raise InvalidArgument(f"--max-loss {text}: write a percentage (e.g. {text}%) or a fraction below 1 (e.g. 0.02)")
    if not math.isfinite(v):
        raise InvalidArgument(f"--max-loss must be finite, got {text!r}")
    return v


def parse_target_size(text: str) -> int:
    try:
        n = parse_size(text)
    except EdgeMoEError:
        raise InvalidArgument(f"--target-size: cannot parse size {text!r} (examples: 300MB, 1.5GB, 512MiB, 1000000)") from None
    if n <= 0:
        raise InvalidArgument(f"--target-size must be positive, got {text!r}")
    return n


@dataclass(frozen=True)
class Move:
    """Expert `key` goes from format `src` to the smaller `dst`."""

    key: Key
    src: str
    dst: str
    saved: int  # bytes
    dloss: float  # predicted NLL increase (scaled)
    step: int  # index of this move among the expert's moves

    @property
    def slope(self) -> float:
        return self.dloss / self.saved


@dataclass
class Planner:
    """The path of moves for a profile and a set of candidate formats."""

    profile: dict
    candidates: list[str] | None = None  # formats experts may get (the top format is always one)
    top: str | None = None
    scale: float | None = None  # measured/predicted slope; None: from the profile's validation
    estimate: str = "sensitivity"  # or "taylor": sensitivity + the calibration text's first-order term
    path: list[Move] = field(init=False)

    def __post_init__(self):
        p = self.profile
        self.top = canonical(self.top or p["top_format"])
        profiled = {canonical(f): f for f in p["formats"]}
        if self.top not in profiled:
            raise InvalidArgument(f"top format {self.top} was not profiled (profiled: {', '.join(profiled)})")
        cands = [canonical(f) for f in (self.candidates or list(profiled))]
        missing = [f for f in cands if f not in profiled]
        if missing:
            raise InvalidArgument(f"format {missing[0]} was not profiled (profiled: {', '.join(profiled)}); "
                                  "re-run 'edgemoe profile --formats ...'")
        self.sizes = {f: p["formats"][profiled[f]]["bytes"] for f in profiled}
        self.bits = {f: p["formats"][profiled[f]]["bits"] for f in profiled}
        top_bytes = self.sizes[self.top]
        # Formats larger than the top one are never chosen.
        self.candidates = sorted({self.top, *[f for f in cands if self.sizes[f] <= top_bytes]},
                                 key=lambda f: (-self.sizes[f], f))
        if self.estimate not in ESTIMATES:
            raise InvalidArgument(f"unknown estimate {self.estimate!r} (choose from {', '.join(ESTIMATES)})")
        taylor = self.estimate == "taylor"
        if self.scale is None:
            self.scale = pooled_slope(p.get("validation", []), taylor)
        # Experts sharing one blob (profile `shares`: a merged group) are one unit: one
        # format, their bytes once, their sensitivities summed; keyed by the unit's owner.
        self.members: dict[Key, list[Key]] = {}
        for x in p["experts"]:
            k = (x["layer"], x["expert"])
            self.members.setdefault(tuple(x["shares"]) if x.get("shares") else k, []).append(k)
        per_expert = {
            (x["layer"], x["expert"]): {
                canonical(f): self.scale * (v + (x["first_order"][f] if taylor else 0.0))
                for f, v in x["sensitivity"].items()
            }
            for x in p["experts"]
        }
        self.sens: dict[Key, dict[str, float]] = {
            u: {f: sum(per_expert[k][f] for k in ks) for f in per_expert[u]} for u, ks in self.members.items()}
        self.keys = sorted(self.sens)  # the units
        moves = []
        for k in self.keys:
            moves += self._hull(k)
        self.path = sorted(moves, key=lambda m: (m.slope, m.key, m.step))
        # Running totals along the path.
        self.start = {k: self.top for k in self.keys}
        b = self.bytes(self.start)
        s = sum(self.sens[k][self.top] for k in self.keys)
        self.cum_bytes, self.cum_nll = [b], [s]
        for m in self.path:
            b -= m.saved
            s += m.dloss
            self.cum_bytes.append(b)
            self.cum_nll.append(s)

    def _hull(self, key: Key) -> list[Move]:
        """The moves down the lower convex hull of (bytes, loss) of one expert's formats."""
        sens = self.sens[key]
        cur, moves = self.top, []
        while True:
            best = None
            for f in self.candidates:
                saved = self.sizes[cur] - self.sizes[f]
                if saved <= 0:
                    continue
                slope = (sens[f] - sens[cur]) / saved
                # Equal slopes: take the longer step (the shorter one is on the same line).
                if best is None or slope < best[0] - 1e-18 or (abs(slope - best[0]) <= 1e-18 and saved > best[1]):
                    best = (slope, saved, f)
            if best is None:
                return moves
            _, saved, f = best
            moves.append(Move(key, cur, f, saved, sens[f] - sens[cur], len(moves)))
            cur = f

    # --- plans

    def formats_at(self, k: int) -> dict[Key, str]:
        """The plan (every expert's format) after the first k moves of the path."""
        out = dict(self.start)
        for m in self.path[:k]:
            out[m.key] = m.dst
        return self.expand(out)

    def expand(self, units: dict[Key, str]) -> dict[Key, str]:
        """Every expert's format from its unit's."""
        return {k: units[u] for u, ks in self.members.items() for k in ks}

    def bytes(self, formats: dict[Key, str]) -> int:
        """Stored bytes of a plan: each unit's blob once."""
        return sum(self.sizes[formats[u]] for u in self.keys)

    def predicted(self, formats: dict[Key, str]) -> float:
        """Predicted relative perplexity increase of a plan."""
        return math.expm1(sum(self.sens[u][formats[u]] for u in self.keys))

    @property
    def smallest(self) -> int:
        return self.cum_bytes[-1]

    def position_for_loss(self, max_loss: float) -> int:
        """The furthest path position whose predicted loss is <= max_loss."""
        limit = math.log1p(max_loss)
        best = 0
        for k, s in enumerate(self.cum_nll):
            if s <= limit:
                best = k
        return best

    def for_size(self, target: int) -> dict[Key, str]:
        """The plan of least predicted loss found whose stored bytes are <= target."""
        if target < self.smallest:
            low = self.formats_at(len(self.path))
            counts = _counts(low)
            raise InvalidArgument(
                f"--target-size {format_bytes(target)} ({target} bytes) is below the smallest possible plan: "
                f"{format_bytes(self.smallest)} ({self.smallest} bytes) with every expert in its smallest format "
                f"({', '.join(f'{f} x{n}' for f, n in counts.items())})")
        k = next(i for i, b in enumerate(self.cum_bytes) if b <= target)
        plan = {u: f for u, f in self.formats_at(k).items() if u in self.sens}
        slack = target - self.bytes(plan)
        while True:  # spend the leftover bytes on the best upgrades that still fit
            best = None
            for key, cur in plan.items():
                for f in self.candidates:
                    cost = self.sizes[f] - self.sizes[cur]
                    gain = self.sens[key][cur] - self.sens[key][f]
                    if 0 < cost <= slack and gain > 0 and (best is None or gain / cost > best[0]):
                        best = (gain / cost, key, f, cost)
            if best is None:
                return self.expand(plan)
            _, key, f, cost = best
            plan[key] = f
            slack -= cost


def pooled_slope(validation: list[dict], taylor: bool = False) -> float:
    """Measured over predicted loss, least squares through the origin over every checked
    (expert, format) of the profile: the large losses, which decide plans, weigh most.
    1.0 without checks; clamped to [0.25, 4]."""
    key = "predicted_taylor" if taylor else "predicted"
    pts = [(p, m) for v in validation for p, m in zip(v.get(key, []), v.get("measured", []))]
    spp = sum(p * p for p, _ in pts)
    if not pts or spp <= 0:
        return 1.0
    return min(max(sum(p * m for p, m in pts) / spp, 0.25), 4.0)


def _counts(formats: dict[Key, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in formats.values():
        out[f] = out.get(f, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass
class Evaluation:
    position: int | None
    expert_bytes: int
    predicted: float
    measured: float  # what the search compares with the tolerance: the worse of the two parts
    parts: dict | None = None  # {"search": loss, "held_back": loss} when calibration is split

    def to_dict(self) -> dict:
        out = {"moves": self.position, "expert_bytes": self.expert_bytes, "predicted_loss": self.predicted,
               "measured_loss": self.measured}
        if self.parts:
            out.update({f"{k}_loss": v for k, v in self.parts.items()})
        return out


def search_loss(planner: Planner, max_loss: float, measure: Callable[[dict[Key, str]], float],
                max_evals: int = DEFAULT_MAX_EVALS, log: Callable[[str], None] | None = None
                ) -> tuple[dict[Key, str], list[Evaluation]]:
    """The furthest path position whose measured loss is <= max_loss, found by galloping
    from the predicted position and bisecting on measured losses."""
    n = len(planner.path)
    evals: dict[int, Evaluation] = {}

    def ok(k: int) -> bool:
        if k == 0:
            return True
        if k not in evals:
            plan = planner.formats_at(k)
            got = measure(plan)
            parts = got if isinstance(got, dict) else None
            ev = Evaluation(k, planner.cum_bytes[k], math.expm1(planner.cum_nll[k]),
                            max(parts.values()) if parts else got, parts)
            evals[k] = ev
            if log:
                split = (f" (search part {100 * parts['search']:+.2f}%, held back {100 * parts['held_back']:+.2f}%)"
                         if parts else "")
                log(f"  {k:4d} moves: {format_bytes(ev.expert_bytes):>9} of experts, predicted {100 * ev.predicted:+.2f}%, "
                    f"measured {100 * ev.measured:+.2f}%{split}")
        return evals[k].measured <= max_loss

    def budget() -> bool:
        return len(evals) < max_evals

    k0 = planner.position_for_loss(max_loss)
    lo, hi = 0, n + 1  # lo: furthest position known within the tolerance; hi: nearest known beyond it
    if n == 0:
        return planner.formats_at(0), []
    if k0 == 0:
        k0 = 1
    if ok(k0):
        lo = k0
        step = max(1, (n - lo) // 16)
        while lo < n and budget():
            k = min(n, lo + step)
            if ok(k):
                lo = k
                step *= 2
            else:
                hi = k
                break
        if lo == n:
            hi = n + 1
    else:
        hi = k0
        step = max(1, k0 // 16)
        while budget():
            k = hi - step
            if k <= 0:
                break
            if ok(k):
                lo = k
                break
            hi = k
            step *= 2
    while hi - lo > 1 and hi <= n and budget():
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return planner.formats_at(lo), [evals[k] for k in sorted(evals)]


# ----------------------------------------------------------------------------- running it


def plan_summary(planner: Planner, formats: dict[Key, str], hidden: int, inter: int) -> dict:
    """Sizes count each stored blob once (a merged group is one blob)."""
    n = len(planner.keys)
    b = planner.bytes(formats)
    top = planner.sizes[planner.top] * n
    return {
        "expert_bytes": b,
        "top_bytes": top,
        "ratio": top / b if b else None,
        "bits_per_weight": sum(planner.bits[formats[u]] for u in planner.keys) / n if n else None,
        "counts": _counts(formats),
        "blobs": n,
    }


def make_plan(profile: dict, *, max_loss: float | None = None, target_size: int | None = None,
              bytes_per_token: float | None = None, cache_size: int | None = None,
              candidates: list[str] | None = None, top: str | None = None, estimate: str = "sensitivity",
              verify: bool = True,
              max_evals: int = DEFAULT_MAX_EVALS, model_dir: str | Path | None = None, calib: str | Path | None = None,
              holdback: float = DEFAULT_HOLDBACK, margin: float = DEFAULT_MARGIN, heldout: str | Path | None = None,
              progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Plan for exactly one of max_loss (a fraction: 0.02 is 2%), target_size (bytes) or
    bytes_per_token (expected expert bytes read per decoded token with an expert cache of
    cache_size bytes, edgemoe.bitwidth.traffic: the first plan along the path, in the
    order of least predicted loss, that reads no more). With cache_size, the plan's
    expected bytes per token are reported ('traffic') whatever the objective.
    Returns the plan as a JSON-ready dict ('meta' holds the numbers).

    holdback: the share of the calibration windows the --max-loss search does not fit
    on: a position is within the tolerance only if both parts are, so that the plan
    holds beyond the text it was chosen on (0: search on all of it). margin: the share
    of max_loss held in reserve for other text: the search keeps the measured
    calibration loss <= (1 - margin) * max_loss (0: up to max_loss itself). heldout: a
    text the plan is only measured on, afterwards, and reported (`heldout_loss`)."""
    if sum(x is not None for x in (max_loss, target_size, bytes_per_token)) != 1:
        raise InvalidArgument("give exactly one of --max-loss, --target-size and --bytes-per-token")
    if bytes_per_token is not None and cache_size is None:
        raise InvalidArgument("--bytes-per-token needs --cache-size: the expert cache the bytes are read past")
    if bytes_per_token is not None and not (math.isfinite(bytes_per_token) and bytes_per_token >= 0):
        raise InvalidArgument(f"--bytes-per-token must be a non-negative size, got {bytes_per_token}")
    if cache_size is not None and cache_size < 0:
        raise InvalidArgument(f"--cache-size must be >= 0, got {cache_size}")
    if max_loss is not None and max_loss < 0:
        raise InvalidArgument(f"--max-loss must be >= 0, got {max_loss}")
    if max_evals < 1:
        raise InvalidArgument(f"--max-evals must be at least 1, got {max_evals}")
    if not 0 <= holdback < 1:
        raise InvalidArgument(f"--holdback must be in [0, 1), got {holdback}")
    if not (math.isfinite(margin) and 0 <= margin < 1):
        raise InvalidArgument(f"--margin must be in [0, 1), got {margin}")
    if heldout is not None and not verify:
        raise InvalidArgument("--heldout measures the plan: it cannot be combined with --no-verify")
    t0 = time.perf_counter()
    planner = Planner(profile, candidates, top, estimate=estimate)
    shape = profile["shape"]
    H, I = shape["hidden_size"], shape["expert_dim"]
    if target_size is not None:
        formats = planner.for_size(target_size)  # checks the target before anything is loaded
    freq = unit_frequencies(profile, planner.members)

    def traffic_of(formats: dict[Key, str]) -> Traffic:
        return traffic({u: planner.sizes[formats[u]] for u in planner.keys}, freq, cache_size)

    if bytes_per_token is not None:
        k = first_within(len(planner.path), lambda i: traffic_of(planner.formats_at(i)).bytes_per_token,
                         bytes_per_token)
        if k is None:
            least = traffic_of(planner.formats_at(len(planner.path)))
            raise InvalidArgument(
                f"--bytes-per-token {format_bytes(int(bytes_per_token))}: even every expert in its smallest format "
                f"reads {format_bytes(int(least.bytes_per_token))} per token with a {format_bytes(cache_size)} "
                f"expert cache (hit rate {100 * least.hit_rate:.1f}%)")
        formats = planner.formats_at(k)
    measure, calib_info, measure_text = (calibration_measurer(profile, model_dir, calib, progress, holdback) if verify
                                         else (None, None, None))
    evaluations: list[Evaluation] = []
    aim = None if max_loss is None else max_loss * (1 - margin)  # what the calibration loss is held to
    if max_loss is not None:
        if measure is None:
            formats = planner.formats_at(planner.position_for_loss(aim))
        else:
            formats, evaluations = search_loss(planner, aim, measure, max_evals, log)
    measured, parts, heldout_info = None, None, None
    if measure is not None:
        known = next((e for e in evaluations if planner.formats_at(e.position) == formats), None)
        if known is not None:
            measured, parts = known.measured, known.parts
        else:
            got = measure(formats)
            parts = got if isinstance(got, dict) else None
            measured = max(parts.values()) if parts else got
    if heldout is not None:
        heldout_info = measure_text(formats, heldout)
    meta = {
        "created_by": f"edgemoe {__version__}",
        "profile": profile.get("path"),
        "model": str(model_dir) if model_dir else profile.get("model"),
        "margin": None if max_loss is None else {"share": margin, "calibration_tolerance": aim},
        "objective": ({"max_loss": max_loss} if max_loss is not None else {"target_size": target_size}
                      if target_size is not None else {"bytes_per_token": bytes_per_token, "cache_size": cache_size}),
        "traffic": None if cache_size is None else {"cache_size": cache_size, **traffic_of(formats).to_dict(),
                                                     "model": "static cache of the most frequently routed blobs "
                                                              "(profile frequencies); misses read per token"},
        "loss": "relative perplexity increase over the original model on the calibration text",
        "top_format": planner.top,
        "candidates": planner.candidates,
        **plan_summary(planner, formats, H, I),
        "predicted_loss": planner.predicted(formats),
        "measured_loss": measured,
        "measured_parts": parts,
        "heldout": heldout_info,
        "estimate": planner.estimate,
        "prediction_scale": planner.scale,
        "calibration": calib_info,
        "search": [e.to_dict() for e in evaluations],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    counts = _counts(formats)
    default = next(iter(counts))
    return to_plan(formats, default, meta)
