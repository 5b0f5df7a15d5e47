"""The configurations `edgemoe bench` runs, as data: one row per configuration.

edgemoe rows follow the EdgeMoE paper's baselines (docs/paper.md):

| name      | experts stored as | mode   | cache policy | prefetch |
|-----------|-------------------|--------|--------------|----------|
| IO-FREE   | int (matching bits) | every expert read into RAM at load | - | - |
| IO-EXP    | bf16              | on demand + cache | edgemoe (default) | off |
| IO-QEXP   | int (matching bits) | on demand + cache | edgemoe (default) | off |
| LRU-only  | int (matching bits) | on demand + cache | lru (mixtral-offloading's) | off |
| EdgeMoE   | per-expert bitwidth plan | on demand + cache | edgemoe | on |
| Belady    | int (matching bits) | on demand + cache | belady (oracle replay) | off |

Rows of issue 16's knobs, each EdgeMoE plus a lossy change (`lossy`: the engine's greedy
choices may differ from those of its lossless `base`, EdgeMoE; the results give the share
of positions where they agree, both fed the same tokens):

| name                  | experts stored as | knob |
|-----------------------|-------------------|------|
| EdgeMoE+cache-routing | per-expert bitwidth plan | cache-aware routing, margin ROUTING_MARGIN |
| EdgeMoE+fallback      | the plan + int FALLBACK_BITS small copies | a missed expert under FALLBACK_BELOW of the token's routing weight is read small |
| EdgeMoE+all           | the plan + small copies | both |

The margin and threshold are the ones measured to pay on the bundled model
(edgemoe_lab/results/prefetch_pays.md, fallback.md).

Belady is not a competitor: it gives the misses of the optimal cache for the lower bound,
and runs once per budget. A row whose feature is not in this installation (the bitwidth
plan, prefetching) is reported as unavailable with the reason, not silently dropped.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Config:
    name: str
    engine: str  # "edgemoe", "llama.cpp" or "transformers"
    description: str
    store: str | None = None  # edgemoe: a key of STORE_KINDS
    runtime: dict = field(default_factory=dict)  # edgemoe load options
    prefetch: bool | None = None  # edgemoe: wanted prefetch state (None: not applicable)
    role: str = "compare"  # "compare" or "bound" (run once per budget, for the lower bound)
    unlimited: bool = True  # also run without a memory limit (reference)
    lossy: bool = False  # its greedy tokens may differ from the lossless engines' (quality column)
    base: str | None = None  # a lossy row's lossless configuration: its quality is agreement with it


EDGEMOE = "edgemoe"
LLAMA = "llama.cpp"
TRANSFORMERS = "transformers"
ENGINES = (EDGEMOE, LLAMA, TRANSFORMERS)

# edgemoe's converted stores by kind: what each is converted from (model.ensure_store flags
# besides --resident): "quant" at matching bits, "bf16", "plan" (--plan), "plan-fallback"
# (--plan and the small copies of --fallback-bits FALLBACK_BITS).
STORE_KINDS = ("quant", "bf16", "plan", "plan-fallback")
PLAN_STORES = ("plan", "plan-fallback")  # need --plan
ROUTING_MARGIN = 0.1  # --cache-aware-routing: prefetch_pays.md, 1.1x-2.5x decode at +0.7-1.6% perplexity
FALLBACK_BITS = 2  # convert --fallback-bits: fallback.md, int2 read 0.45x the bytes (int3 0.50x)
FALLBACK_BELOW = 0.5  # --fallback-below: fallback.md, 1.72x decode at +0.10-0.19% perplexity
_EDGEMOE_RT = {"mode": "io-exp", "cache_policy": "edgemoe"}

CONFIGS: list[Config] = [
    Config("IO-FREE", EDGEMOE, "every expert in RAM, read at load", store="quant", runtime={"mode": "io-free"}),
    Config("IO-EXP", EDGEMOE, "bf16 experts read on demand into the cache", store="bf16",
           runtime={"mode": "io-exp"}, prefetch=False, unlimited=False),
    Config("IO-QEXP", EDGEMOE, "quantized experts read on demand into the cache", store="quant",
           runtime={"mode": "io-exp"}, prefetch=False, unlimited=False),
    Config("LRU-only", EDGEMOE, "quantized experts on demand, LRU cache (mixtral-offloading's policy)",
           store="quant", runtime={"mode": "io-exp", "cache_policy": "lru"}, prefetch=False, unlimited=False),
    Config("EdgeMoE", EDGEMOE, "per-expert bitwidth plan + EdgeMoE eviction + expert prefetch", store="plan",
           runtime={"mode": "io-exp", "cache_policy": "edgemoe"}, prefetch=True, unlimited=False),
    Config("EdgeMoE+cache-routing", EDGEMOE, f"EdgeMoE + cache-aware routing (margin {ROUTING_MARGIN})",
           store="plan", runtime={**_EDGEMOE_RT, "cache_aware_routing": ROUTING_MARGIN}, prefetch=True,
           unlimited=False, lossy=True, base="EdgeMoE"),
    Config("EdgeMoE+fallback", EDGEMOE, (f"EdgeMoE + int{FALLBACK_BITS} copies read on a miss under "
                                         f"{FALLBACK_BELOW} of the routing weight"),
           store="plan-fallback", runtime={**_EDGEMOE_RT, "fallback_below": FALLBACK_BELOW}, prefetch=True,
           unlimited=False, lossy=True, base="EdgeMoE"),
    Config("EdgeMoE+all", EDGEMOE, "EdgeMoE + cache-aware routing + low-bit copies on a miss", store="plan-fallback",
           runtime={**_EDGEMOE_RT, "cache_aware_routing": ROUTING_MARGIN, "fallback_below": FALLBACK_BELOW},
           prefetch=True, unlimited=False, lossy=True, base="EdgeMoE"),
    Config("Belady", EDGEMOE, "optimal (oracle) cache on the recorded routing: misses for the lower bound",
           store="quant", runtime={"mode": "io-exp", "cache_policy": "belady"}, prefetch=False, role="bound",
           unlimited=False),
    Config("llama.cpp", LLAMA, "GGUF at matching bits, weights memory-mapped, repacking off"),
    Config("transformers", TRANSFORMERS, "bf16 checkpoint, accelerate disk offload (device_map=auto)"),
]


def runtime_supports(option: str) -> bool:
    """Whether edgemoe's offloaded runtime takes a load option of this name."""
    try:
        from edgemoe.runtime.config import OFFLOAD_OPTIONS
    except ImportError:  # before the runtime's options became a RuntimeConfig
        from edgemoe.runtime.loading import load_converted

        return option in inspect.signature(load_converted).parameters
    return option in OFFLOAD_OPTIONS


def edgemoe_runtime(cfg: Config) -> dict:
    """Load options for an edgemoe row, with the prefetch state set where the runtime
    has the option."""
    rt = dict(cfg.runtime)
    if cfg.prefetch is not None and runtime_supports("prefetch"):
        rt["prefetch"] = cfg.prefetch
    return rt


def unavailable_reason(cfg: Config, plan: str | None) -> str | None:
    """Why a row cannot run in this installation, or None."""
    if cfg.store in PLAN_STORES:
        missing = []
        if plan is None:
            missing.append("no expert bitwidth plan (give --plan PLAN.json, e.g. from the profile/plan tools "
                           "of issue 5 once they exist)")
        if cfg.prefetch and not runtime_supports("prefetch"):
            missing.append("the runtime has no expert prefetching yet (issue 6)")
        missing += [f"the runtime has no {opt} option" for opt in cfg.runtime if not runtime_supports(opt)]
        return "; ".join(missing) or None
    return None


def select(names: list[str] | None = None, engines: list[str] | None = None) -> list[Config]:
    out = [c for c in CONFIGS if (engines is None or c.engine in engines)]
    if names:
        unknown = set(names) - {c.name for c in CONFIGS}
        if unknown:
            raise ValueError(f"unknown configuration(s) {sorted(unknown)}; choose from {[c.name for c in CONFIGS]}")
        out = [c for c in out if c.name in names]
    return out
