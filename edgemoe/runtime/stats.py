"""Typed statistics of the offloaded runtime: what `ExpertCache.stats()` and
`OffloadedProvider.stats()` return, and what a generation's `GenerationStats.extra` holds.

Each class is a frozen snapshot whose fields are the JSON keys (`key=` where the
attribute is shorter), in the order `to_dict()` writes them; parts nest, and render
flat. The JSON is the contract read by the server, `--stats-json`-style outputs, the lab
and the tests (tests/runtime/test_stats.py pins its keys); for them each snapshot is
also a read-only Mapping over that JSON (`stats["hits"]`, `dict(stats)`, `**stats`).
Readers in the package use the attributes (cli/common.format_stats).

Adding a statistic: a field on the part it belongs to (with `key=` if its JSON name
differs, `omit=` if it is written only when set, `tail=True` if the CLI summary prints it
as "name: value" rather than in its own line), set where the provider or the cache builds
the snapshot, and its key in tests/runtime/test_stats.py. No torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cached_property


def stat(*, key: str | None = None, omit: str | None = None, tail: bool = False, part: bool = False):
    """A statistic's field. key: its JSON name (default: the attribute's); omit: "none" or
    "zero", left out of the JSON when None or 0; tail: printed by the CLI summary as
    "key: value" after its lines; part: a nested snapshot (None: left out)."""
    return field(metadata={"key": key, "omit": omit, "tail": tail, "part": part})


def _items(obj, tail_only: bool = False):
    """(key, value) pairs of a snapshot in JSON order, parts flattened."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        m = f.metadata
        if m.get("part") or is_dataclass(v):
            if v is not None:
                yield from _items(v, tail_only)
            continue
        if (m.get("omit") == "none" and v is None) or (m.get("omit") == "zero" and not v):
            continue
        if tail_only and not m.get("tail"):
            continue
        if isinstance(v, dict):  # free-form facts (the eviction policy's own): flat
            yield from v.items()
        else:
            yield m.get("key") or f.name, v


class _Snapshot(Mapping):
    """A read-only Mapping over `to_dict()` (see the module notes)."""

    @cached_property
    def _json(self) -> dict:  # rendered once: a snapshot does not change
        return dict(_items(self))

    def to_dict(self) -> dict:
        """The JSON content: every key in order, parts flattened (a new dict)."""
        return dict(self._json)

    def tail(self) -> dict:
        """The keys the CLI summary prints as "key: value" after its own lines."""
        return dict(_items(self, tail_only=True))

    def __getitem__(self, key: str):
        return self._json[key]

    def __iter__(self):
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)


@dataclass(frozen=True, eq=False)
class CacheStats(_Snapshot):
    """The expert cache's counters since its last reset and its slab's occupancy."""

    hits: int = stat()
    misses: int = stat()
    hit_rate: float = stat()
    bytes_read: int = stat()
    read_s: float = stat()
    verify_s: float = stat()
    verifications: int = stat()
    verify_bytes: int = stat()
    stall_s: float = stat()
    evictions: int = stat()
    compactions: int = stat()
    compact_bytes: int = stat()
    background_loads: int = stat()
    background_bytes: int = stat()
    waits: int = stat()
    background_paused: int = stat()
    background_paused_s: float = stat()
    read_bandwidth_bps: int | None = stat()
    cache_bytes: int = stat()
    cache_used_bytes: int = stat()
    cache_peak_bytes: int = stat()
    cache_touched_bytes: int = stat()
    cached_experts: int = stat()


@dataclass(frozen=True, eq=False)
class ExpertReads(_Snapshot):
    """How experts were served: hits, reads, checksums and stalls, all and in decode."""

    mode: str = stat()
    cache_policy: str = stat()
    io: str = stat()  # "direct" (O_DIRECT) or "buffered"
    hits: int = stat()
    misses: int = stat()
    hit_rate: float = stat()
    bytes_read: int = stat()
    bytes_read_per_token: int = stat()
    read_s: float = stat()
    verify: str = stat()
    verify_s: float = stat()
    stall_s: float = stat()
    stall_s_per_token: float = stat()
    evictions: int = stat()
    compactions: int = stat()
    forward_tokens: int = stat()
    decode_hit_rate: float = stat()
    decode_bytes_read_per_token: int = stat()
    decode_stall_s: float = stat()
    decode_stall_s_per_token: float = stat()


@dataclass(frozen=True, eq=False)
class MemoryUse(_Snapshot):
    """Where the budget went (bytes)."""

    budget_bytes: int | None = stat()
    min_budget_bytes: int = stat()
    resident_bytes: int = stat()
    kv_bytes: int = stat(tail=True)
    workspace_bytes: int = stat(tail=True)
    cache_bytes: int = stat()
    cache_peak_bytes: int = stat()
    budget_used_bytes: int = stat()  # resident + KV + workspace + every slab page ever written
    baseline_rss_bytes: int = stat()
    rss_over_baseline_bytes: int = stat()


@dataclass(frozen=True, eq=False)
class Throttle(_Snapshot):
    """The read throttle: its rate (None without one) and, with one, its waiting time."""

    rate_bps: int | None = stat(key="read_throttle_bps")
    wait_s: float | None = stat(key="throttle_wait_s", omit="none")


@dataclass(frozen=True, eq=False)
class PrefetchActivity(_Snapshot):
    """What preloading did (only when it is on)."""

    predictor: str = stat()
    layers: int = stat(key="prefetch_layers")
    experts: int = stat(key="prefetch_experts")
    reads: int = stat(key="prefetch_reads")
    bytes: int = stat(key="prefetch_bytes")
    hits: int = stat(key="prefetch_hits")
    late: int = stat(key="prefetch_late")
    wasted_bytes: int = stat(key="prefetch_wasted_bytes")
    cancelled: int = stat(key="prefetch_cancelled")
    not_started: int = stat(key="prefetch_not_started")
    aborted: int = stat(key="prefetch_aborted")
    no_room: int = stat(key="prefetch_no_room")
    threshold: float | str = stat(key="prefetch_threshold")  # "auto": the measured break-even
    threshold_now: float = stat(key="prefetch_threshold_now")
    read_cost_ms: float | None = stat(key="prefetch_read_cost_ms")
    demand_read_ms: float | None = stat(tail=True)
    pacing: bool = stat(key="prefetch_pacing")
    revoked: int = stat(key="prefetch_revoked")
    skipped_late: int = stat(key="prefetch_skipped_late")
    no_window: int = stat(key="prefetch_no_window")
    unmeasured: int = stat(key="prefetch_unmeasured")
    submitted: int = stat(key="prefetch_submitted")
    mean_distance: float = stat(key="prefetch_mean_distance")  # MoE layers ahead
    decode_layer_ms: float | None = stat(tail=True)
    read_bandwidth_bps: int | None = stat(tail=True)
    background_paused: int = stat(tail=True)
    decode_hits: int = stat(key="decode_prefetch_hits")
    decode_late: int = stat(key="decode_prefetch_late")
    decode_wasted_bytes: int = stat(key="decode_prefetch_wasted_bytes")
    decode_wasted_bytes_per_token: int = stat(key="decode_prefetch_wasted_bytes_per_token")
    recall: float = stat(key="predictor_recall")
    precision: float = stat(key="predictor_precision")
    decode_recall: float = stat(key="decode_predictor_recall")
    decode_precision: float = stat(key="decode_predictor_precision")
    # Decode preloading switched on and off by measured speed (prefetch.DecodeSwitch).
    switched: bool = stat(key="prefetch_switched")
    decode_tokens_on: int = stat(key="decode_prefetch_on_tokens")
    decode_tokens_off: int = stat(key="decode_prefetch_off_tokens")


@dataclass(frozen=True, eq=False)
class PrefetchStats(_Snapshot):
    """Preloading: on (with what it did) or off (with why, when there is a reason)."""

    on: bool = stat(key="prefetch")
    activity: PrefetchActivity | None = stat(part=True)
    off_reason: str | None = stat(key="prefetch_off", omit="none")


@dataclass(frozen=True, eq=False)
class CacheRouting(_Snapshot):
    """Cache-aware routing: the routed slots it swapped to experts in memory."""

    margin: float = stat(key="cache_aware_routing")
    routed_slots: int = stat()
    rerouted_slots: int = stat()
    reroute_rate: float = stat()
    rerouted_per_token: float = stat()
    decode_reroute_rate: float = stat()
    decode_rerouted_per_token: float = stat()


@dataclass(frozen=True, eq=False)
class FallbackReads(_Snapshot):
    """Low-bit copies on a miss (--fallback-below, runtime/fallback.py). hits and misses
    above count full copies; bytes_read and stall_s above include the small copies'."""

    below: float = stat(key="fallback_below")
    uses: int = stat(key="fallback_uses")  # missed experts served from their small copies
    reads: int = stat(key="fallback_reads")  # of those, read from storage (the rest were in their cache)
    hits: int = stat(key="fallback_hits")
    bytes_read: int = stat(key="fallback_bytes_read")
    bytes_saved: int = stat(key="fallback_bytes_saved")  # full copies' bytes less the small copies' read instead
    stall_s: float = stat(key="fallback_stall_s")
    decode_reads: int = stat(key="decode_fallback_reads")
    decode_reads_per_token: float = stat(key="decode_fallback_reads_per_token")
    cache_bytes: int = stat(key="fallback_cache_bytes", tail=True)


@dataclass(frozen=True, eq=False)
class OffloadStats(_Snapshot):
    """The offloaded provider's statistics since its last reset (one request, for the
    engine): the parts, then counters written only when not zero, then what the eviction
    policy reports about itself (Belady: its place in the trace)."""

    experts: ExpertReads = stat()
    memory: MemoryUse = stat()
    throttle: Throttle = stat()
    prefetch: PrefetchStats = stat()
    cache_routing: CacheRouting | None = stat(part=True)
    compact_bytes: int = stat(omit="zero", tail=True)
    background_loads: int = stat(omit="zero")
    policy: dict = stat(tail=True)
    # Written only with --fallback-below (after the others, so constructors that predate it hold).
    fallback: FallbackReads | None = field(default=None, metadata={"part": True})
