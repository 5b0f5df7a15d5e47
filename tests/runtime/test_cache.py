"""The expert cache: allocator, eviction under pins and leases, compaction, capacity,
background loads with priorities, and thread safety."""

from __future__ import annotations

import os
import random
import threading
import zlib
from pathlib import Path

import pytest
import torch

import edgemoe
from edgemoe.errors import BudgetError, EdgeMoEError
from edgemoe.runtime.cache import DEMAND, PREFETCH, READY, CacheFull, ExpertCache
from edgemoe.runtime.policies import PolicyContext, make_policy
from edgemoe.runtime.slab import SlabAllocator
from edgemoe.store.manifest import ALIGN, ExpertPlan
from edgemoe.store.reader import ExpertStore

from store.helpers import make_checkpoint, make_converted, run_prompts


# ----------------------------------------------------------------------------- allocator


def test_allocator_random_operations_never_overlap():
    rng = random.Random(0)
    cap = 64 * ALIGN
    a = SlabAllocator(cap)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            a.release(off, live.pop(off))
        else:
            size = rng.choice([1, 2, 3, 5, 8]) * ALIGN
            off = a.alloc(size)
            if off is None:
                # Refused only when no free block is large enough.
                assert a.largest_free < size
                continue
            assert off % ALIGN == 0 and off + size <= cap
            for o, n in live.items():
                assert off + size <= o or o + n <= off, "overlap"
            live[off] = size
        assert a.free_bytes == cap - sum(live.values())
        assert all(n > 0 for _, n in a.free)
        assert all(x[0] + x[1] < y[0] for x, y in zip(a.free, a.free[1:])), "free list not coalesced"
    for off, n in list(live.items()):
        a.release(off, n)
    assert a.free == [(0, cap)]


def test_allocator_best_fit_and_rebuild():
    a = SlabAllocator(10 * ALIGN)
    a.rebuild([(0, 2 * ALIGN), (3 * ALIGN, 2 * ALIGN), (8 * ALIGN, ALIGN)])
    assert a.free == [(2 * ALIGN, ALIGN), (5 * ALIGN, 3 * ALIGN), (9 * ALIGN, ALIGN)]
    assert a.alloc(ALIGN) == 2 * ALIGN  # the smallest hole that fits
    assert a.alloc(2 * ALIGN) == 5 * ALIGN
    assert a.alloc(2 * ALIGN) is None


# ----------------------------------------------------------------------------- cache


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer_dir):
    """A store with two blob sizes (fp32 and half-precision experts)."""
    d = tmp_path_factory.mktemp("cache")
    hf = make_checkpoint(d / "hf", "mixtral", tokenizer_dir, num_local_experts=6, num_hidden_layers=4)
    plan = ExpertPlan("fp32", layers={1: "bf16"}, experts={(0, 1): "fp16", (2, 2): "bf16", (3, 0): "bf16"})
    return make_converted(hf, d / "conv", plan=plan)


def new_cache(conv: Path, capacity: int, policy: str = "lru") -> ExpertCache:
    store = ExpertStore(conv)
    a = store.args
    p = make_policy(policy, PolicyContext(a.moe_layers(), a.experts_per_layer, a.top_k))
    return ExpertCache(store, capacity, p, a.hidden_act, torch.float32)


def check_invariants(cache: ExpertCache) -> None:
    """No two blobs overlap, bookkeeping adds up, and every READY blob holds the right bytes."""
    spans = sorted((e.offset, e.offset + e.length) for e in cache._entries.values())
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0
    assert not spans or spans[-1][1] <= cache.capacity
    assert cache.used == sum(e.length for e in cache._entries.values()) <= cache.capacity
    for e in cache._entries.values():
        if e.state == READY:
            blob = cache._slab.view[e.offset : e.offset + e.info.size]
            assert zlib.crc32(blob) == e.info.crc32, e.key


def use(cache: ExpertCache, key) -> torch.Tensor:
    entry, _ = cache.acquire(key)
    try:
        return cache.expert(entry)(torch.ones(1, 64))
    finally:
        cache.release(entry)


def test_hits_misses_and_capacity(mixed):
    cache = new_cache(mixed, 200_000)
    keys = sorted(cache._store.entries)
    for k in keys:
        use(cache, k)
        check_invariants(cache)
    use(cache, keys[-1])
    s = cache.stats()
    assert s["misses"] == len(keys) and s["hits"] == 1 and s["evictions"] > 0
    assert s["cache_peak_bytes"] <= cache.capacity and cache.stats()["cache_touched_bytes"] <= cache.capacity
    cache.close()


def test_holds_all_once_every_blob_is_ready_and_leases_them_as_hits(mixed):
    cache = new_cache(mixed, 10_000_000)  # room for every expert
    keys = sorted(cache._store.entries)
    for k in keys[:-1]:
        use(cache, k)
    assert not cache.holds_all()  # one is still on storage
    with pytest.raises(EdgeMoEError, match="not cached"):
        cache.lease_cached(keys[-2:])
    assert all(cache._entries[k].leases == 0 for k in keys[:-1])  # a refused call leases nothing
    use(cache, keys[-1])
    assert cache.holds_all()
    before = cache.stats()["hits"]
    entries = cache.lease_cached(keys[:3])
    assert [e.leases for e in entries.values()] == [1, 1, 1] and cache.stats()["hits"] == before + 3
    x = torch.ones(1, 64)
    assert all(torch.equal(cache.expert(entries[k])(x), use(cache, k)) for k in keys[:3])
    cache.release_all(entries.values())
    assert all(cache._entries[k].leases == 0 for k in keys[:3])
    check_invariants(cache)
    cache.close()


def test_pinned_experts_are_never_evicted(mixed):
    cache = new_cache(mixed, 4 * 73728)
    keys = sorted(cache._store.entries)
    use(cache, keys[0])
    assert cache.pin([keys[0], (99, 0)]) == [keys[0]]
    for k in keys[1:]:
        use(cache, k)
        assert keys[0] in cache
    cache.unpin([keys[0]])
    for k in keys[1:]:
        use(cache, k)
    assert keys[0] not in cache
    cache.close()


def test_leased_expert_stays_put_while_others_load(mixed):
    """A leased expert's views stay valid: no eviction, no move, same output."""
    cache = new_cache(mixed, 4 * 73728)
    keys = sorted(cache._store.entries)
    entry, _ = cache.acquire(keys[0])
    expert = cache.expert(entry)
    before = expert(torch.ones(1, 64))
    offset = entry.offset
    for k in keys[1:]:
        use(cache, k)
    assert entry.offset == offset and keys[0] in cache
    torch.testing.assert_close(expert(torch.ones(1, 64)), before, rtol=0, atol=0)
    cache.release(entry)
    cache.close()


def test_compaction_moves_blobs_without_changing_them(mixed):
    """Mixed sizes fragment the slab; compaction must keep every blob's bytes and views
    must be rebuilt from the new place."""
    rng = random.Random(3)
    cache = new_cache(mixed, 3 * 73728 + 36864, "lfu")
    cache.fit_victims = False  # evict in the policy's order only, so that fragments pile up and get compacted
    keys = sorted(cache._store.entries)
    want = {}
    for _ in range(300):
        k = rng.choice(keys)
        out = use(cache, k)
        if k in want:
            torch.testing.assert_close(out, want[k], rtol=0, atol=0)
        want[k] = out
        check_invariants(cache)
    assert cache.stats()["compactions"] > 0 and cache.stats()["compact_bytes"] > 0
    cache.close()


def test_mixed_sizes_evict_a_victim_that_opens_a_hole(mixed):
    """With a choice among cold experts, the cache evicts one whose room fits the new expert
    instead of copying blobs around: far fewer bytes moved than with the policy's order alone."""
    moved = {}
    for fit in (False, True):
        rng = random.Random(3)
        cache = new_cache(mixed, 3 * 73728 + 36864, "lfu")
        cache.fit_victims = fit
        keys = sorted(cache._store.entries)
        for _ in range(300):
            use(cache, rng.choice(keys))
            check_invariants(cache)
        moved[fit] = cache.stats()["compact_bytes"]
        cache.close()
    assert moved[True] < moved[False] / 2


def test_expert_larger_than_cache_is_refused(mixed):
    cache = new_cache(mixed, 40_000)  # holds a half-precision expert, not an fp32 one
    use(cache, (0, 1))  # fp16
    with pytest.raises(BudgetError, match="needs 73728 bytes"):
        use(cache, (0, 0))
    cache.close()


def hold_first_read(cache: ExpertCache):
    """Record the order of the store's reads, submit the first expert as a prefetch and
    hold its read until `gate` is set (while the loader's queue fills); returns (gate,
    order, keys, that first request)."""
    store = cache._store
    gate, started, order = threading.Event(), threading.Event(), []
    real = store.read_into

    def read_into(entry, buf, **kw):
        order.append(entry.key)
        if len(order) == 1:
            started.set()
            gate.wait(10)
        return real(entry, buf, **kw)

    store.read_into = read_into
    keys = sorted(store.entries)
    first = cache.submit(keys[0], PREFETCH)
    assert started.wait(10)
    return gate, order, keys, first


def test_background_loads_run_in_priority_order(mixed):
    cache = new_cache(mixed, 10 * 73728)
    gate, order, keys, first = hold_first_read(cache)
    later = [cache.submit(k, PREFETCH) for k in keys[1:4]]
    urgent = cache.submit(keys[5], DEMAND)
    gate.set()
    for f in [first, *later, urgent]:
        assert f.result(timeout=30) is True
    assert order == [keys[0], keys[5], *keys[1:4]]  # the demand request jumped the queue
    assert cache.submit(keys[5]).result(timeout=30) is False  # already cached
    cache.close()


def test_demand_waits_for_an_expert_being_loaded_in_background(mixed):
    cache = new_cache(mixed, 10 * 73728)
    store, gate, started = cache._store, threading.Event(), threading.Event()
    real = store.read_into

    def slow(entry, buf, **kw):
        started.set()
        gate.wait(10)
        return real(entry, buf, **kw)

    store.read_into = slow
    key = sorted(store.entries)[0]
    fut = cache.submit(key)
    assert started.wait(10)
    threading.Timer(0.05, gate.set).start()
    entry, hit = cache.acquire(key)  # blocks until the background read is done
    assert hit and cache.stats()["waits"] == 1 and store.reads == 1
    cache.release(entry)
    assert fut.result(timeout=10) is True
    cache.close()


def test_read_ahead_pins_counts_misses_and_goes_first(mixed):
    """Misses read ahead for the compute thread: room reserved at the call (in its
    thread), read by the loader ahead of queued prefetches, in order, each pinned once
    until its acquire and counted as a miss, not a hit."""
    cache = new_cache(mixed, 10 * 73728)
    gate, order, keys, first = hold_first_read(cache)
    later = cache.submit(keys[1], PREFETCH)
    use(cache, keys[4])  # cached before the read-ahead asks for it: pinned, not read
    assert cache.read_ahead([keys[2], keys[3], keys[4]]) == keys[2:5]
    assert [cache.state(k) for k in keys[2:5]] == ["loading", "loading", READY]  # reserved at once
    before = cache.stats()
    assert before["misses"] == 3 and before["background_loads"] == 1  # keys 4, 2, 3 missed; the prefetch of 1 queued
    gate.set()
    assert later.result(timeout=30) and first.result(timeout=30)
    assert order == [keys[0], keys[4], keys[2], keys[3], keys[1]]  # read-aheads before the queued prefetch
    assert [cache._entries[k].pins for k in keys[2:5]] == [1, 1, 1]
    for k in keys[2:5]:
        entry, hit = cache.acquire(k)
        assert hit == (k == keys[4])  # the read ones are misses (counted when reserved)
        cache.release(entry)
        cache.unpin([k])
    after = cache.stats()
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    assert all(cache._entries[k].pins == 0 for k in keys[2:5])
    use(cache, keys[2])  # read ahead once: from then on a plain hit
    assert cache.stats()["hits"] == after["hits"] + 1
    with cache._cond:
        check_invariants(cache)
    cache.close()


def test_acquire_reads_a_read_ahead_the_loader_has_not_started(mixed):
    """The loader is busy (held on a prefetch): acquire claims the reserved entry and reads
    it itself, and the loader's job for it then does nothing."""
    cache = new_cache(mixed, 10 * 73728)
    gate, order, keys, first = hold_first_read(cache)
    assert cache.read_ahead([keys[2], keys[3]]) == keys[2:4]
    entry, hit = cache.acquire(keys[2])  # no deadlock: read here, while the loader waits
    assert not hit and order == [keys[0], keys[2]]
    cache.release(entry)
    cache.unpin([keys[2]])
    gate.set()
    entry, hit = cache.acquire(keys[3])  # read by the loader (or here, if it was late), a miss either way
    assert not hit
    cache.release(entry)
    cache.unpin([keys[3]])
    assert first.result(timeout=30) and sorted(order) == sorted([keys[0], keys[2], keys[3]])
    assert cache.stats()["misses"] == 2
    with cache._cond:
        check_invariants(cache)
    cache.close()


def test_read_ahead_without_room_stops_and_pins_nothing(mixed):
    cache = new_cache(mixed, 73728)  # one fp32 expert
    keys = sorted(k for k, e in cache._store.entries.items() if e.length == 73728)
    entry, _ = cache.acquire(keys[0])  # leased: the read-ahead cannot evict it
    assert cache.read_ahead([keys[1], keys[2]]) == []
    assert keys[1] not in cache and keys[2] not in cache
    cache.release(entry)
    entry, hit = cache.acquire(keys[1])  # the compute thread reads it itself
    assert not hit and entry.pins == 0
    cache.release(entry)
    cache.close()


def test_slab_asks_for_huge_pages():
    """The slab's mapping carries MADV_HUGEPAGE (VmFlags "hg" in smaps) on Linux."""
    from edgemoe.runtime.slab import Slab

    slab = Slab(8 << 20)
    if not hasattr(__import__("mmap"), "MADV_HUGEPAGE") or not Path("/sys/kernel/mm/transparent_hugepage").exists():
        slab.close()
        pytest.skip("this kernel has no transparent huge pages")
    assert slab.huge_pages
    flags = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= slab.address < hi
        elif line.startswith("VmFlags:") and inside:
            flags = line.split()[1:]
            break
    assert flags is not None and "hg" in flags
    slab.close()


def test_concurrent_demand_and_background_loads(mixed):
    """Random on-demand uses in this thread while a background thread loads other
    experts into a small cache: no overlap, no corruption, no deadlock."""
    cache = new_cache(mixed, 3 * 73728, "edgemoe")
    keys = sorted(cache._store.entries)
    rng = random.Random(7)
    ref = {k: use(cache, k) for k in keys}
    futures = []
    for i in range(400):
        if i % 3 == 0:
            futures.append(cache.submit(rng.choice(keys)))
        k = rng.choice(keys)
        torch.testing.assert_close(use(cache, k), ref[k], rtol=0, atol=0)
    for f in futures:
        try:
            f.result(timeout=30)
        except CacheFull:
            pass  # a background load may find every expert in use; it is dropped
    with cache._cond:
        check_invariants(cache)
    assert cache.stats()["background_loads"] > 0
    cache.close()


def test_file_system_without_o_direct_falls_back_to_buffered_reads(mixed, monkeypatch):
    """Where open(O_DIRECT) is refused (older tmpfs, some network file systems) the store
    reads through the page cache, says so in the statistics, and gives the same tokens."""
    real = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(path, flags, *args, **kwargs)

    ref = edgemoe.load(mixed, mode="io-free")
    want = run_prompts(ref)
    ref.close()
    monkeypatch.setattr(os, "open", no_direct)
    engine = edgemoe.load(mixed, memory=None)
    try:
        assert engine.info["io"] == "buffered"
        assert run_prompts(engine) == want
        assert engine.provider.stats()["io"] == "buffered"
    finally:
        engine.close()
