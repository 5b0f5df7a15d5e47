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
    store: str | None = None  # edgemoe: "quant" (matching bits), "bf16" or "plan"
    runtime: dict = field(default_factory=dict)  # edgemoe load options
    prefetch: bool | None = None  # edgemoe: wanted prefetch state (None: not applicable)
    role: str = "compare"  # "compare" or "bound" (run once per budget, for the lower bound)
    unlimited: bool = True  # also run without a memory limit (reference)


EDGEMOE = "edgemoe"
LLAMA = "llama.cpp"
TRANSFORMERS = "transformers"
ENGINES = (EDGEMOE, LLAMA, TRANSFORMERS)

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
    Config("Belady", EDGEMOE, "optimal (oracle) cache on the recorded routing: misses for the lower bound",
           store="quant", runtime={"mode": "io-exp", "cache_policy": "belady"}, prefetch=False, role="bound",
           unlimited=False),
    Config("llama.cpp", LLAMA, "GGUF at matching bits, weights memory-mapped, repacking off"),
    Config("transformers", TRANSFORMERS, "bf16 checkpoint, accelerate disk offload (device_map=auto)"),
]


def runtime_supports(option: str) -> bool:
    """Whether edgemoe's offloaded runtime takes a load option of this name."""
    from ..runtime.loading import load_converted

    return option in inspect.signature(load_converted).parameters


def edgemoe_runtime(cfg: Config) -> dict:
    """Load options for an edgemoe row, with the prefetch state set where the runtime
    has the option."""
    rt = dict(cfg.runtime)
    if cfg.prefetch is not None and runtime_supports("prefetch"):
        rt["prefetch"] = cfg.prefetch
    return rt


def unavailable_reason(cfg: Config, plan: str | None) -> str | None:
    """Why a row cannot run in this installation, or None."""
    if cfg.store == "plan":
        missing = []
        if plan is None:
            missing.append("no expert bitwidth plan (give --plan PLAN.json, e.g. from the profile/plan tools "
                           "of issue 5 once they exist)")
        if cfg.prefetch and not runtime_supports("prefetch"):
            missing.append("the runtime has no expert prefetching yet (issue 6)")
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
