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
