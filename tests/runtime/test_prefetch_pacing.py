"""Preloading that pays (issue 16 section 3): the confidence threshold (fixed or the
measured break-even), pacing to the link, demand reads first (background reads pause,
and never deadlock a demand), the measured read rate, the option checks, and the same
tokens in every lossless configuration."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

import edgemoe
from edgemoe.errors import InvalidArgument
from edgemoe.runtime.cache import PREFETCH, ExpertCache
from edgemoe.runtime.policies import PolicyContext, make_policy
from edgemoe.runtime.prefetch import AUTO_FLOOR, AUTO_START
from edgemoe.store.reader import ExpertStore
from edgemoe.store.throttle import CHUNK, TokenBucket, parse_rate

from store.helpers import PROMPTS, deadline, make_checkpoint, make_converted, reference

N_NEW = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("pacing")
    hf = make_checkpoint(d / "hf", "mixtral", tokenizer_dir, num_local_experts=8, num_hidden_layers=4)
    conv = make_converted(hf, d / "conv")
    e = edgemoe.load(conv)
    lo, cache_min = e.info["min_budget_bytes"], e.info["min_cache_bytes"]
    e.close()
    return SimpleNamespace(conv=conv, ref=reference(hf), resident=lo - cache_min, cache_min=cache_min)


def run(engine, prompts=PROMPTS, n=N_NEW):
    out, stats = [], []
    for p in prompts:
        r = engine.generate(p, max_tokens=n, ignore_eos=True)
        out.append(r.token_ids)
        stats.append(r.stats.extra)
    return out, stats


@pytest.mark.parametrize("kw", [
    {},  # paced, automatic threshold
    {"prefetch_threshold": 0.3},
    {"prefetch_threshold": 0.0, "prefetch_pacing": False},  # the old preloading
    {"prefetch_threshold": 1.0, "prefetch_pacing": False, "prefetch_layers": 2},
    {"read_throttle": "20MB/s"},
])
def test_lossless_configurations_give_the_same_tokens(tiny, kw):
    engine = edgemoe.load(tiny.conv, memory=tiny.resident + 3 * tiny.cache_min, **kw)
    try:
        with deadline(120):
            tokens, stats = run(engine)
    finally:
        engine.close()
    assert tokens == tiny.ref
    s = stats[0]
    assert s["prefetch"] is True and s["prefetch_pacing"] == kw.get("prefetch_pacing", True)
    assert s["prefetch_threshold"] == kw.get("prefetch_threshold", "auto")
    assert s["cache_peak_bytes"] <= s["cache_bytes"]


def test_threshold_admits_fewer(tiny):
    submitted = {}
    for t in (0.0, 0.9):
        engine = edgemoe.load(tiny.conv, memory=tiny.resident + 3 * tiny.cache_min, prefetch_threshold=t,
                              prefetch_pacing=False)
        try:
            tokens, stats = run(engine)
        finally:
            engine.close()
        assert tokens == tiny.ref
        submitted[t] = sum(s["prefetch_submitted"] for s in stats)
    assert submitted[0.9] < submitted[0.0]


def test_paced_preloading_reads_nothing_the_link_cannot_deliver(tiny):
    """At 1 MB/s one expert takes longer to read than a whole token computes: pacing
    neither predicts nor reads (no wasted bytes), where the old preloading reads and wastes."""
    out = {}
    for name, kw in (("paced", {}), ("old", {"prefetch_threshold": 0.0, "prefetch_pacing": False})):
        engine = edgemoe.load(tiny.conv, memory=tiny.resident + 3 * tiny.cache_min, read_throttle="1MB/s", **kw)
        try:
            with deadline(300):
                tokens, stats = run(engine, PROMPTS[:1], 3)
        finally:
            engine.close()
        assert tokens[0] == tiny.ref[0][:3]
        out[name] = stats[0]
    assert out["paced"]["prefetch_submitted"] == 0 and out["paced"]["prefetch_no_window"] > 0
    assert out["paced"]["read_bandwidth_bps"] and out["paced"]["read_bandwidth_bps"] < 2_000_000
    assert out["old"]["prefetch_submitted"] > 0


def test_automatic_threshold_is_the_measured_break_even(tiny):
    engine = edgemoe.load(tiny.conv, memory=tiny.resident + 3 * tiny.cache_min)
    p = engine.provider
    try:
        assert p.threshold() == AUTO_START  # nothing measured yet
        blob = p.cache.smallest_blob()
        for _ in range(400):
            p._learn(0.001, 0, 1, 0.004)  # idle layers: 1 ms; a demand read stalls 4 ms
            p._learn(0.003, blob, 0, 0.0)  # a layer during which one background read finished: 3 ms
        assert p._idle_s == pytest.approx(0.001, rel=0.05)
        assert p._read_cost == pytest.approx(0.002, rel=0.1) and p._miss_s == pytest.approx(0.004, rel=0.05)
        assert p.threshold() == pytest.approx(0.5, rel=0.1)
        for _ in range(400):
            p._learn(0.0011, blob, 1, 0.004)  # reads became cheap
        assert p.threshold() == AUTO_FLOOR
    finally:
        engine.close()
    engine = edgemoe.load(tiny.conv, memory=tiny.resident + 3 * tiny.cache_min, prefetch_threshold=0.7)
    assert engine.provider.threshold() == 0.7
    engine.close()


# ----------------------------------------------------------------------------- demand first


def new_cache(conv, capacity: int) -> ExpertCache:
    store = ExpertStore(conv)
    a = store.args
    return ExpertCache(store, capacity, make_policy("lru", PolicyContext(a.moe_layers(), a.experts_per_layer, a.top_k)),
                       a.hidden_act, torch.float32)


def test_background_reads_wait_for_the_demand(tiny):
    cache = new_cache(tiny.conv, 10 ** 7)
    keys = sorted(cache._store.entries)
    assert cache.bandwidth() is None
    cache.hold_background()  # a decode layer with misses: nothing starts meanwhile
    fut = cache.submit(keys[0], PREFETCH)
    time.sleep(0.2)
    assert cache.state(keys[0]) is None and not fut.done()
    cache.release_background()
    assert fut.result(timeout=30) is True
    assert cache.bandwidth() > 0 and cache.stats()["background_paused"] >= 1
    cache.close()


def test_a_read_in_progress_pauses_between_chunks(tiny):
    cache = new_cache(tiny.conv, 10 ** 7)
    cache._store.throttle = TokenBucket(parse_rate("1MB/s"))  # 65 ms a chunk
    key = sorted(cache._store.entries)[0]
    assert cache._store.entries[key].length > CHUNK  # at least two chunks
    fut = cache.submit(key, PREFETCH)
    t0 = time.monotonic()
    while cache.state(key) is None and time.monotonic() - t0 < 10:
        time.sleep(0.001)
    cache.hold_background()
    time.sleep(0.1)  # the chunk on the wire ends
    before = cache._store.throttle.free_at
    time.sleep(0.3)
    assert cache._store.throttle.free_at == before and not fut.done()  # paused: no chunk reserved meanwhile
    cache.release_background()
    assert fut.result(timeout=30) is True
    cache.close()


def test_a_demand_for_a_paused_prefetch_resumes_it(tiny):
    """The compute thread holds the link and then needs the very expert a paused prefetch
    is reading: it becomes urgent and finishes (no deadlock, no second read)."""
    cache = new_cache(tiny.conv, 10 ** 7)
    cache._store.throttle = TokenBucket(parse_rate("2MB/s"))
    key = sorted(cache._store.entries)[0]
    fut = cache.submit(key, PREFETCH)
    t0 = time.monotonic()
    while cache.state(key) is None and time.monotonic() - t0 < 10:
        time.sleep(0.001)
    cache.hold_background()
    with deadline(30):
        entry, hit = cache.acquire(key)
    cache.release(entry)
    cache.release_background()
    assert hit and cache._store.reads == 1 and fut.result(timeout=10) is True
    cache.close()


def test_a_demand_that_needs_the_room_of_a_paused_prefetch_gets_it(tiny):
    """The cache holds one expert, a paused background read holds its room, and a demand
    for another expert must wait for that room: the paused read is made urgent, ends, and
    the demand evicts it (no deadlock)."""
    size = next(iter(ExpertStore(tiny.conv).entries.values())).length
    cache = new_cache(tiny.conv, size)
    cache._store.throttle = TokenBucket(parse_rate("2MB/s"))
    keys = sorted(cache._store.entries)
    fut = cache.submit(keys[0], PREFETCH)
    t0 = time.monotonic()
    while cache.state(keys[0]) is None and time.monotonic() - t0 < 10:
        time.sleep(0.001)
    cache.hold_background()
    with deadline(60):
        entry, hit = cache.acquire(keys[1])
    cache.release(entry)
    cache.release_background()
    assert not hit and keys[1] in cache and fut.result(timeout=10) is True
    cache.close()


# ----------------------------------------------------------------------------- options


def test_options_are_checked(tiny, capsys):
    for kw, needle in (({"prefetch_threshold": 1.5}, "probability from 0 to 1"),
                       ({"prefetch_threshold": True}, "probability from 0 to 1"),
                       ({"prefetch_pacing": "yes"}, "True or False"),
                       ({"prefetch_layers": 0}, "at least 1"),
                       ({"prefetch": False, "prefetch_threshold": 0.5}, "preloading off"),
                       ({"prefetch": False, "predictor": "gate"}, "preloading off")):
        with pytest.raises(InvalidArgument, match=needle):
            edgemoe.load(tiny.conv, **kw)
    from edgemoe.cli import main

    base = ["generate", str(tiny.conv), "-p", "x", "-n", "2"]
    assert main(base + ["--no-prefetch", "--prefetch-threshold", "0.5"]) == 1
    assert "preloading off" in capsys.readouterr().err
    assert main(base + ["--prefetch-threshold", "2"]) == 1
    assert "probability from 0 to 1" in capsys.readouterr().err
    assert main(base + ["--prefetch-threshold", "0.4", "--no-prefetch-pacing", "--json"]) == 0
    import json

    s = json.loads(capsys.readouterr().out)["stats"]
    assert s["prefetch_threshold"] == 0.4 and s["prefetch_pacing"] is False
