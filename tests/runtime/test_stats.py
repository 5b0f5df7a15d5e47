"""Typed statistics (edgemoe/runtime/stats.py): the provider's and the cache's snapshots
render the JSON keys the server, the lab and --json outputs read (pinned here), and the
CLI summary reads them by attribute."""

from __future__ import annotations

import json

import pytest

import edgemoe
from edgemoe import assets
from edgemoe.cli.common import format_stats
from edgemoe.generate import GenerationStats
from edgemoe.runtime.stats import (CacheRouting, CacheStats, ExpertReads, MemoryUse, OffloadStats, PrefetchActivity,
                                   PrefetchStats, Throttle)

# The keys of OffloadedProvider.stats(), in order, as they were before the statistics were typed.
BASE = ["mode", "cache_policy", "io", "hits", "misses", "hit_rate", "bytes_read", "bytes_read_per_token", "read_s",
        "verify", "verify_s", "stall_s", "stall_s_per_token", "evictions", "compactions", "forward_tokens",
        "decode_hit_rate", "decode_bytes_read_per_token", "decode_stall_s", "decode_stall_s_per_token",
        "budget_bytes", "min_budget_bytes", "resident_bytes", "kv_bytes", "workspace_bytes", "cache_bytes",
        "cache_peak_bytes", "budget_used_bytes", "baseline_rss_bytes", "rss_over_baseline_bytes",
        "read_throttle_bps"]
THROTTLED = ["throttle_wait_s"]  # only with a read throttle
PREFETCH_ON = ["prefetch", "predictor", "prefetch_layers", "prefetch_experts", "prefetch_reads", "prefetch_bytes",
               "prefetch_hits", "prefetch_late", "prefetch_wasted_bytes", "prefetch_cancelled",
               "prefetch_not_started", "prefetch_aborted", "prefetch_no_room", "prefetch_threshold",
               "prefetch_threshold_now", "prefetch_read_cost_ms", "demand_read_ms", "prefetch_pacing",
               "prefetch_revoked", "prefetch_skipped_late", "prefetch_no_window", "prefetch_unmeasured",
               "prefetch_submitted", "prefetch_mean_distance", "decode_layer_ms", "read_bandwidth_bps",
               "background_paused", "decode_prefetch_hits", "decode_prefetch_late", "decode_prefetch_wasted_bytes",
               "decode_prefetch_wasted_bytes_per_token", "predictor_recall", "predictor_precision",
               "decode_predictor_recall", "decode_predictor_precision", "prefetch_switched",
               "decode_prefetch_on_tokens", "decode_prefetch_off_tokens"]
PREFETCH_OFF = ["prefetch", "prefetch_off"]
CACHE_ROUTING = ["cache_aware_routing", "routed_slots", "rerouted_slots", "reroute_rate", "rerouted_per_token",
                 "decode_reroute_rate", "decode_rerouted_per_token"]
WHEN_NOT_ZERO = ["compact_bytes", "background_loads"]
CACHE = ["hits", "misses", "hit_rate", "bytes_read", "read_s", "verify_s", "verifications", "verify_bytes", "stall_s",
         "evictions", "compactions", "compact_bytes", "background_loads", "background_bytes", "waits",
         "background_paused", "background_paused_s", "read_bandwidth_bps", "cache_bytes", "cache_used_bytes",
         "cache_peak_bytes", "cache_touched_bytes", "cached_experts"]
GENERATION = ["prompt_tokens", "generated_tokens", "prefill_s", "decode_s", "prompt_tps", "decode_tps",
              "peak_rss_bytes", "ctx_size", "kv_bytes", "kv_used_bytes"]


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    from edgemoe.store.convert import convert

    out = tmp_path_factory.mktemp("stats") / "conv"
    convert(assets.MODEL_DIR, out)
    return out


def _run(conv, **options):
    engine = edgemoe.load(conv, **options)
    try:
        info = engine.info
        budget = info["min_budget_bytes"] - info["min_cache_bytes"] + info["expert_bytes"] // 2
        engine.close()
        engine = edgemoe.load(conv, memory=budget, **options)
        r = engine.generate("def add(a, b):", max_tokens=6, ignore_eos=True)
        return r.stats, engine.provider.stats(), engine.provider.cache.stats()
    finally:
        engine.close()


def _without_optional(keys):
    return [k for k in keys if k not in WHEN_NOT_ZERO]


@pytest.mark.parametrize("prefetch", [True, False])
def test_stats_json_has_the_documented_keys(conv, prefetch):
    options = dict(cache_aware_routing=0.1, read_throttle="2GB/s") if prefetch else dict(prefetch=False)
    gen, provider, cache = _run(conv, **options)
    want = BASE + (THROTTLED + PREFETCH_ON + CACHE_ROUTING if prefetch else PREFETCH_OFF)
    assert _without_optional(provider.to_dict()) == want
    assert list(gen.to_dict())[: len(GENERATION)] == GENERATION
    # GenerationStats.to_dict: the generation's own keys, then the provider's (kv_bytes is in both: the provider's wins)
    assert _without_optional(list(gen.to_dict())[len(GENERATION):]) == [k for k in want if k != "kv_bytes"]
    assert list(cache.to_dict()) == CACHE
    for snapshot in (gen.extra, provider, cache):
        d = snapshot.to_dict()
        assert json.loads(json.dumps(d)) == d == dict(snapshot)  # the Mapping view is the JSON content
    # The attributes are the JSON's values.
    assert (provider.experts.hits, provider.experts.bytes_read, provider.memory.budget_bytes) == (
        provider["hits"], provider["bytes_read"], provider["budget_bytes"])
    assert provider.experts.hits > 0 and provider.experts.misses > 0 and provider.experts.bytes_read > 0
    if prefetch:
        a = provider.prefetch.activity
        assert provider.prefetch.on and provider["prefetch"] is True
        assert (a.hits, a.recall, a.threshold) == (provider["prefetch_hits"], provider["predictor_recall"], "auto")
        assert provider.throttle.rate_bps == provider["read_throttle_bps"] == 2_000_000_000
        assert provider.cache_routing.margin == provider["cache_aware_routing"] == 0.1
    else:
        assert provider.prefetch.activity is None and provider.prefetch.off_reason == provider["prefetch_off"]
        assert provider.cache_routing is None and provider.throttle.wait_s is None


def _synthetic(prefetch: bool) -> OffloadStats:
    experts = ExpertReads("io-exp", "edgemoe", "direct", 90, 30, 0.75, 3_000_000, 250_000, 0.125, "first", 0.004, 0.25,
                          0.0208, 12, 1, 12, 0.8, 120_000, 0.1, 0.01)
    memory = MemoryUse(10_000_000, 4_000_000, 2_000_000, 500_000, 1_000_000, 6_000_000, 5_900_000, 9_400_000,
                       280_000_000, 7_000_000)
    activity = PrefetchActivity("gate", 3, 3, 20, 2_000_000, 15, 2, 300_000, 1, 1, 0, 0, "auto", 0.4321, 0.3, 0.7,
                                True, 2, 1, 3, 2, 22, 1.05, 0.41, 500_000_000, 7, 6, 1, 100_000, 9_000, 0.8, 0.6,
                                0.85, 0.55, True, 4, 8)
    pf = PrefetchStats(True, activity, None) if prefetch else PrefetchStats(False, None, "off (--no-prefetch)")
    routing = CacheRouting(0.1, 240, 12, 0.05, 1.0, 0.04, 0.5) if prefetch else None
    throttle = Throttle(90_000_000, 0.5) if prefetch else Throttle(None, None)
    return OffloadStats(experts, memory, throttle, pf, routing, 4096 if prefetch else 0, 5, {"trace_position": 42})


# What cli/common.format_stats printed for these statistics when it parsed them by key
# (the code before the statistics were typed, run on _synthetic(...).to_dict()), plus the count of decode
# tokens with preloading on, added with the switch (prefetch.DecodeSwitch).
SUMMARY_ON = """\
prompt: 7 tokens, 70.0 tok/s | decode: 12 tokens, 110.0 tok/s | peak RSS: 290.0 MB
experts: io-exp, edgemoe cache | hit rate 75.0% (90 hits, 30 misses; decode 80.0%) | read 3.0 MB (250.0 KB/token, decode 120.0 KB/token, direct, throttled to 90.0 MB/s I/O) in 0.12 s | checksums (first) 0.00 s | stall 0.25 s
memory: budget 10.0 MB | used 9.4 MB (resident 2.0 MB + cache 7.4 MB of 6.0 MB) | peak RSS 7.0 MB over a baseline of 280.0 MB
prefetch: gate predictor, 3 experts x 3 layer(s) ahead, threshold auto (now 0.43), paced to the link, on for 4 of 12 decode tokens (measured: faster off for the others) | 15 hits (2 late), wasted 300.0 KB | predictor recall 80.0% (decode 85.0%), precision 60.0% | decode stall 10.00 ms/token
cache-aware routing: margin 0.1 | 12 routed slots swapped to resident experts (5.0%, 1.00/token; decode 4.0%, 0.50/token)
kv_bytes: 500.0 KB | workspace_bytes: 1.0 MB | demand_read_ms: 0.700 | decode_layer_ms: 0.410 | read_bandwidth_bps: 500000000 | background_paused: 7 | compact_bytes: 4.1 KB | trace_position: 42"""
SUMMARY_OFF = """\
prompt: 7 tokens, 70.0 tok/s | decode: 12 tokens, 110.0 tok/s | peak RSS: 290.0 MB
experts: io-exp, edgemoe cache | hit rate 75.0% (90 hits, 30 misses; decode 80.0%) | read 3.0 MB (250.0 KB/token, decode 120.0 KB/token, direct I/O) in 0.12 s | checksums (first) 0.00 s | stall 0.25 s
memory: budget 10.0 MB | used 9.4 MB (resident 2.0 MB + cache 7.4 MB of 6.0 MB) | peak RSS 7.0 MB over a baseline of 280.0 MB
prefetch: off (--no-prefetch) | decode stall 10.00 ms/token
kv_bytes: 500.0 KB | workspace_bytes: 1.0 MB | trace_position: 42"""


@pytest.mark.parametrize("prefetch,want", [(True, SUMMARY_ON), (False, SUMMARY_OFF)])
def test_cli_summary_reads_the_attributes_and_prints_what_it_printed_before(prefetch, want):
    stats = GenerationStats(prompt_tokens=7, generated_tokens=12, prefill_s=0.1, decode_s=0.1,
                            peak_rss_bytes=290_000_000, extra=_synthetic(prefetch))
    assert format_stats(stats) == want


def test_cache_stats_is_a_snapshot_with_a_json_view():
    c = CacheStats(*range(len(CACHE)))
    assert list(c) == CACHE and c["waits"] == c.waits == CACHE.index("waits")
    assert c == CacheStats(*range(len(CACHE))) and c != CacheStats(*range(1, len(CACHE) + 1))
