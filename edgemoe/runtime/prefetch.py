"""How expert preloading is configured: `PrefetchConfig`, the checks of the user's
options and `prefetch_config`, which turns them (and the converted directory's fitted
predictor, if any) into a configuration for the offloaded provider (offload.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from .predict import FITTED, METHODS, PREDICTOR_FILE, GateLookahead, Predictor, PredictorStats, make_predictor

DEFAULT_LAYERS = 1  # how many MoE layers ahead to preload
DEFAULT_THREADS = 1  # background reader threads


@dataclass
class PrefetchConfig:
    """How far ahead to preload: `layers` MoE layers, `experts` per layer (None: top_k + 1)."""

    predictor: Predictor | None = None
    layers: int = 1
    experts: int | None = None
    enabled: bool = True
    reason: str = ""  # why it is off, when it is

    @property
    def active(self) -> bool:
        return self.enabled and self.predictor is not None

    def describe(self) -> dict:
        if not self.active:
            return {"prefetch": False, "prefetch_off": self.reason or "off"}
        return {"prefetch": True, "predictor": self.predictor.name, "prefetch_layers": self.layers,
                "prefetch_experts": self.experts or self.predictor.k + 1}


def check_prefetch_options(predictor: str | None, experts: int | None, layers: int | None,
                           threads: int | None) -> None:
    """Refuse an unknown predictor name and counts below 1."""
    if predictor is not None and predictor not in ("auto", *METHODS):
        raise InvalidArgument(f"unknown predictor {predictor!r} (choose from auto, {', '.join(METHODS)})")
    for name, v in (("prefetch experts", experts), ("prefetch layers", layers), ("prefetch threads", threads)):
        if v is not None and v < 1:
            raise InvalidArgument(f"{name} must be at least 1, got {v}")


def prefetch_config(path, model, args, mode: str, capacity: int, min_cache: int, prefetch: bool | None,
                    predictor: str | None, experts: int | None, layers: int | None) -> PrefetchConfig:
    """Preloading as asked for, with its defaults: on in io-exp mode; the predictor is
    `combined` when the converted directory holds a fitted predictor.npz, else the gate
    look-ahead (which needs no fitting); top_k + 1 experts, one MoE layer ahead. It is off
    when the cache cannot hold two layers' experts (it could only evict what is needed)."""
    layers = layers or DEFAULT_LAYERS
    if prefetch is False:
        return PrefetchConfig(enabled=False, reason="off (--no-prefetch)")
    if mode == "io-free":
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
        return PrefetchConfig(pred, layers, experts, enabled=False, reason=reason)
    return PrefetchConfig(pred, layers, experts)
