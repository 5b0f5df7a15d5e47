"""How expert preloading is configured: `PrefetchConfig` and `prefetch_config`, which
turns the user's options (a RuntimeConfig, checked in config.py) and the converted
directory's fitted predictor, if any, into a configuration for the offloaded provider
(offload.py).

Two knobs decide what is worth reading ahead (the provider's notes say how):
- `threshold`: an expert is preloaded only if its predicted probability of being used
  by the target layer is at least this (0 keeps the predictor's top N whatever it says).
  None (the default) is the break-even probability measured online: what one background
  read costs the compute thread (it competes for the CPU and the interpreter) over what
  one demand read stalls it, never below AUTO_FLOOR;
- `pacing` (on by default): only as many bytes as the link can deliver before the
  target layer asks for them, from the read rate and the per-layer compute time
  measured online, looking up to `layers` MoE layers ahead, further when layers are
  short. Off, every admitted expert of the next `layers` layers is queued (the old
  behaviour with threshold 0).

With both knobs automatic (the default), decode preloading is also switched on and off
by measured speed (`DecodeSwitch`): tokens with and without it are compared in pairs now
and then, and it stays on only where it makes decode faster. A threshold or
--no-prefetch-pacing given by the user keeps it on for every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import RuntimeConfig
from .predict import FITTED, PREDICTOR_FILE, GateLookahead, Predictor, PredictorStats, make_predictor

DEFAULT_LAYERS = 1  # how many MoE layers ahead to preload without pacing
DEFAULT_PACED_LAYERS = 3  # the furthest a paced prefetch looks ahead (it goes that far only when layers are short)
AUTO_FLOOR = 0.2  # the automatic threshold never goes below this (the gate look-ahead's
# probabilities under 0.2 are used 10% of the time on the bundled model)
AUTO_START = 0.5  # the automatic threshold before anything is measured
DEFAULT_THREADS = 1  # background reader threads
SWITCH_PAIRS = 16  # the most (on, off) token pairs one comparison of preloading takes
SWITCH_EARLY = 6  # pairs after which a one-sided comparison ends early
SWITCH_RUN = 96  # decode tokens in the chosen state before the next comparison
SWITCH_MAX_RUN = 1536  # the run doubles up to this while the comparisons keep choosing "off"
SWITCH_MARGIN = 0.02  # preloading must save this share of a token's time to stay on


@dataclass
class PrefetchConfig:
    """How far ahead to preload: `layers` MoE layers (with pacing: at most), `experts` per
    layer at most (None: top_k + 1), each with a predicted probability of at least
    `threshold`; `pacing` fits the reads to the measured link rate and compute time."""

    predictor: Predictor | None = None
    layers: int = 1
    experts: int | None = None
    enabled: bool = True
    reason: str = ""  # why it is off, when it is
    threshold: float | None = None  # None: automatic (break-even, measured)
    pacing: bool = True

    @property
    def switched(self) -> bool:
        """Whether decode preloading is switched on and off by measured speed
        (`DecodeSwitch`): the automatic setting (threshold and pacing both automatic);
        a threshold or --no-prefetch-pacing given by the user keeps it on."""
        return self.threshold is None and self.pacing

    @property
    def active(self) -> bool:
        return self.enabled and self.predictor is not None

    def describe(self) -> dict:
        if not self.active:
            return {"prefetch": False, "prefetch_off": self.reason or "off"}
        return {"prefetch": True, "predictor": self.predictor.name, "prefetch_layers": self.layers,
                "prefetch_experts": self.experts or self.predictor.k + 1,
                "prefetch_threshold": "auto" if self.threshold is None else self.threshold,
                "prefetch_pacing": self.pacing}


def prefetch_config(path, model, args, config: RuntimeConfig, capacity: int, min_cache: int) -> PrefetchConfig:
    """Preloading as `config` asks for (runtime/config.py: prefetch, predictor,
    prefetch_experts, prefetch_layers, prefetch_threshold, prefetch_pacing; checked there),
    for a cache of `capacity` bytes that needs `min_cache` for one layer, with its
    defaults: on in io-exp mode; the predictor is `combined` when the converted directory holds a fitted predictor.npz, else the gate
    look-ahead (which needs no fitting); at most top_k + 1 experts per layer, each with a
    predicted probability of at least the automatic threshold, paced to the link, up to
    DEFAULT_PACED_LAYERS MoE layers ahead (one without pacing). It is off when the cache
    cannot hold two layers' experts (it could only evict what is needed)."""
    pacing = config.prefetch_pacing is not False
    threshold = None if config.prefetch_threshold is None else float(config.prefetch_threshold)
    layers = config.prefetch_layers or (DEFAULT_PACED_LAYERS if pacing else DEFAULT_LAYERS)
    experts, predictor = config.prefetch_experts, config.predictor
    if config.prefetch is False:
        return PrefetchConfig(enabled=False, reason="off (--no-prefetch)")
    if config.run_mode == "io-free":
        return PrefetchConfig(enabled=False, reason="off (io-free: every expert is in RAM)")
    moe = args.moe_layers()
    if len(moe) < 2:
        return PrefetchConfig(enabled=False, reason="off (one MoE layer: nothing to predict)")
    file = Path(path) / PREDICTOR_FILE
    method = predictor if predictor not in (None, "auto") else ("combined" if file.exists() else "gate")
    stats = PredictorStats.load(file) if method in FITTED or file.exists() else None
    pred = make_predictor(method, stats, GateLookahead.from_model(model), moe, args.experts_per_layer, args.top_k)
    if capacity < 2 * min_cache:
        reason = "off (the cache holds fewer than two layers' experts)"
        return PrefetchConfig(pred, layers, experts, enabled=False, reason=reason, threshold=threshold, pacing=pacing)
    return PrefetchConfig(pred, layers, experts, threshold=threshold, pacing=pacing)


class DecodeSwitch:
    """Whether this decode token preloads: measured, not assumed.

    Predicting and reading ahead cost the compute thread time on every layer; where the
    stall they can hide is small (a fast disk, a cache that holds most experts) or the
    link is the bottleneck and wasted reads delay demand ones, decode is faster without.
    So decode compares: tokens alternate with and without preloading, each token with it
    paired with the next one without, and the median of the pairs' time differences
    decides (pairing leaves out slow drifts: other processes, a growing context).
    Preloading stays on for the next run of tokens only if it saved at least SWITCH_MARGIN
    of a token's time. A comparison takes SWITCH_PAIRS pairs, or SWITCH_EARLY when all
    but one of them (or all but one of every six) went the same way. Runs are SWITCH_RUN
    tokens, doubled (up to SWITCH_MAX_RUN) after each comparison that again chose "off",
    so that a regime where preloading cannot pay spends ever less on trying it. A token's
    time is the interval between two consecutive decode forwards; an interval with any
    other forward between (a prefill, a new request) is no sample."""

    def __init__(self):
        self.exploring = True
        self.pairs: list[tuple[float, float]] = []  # (with, without) seconds
        self.on_s: float | None = None  # the open pair's token with preloading
        self.prev: bool | None = None  # the previous token's state while comparing
        self.last: float | None = None  # when the previous decode token began
        self.choice = True
        self.run = SWITCH_RUN
        self.left = 0  # tokens left in the current run
        self.on_tokens = self.off_tokens = 0
        self.comparisons = 0
        self.medians_ms: dict[bool, float] = {}  # the last comparison's medians

    def decode(self, now: float) -> bool:
        """A decode forward begins at `now`: whether it preloads."""
        dt = None if self.last is None else now - self.last
        self.last = now
        if self.exploring and self.prev is not None:
            if self.prev:
                self.on_s = dt
            else:
                if self.on_s is not None and dt is not None:
                    self.pairs.append((self.on_s, dt))
                self.on_s = None
                self._decide()
        if self.exploring:
            state = self.prev is not True  # with, without, with, ...
            self.prev = state
        elif self.left > 0:
            self.left -= 1
            state = self.choice
        else:  # the run is over: compare again
            self.exploring, self.pairs, self.on_s, self.prev = True, [], None, True
            state = True
        if state:
            self.on_tokens += 1
        else:
            self.off_tokens += 1
        return state

    def _decide(self) -> None:
        n = len(self.pairs)
        if n < SWITCH_EARLY:
            return
        faster = sum(a < b for a, b in self.pairs)  # pairs where preloading was faster
        slack = n // SWITCH_EARLY  # one of every six may go the other way
        if n < SWITCH_PAIRS and slack < faster < n - slack:
            return
        mid = n // 2
        diff = sorted(a - b for a, b in self.pairs)[mid]
        off = sorted(b for _, b in self.pairs)[mid]
        self.medians_ms = {True: round(1000 * sorted(a for a, _ in self.pairs)[mid], 4), False: round(1000 * off, 4)}
        choice = diff < -SWITCH_MARGIN * off
        self.run = min(2 * self.run, SWITCH_MAX_RUN) if not choice and not self.choice else SWITCH_RUN
        self.choice, self.exploring, self.left, self.prev = choice, False, self.run, None
        self.comparisons += 1

    def other(self) -> None:
        """A forward that is not one decode token: the next interval is no sample."""
        self.last = None
