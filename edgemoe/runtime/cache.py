"""The expert cache: experts of one store held in a slab under an eviction policy, with
pins, guards, leases and loads (on demand and in the background).

The slab and its allocator are in slab.py, the background loader in loader.py; this
module decides what is cached. Its users (the offloaded provider) speak to it only
through the public operations of `ExpertCache`.

Making room. A load first asks the allocator for a free range of the expert's size.
While none fits, the cache takes the first of these steps that applies, and asks again:
1. evict one victim whose range, with the free bytes around it, holds the new expert
   (the policy's pick among such victims): one eviction is cheaper than moving blobs
   around (skipped with `fit_victims` off);
2. if the free bytes add up to enough but are scattered, compact (once until the next
   eviction): slide movable blobs down over the gaps (memmove inside the slab), leaving
   one contiguous tail;
3. evict the policy's pick among all victims;
4. with no victim left, a load that may wait (on demand) waits for another thread's
   load or lease to end; one that may not (in the background) fails with CacheFull, and
   a waiting one with nothing to wait for fails with BudgetError (all is pinned).
Victims are READY experts that are neither pinned nor leased nor guarded; when there is
none, a load other than a prefetch (on demand, or queued at DEMAND priority) also takes
guarded ones. With equal-sized blobs every victim fits, so step 1 keeps the policy's
order and compaction never happens; with mixed formats it is counted in the statistics.

States and protection. An entry is LOADING (its range is being written by some thread:
neither evicted nor moved) or READY. A READY entry can additionally be
- pinned (`pin`/`unpin`, counted): not evicted, but may be moved by compaction. The
  provider pins the cached experts the current layer still needs (`request`).
- leased (`acquire`/`release`, counted): in use by compute through views, so neither
  evicted nor moved.
- guarded (`guard`): predicted for a layer that has not run yet. The provider numbers
  layer requests (`begin_forward`, `request`); an entry guarded up to request g > now is
  never evicted to make room for a background load (a prefetch), and a demand load takes
  it only when no unguarded expert can go. Guards lapse by themselves as requests advance.

Demand first. A read the compute thread waits for (a miss in `acquire`, a late prefetch
it waits on, or a layer that holds the link with `hold_background`) pauses background
reads: none starts, and one in progress stops between chunks of a throttled read until
the demand is served, so a prefetch delays a demand by at most the one chunk already on
the wire. A background read the compute thread starts waiting for becomes urgent and
is never paused. `bandwidth()` is the read rate measured on recent loads (pauses left
out), which the provider uses to pace its prefetches.

Threads. All bookkeeping happens under one condition variable; reads and checksum
verification run outside it, so loads in different threads overlap. `acquire` (the
on-demand path) reads a missing expert in the calling thread, so it never queues behind
background requests; `submit` queues a load for the background loader in priority order
and returns a LoadFuture that carries any error to whoever asks it.

Read-ahead. `read_ahead` takes the misses a layer will ask for next: it reserves their
room at once, in the calling (compute) thread, so evictions happen in the same order
whatever the threads' timing, and queues their reads for the loader ahead of everything
else. A reserved entry is LOADING and unclaimed until the loader starts its read, or
`acquire` reaches it first and reads it itself; either way it is read once and counts as
one miss.

This module is longer than most (~700 lines) on purpose: every field of ExpertCache is
under its one lock, and the invariants (no overlap, what pins, leases and guards
protect) span reserving, filling, evicting and compacting; split over files, each part
would have to trust the others' locking.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import BudgetError, EdgeMoEError
from ..experts import Expert
from ..store.manifest import ALIGN, ExpertEntry
from ..store.reader import ExpertStore, ReadAborted
from .loader import DEMAND, PREFETCH, READAHEAD, Loader, LoadFuture
from .policies import Key, Policy
from .slab import Slab, SlabAllocator, views_only
from .stats import CacheStats, Throttle

__all__ = ["CacheCounters", "CacheFull", "DEMAND", "Entry", "ExpertCache", "LOADING", "LoadFuture", "PREFETCH",
           "READAHEAD", "READY"]

LOADING, READY = "loading", "ready"


class CacheFull(EdgeMoEError):
    """A background load found no room that it was allowed to take."""


class CacheCounters(NamedTuple):
    """Cumulative counters since the last `reset_stats`, read together under the lock."""

    hits: int
    misses: int
    bytes_read: int
    stall_s: float
    read_s: float
    background_bytes: int = 0  # bytes of background loads completed
    miss_s: float = 0.0  # time the compute thread spent reading its misses (part of stall_s)


@dataclass(eq=False)
class Entry:
    """One cached expert: where its blob lies in the slab and what protects it. `acquire`
    hands it out as the lease; pass it back to `expert` and `release`."""

    key: Key
    info: ExpertEntry
    offset: int
    length: int
    state: str = LOADING
    pins: int = 0
    leases: int = 0
    guard: int = -1  # protected from background evictions while the cache's clock is below this
    urgent: bool = True  # its read goes ahead of background reads (a demand waits for it)
    readahead: bool = False  # reserved by `read_ahead` for the compute thread's next use, not yet acquired
    claimed: bool = True  # a thread fills it (a read-ahead entry waits unclaimed for the loader or acquire)


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    compactions: int = 0
    compact_bytes: int = 0
    background_loads: int = 0
    background_bytes: int = 0
    waits: int = 0
    paused: int = 0  # background reads that paused for a demand
    paused_s: float = 0.0
    stall_s: float = 0.0
    miss_s: float = 0.0
    verify_s: float = 0.0
    verifications: int = 0
    verify_bytes: int = 0
    peak_used: int = 0


class ExpertCache:
    """Experts of one store held in a slab of `capacity` bytes under an eviction policy.

    Settings callers may change: `fit_victims` (False: make room in the policy's order
    only, compacting fragments) and `verify` ("first" or "always")."""

    def __init__(self, store: ExpertStore, capacity: int, policy: Policy, act: str, dtype: torch.dtype,
                 verify: str = "first", loader_threads: int = 1):
        if verify not in ("first", "always"):
            raise EdgeMoEError(f"verify must be 'first' or 'always', got {verify!r}")
        if loader_threads < 1:
            raise EdgeMoEError(f"the background loader needs at least one thread, got {loader_threads}")
        self.capacity = capacity - capacity % ALIGN
        self.verify = verify
        self.fit_victims = True
        self._store, self._policy, self._act, self._dtype = store, policy, act, dtype
        self._loader_threads = loader_threads
        self._now = 0  # the provider's layer-request counter, for guards
        self._slab = Slab(self.capacity)
        self._alloc = SlabAllocator(self.capacity)
        self._entries: dict[Key, Entry] = {}
        self._cond = threading.Condition()
        self._verified: set[Key] = set()
        self._touched = 0  # highest slab byte ever written: those pages are in RSS
        self._loader: Loader | None = None
        self._built: dict[tuple[str, int, int], Expert] = {}  # see expert()
        self._demand = 0  # reads (and holds) the compute thread is waiting on: background reads pause
        self._blobs = len({e.blob_key for e in store.entries.values()})  # distinct blobs in the store
        self._ready = 0  # READY entries (holds_all)
        sizes = {e.length for e in store.entries.values()}
        self._uniform = sizes.pop() if len(sizes) == 1 else 0  # the one blob size, if all are equal
        self._bw: float | None = None  # measured read rate, bytes/s (an exponential average)
        self._views_only: dict[str, bool] = {}
        self.reset_stats()

    # ----------------------------------------------------------------- facts

    @property
    def args(self):
        """The model's arguments (ModelArgs) as the expert store records them."""
        return self._store.args

    @property
    def io_mode(self) -> str:
        """How the store reads: "direct" (O_DIRECT) or "buffered"."""
        return self._store.io_mode

    @property
    def used(self) -> int:
        """Bytes of the slab taken by cached or loading experts."""
        return self._alloc.capacity - self._alloc.free_bytes

    def holds_all(self) -> bool:
        """Whether every blob of the store is cached and ready: nothing is left to read
        (a budget that holds the whole model, once it is warm)."""
        return self._ready == self._blobs

    def blob_bytes(self, key: Key) -> int:
        """Bytes the expert takes in the slab when cached."""
        return self._store.entries[key].length

    def blob_key(self, key: Key) -> Key:
        """The key this expert is cached under: the key of the expert whose blob it shares
        (a merged group's members are stored once, so cached once), else its own."""
        e = self._store.entries.get(key)
        return e.blob_key if e is not None else key

    # ----------------------------------------------------------------- statistics

    def reset_stats(self) -> None:
        """Zero the counters (the cache's, its store's and its read throttle's wait)."""
        with self._cond:
            self._n = _Counts(peak_used=self.used)
            self._store.bytes_read = self._store.reads = 0
            self._store.read_s = 0.0
            if self._store.throttle is not None:
                self._store.throttle.wait_s = 0.0

    def counters(self) -> CacheCounters:
        """The counters a caller accounts per phase, as one consistent snapshot."""
        with self._cond:
            s = self._store
            n = self._n
            return CacheCounters(n.hits, n.misses, s.bytes_read, n.stall_s, s.read_s, n.background_bytes, n.miss_s)

    def stats(self) -> CacheStats:
        """Every counter and the slab's occupancy (its to_dict() is JSON-ready)."""
        with self._cond:
            c = self._n
            n = c.hits + c.misses
            return CacheStats(
                hits=c.hits,
                misses=c.misses,
                hit_rate=round(c.hits / n, 4) if n else 0.0,
                bytes_read=self._store.bytes_read,
                read_s=round(self._store.read_s, 6),
                verify_s=round(c.verify_s, 6),
                verifications=c.verifications,
                verify_bytes=c.verify_bytes,
                stall_s=round(c.stall_s, 6),
                evictions=c.evictions,
                compactions=c.compactions,
                compact_bytes=c.compact_bytes,
                background_loads=c.background_loads,
                background_bytes=c.background_bytes,
                waits=c.waits,
                background_paused=c.paused,
                background_paused_s=round(c.paused_s, 6),
                read_bandwidth_bps=int(self._bw) if self._bw else None,
                cache_bytes=self.capacity,
                cache_used_bytes=self.used,
                cache_peak_bytes=c.peak_used,
                cache_touched_bytes=self._touched,
                cached_experts=len(self._entries),
            )

    def throttle_stats(self) -> Throttle:
        """The read throttle's rate (None without one) and, with one, its waiting time."""
        throttle = self._store.throttle
        if throttle is None:
            return Throttle(None, None)
        return Throttle(int(throttle.rate), round(throttle.wait_s, 6))

    def eviction_stats(self) -> dict:
        """What the eviction policy reports about itself (Belady: its place in the trace)."""
        return self._policy.describe()

    # ----------------------------------------------------------------- requests and protection

    def begin_forward(self, num_tokens: int, base: int) -> None:
        """A model forward of `num_tokens` begins; its first layer request will be number
        `base`, so the guards of the last forward lapse."""
        with self._cond:
            self._policy.on_forward(num_tokens)
            self._now = base

    def request(self, layer: int, keys, now: int) -> list[Key]:
        """Layer request number `now` asks for `keys` (all of one layer): the policy hears
        of it and the present ones (READY or loading) are pinned and returned; `unpin` them
        (or lease them) as they are served."""
        with self._cond:
            self._now = now
            self._policy.on_request(layer, [k[1] for k in keys])
            return self.pin(keys)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def pin(self, keys) -> list[Key]:
        """Protect cached experts from eviction; returns the keys that were present
        (READY or being loaded). Call with the same keys to `unpin`."""
        with self._cond:
            present = [k for k in keys if k in self._entries]
            for k in present:
                self._entries[k].pins += 1
            return present

    def unpin(self, keys) -> None:
        with self._cond:
            for k in keys:
                e = self._entries.get(k)
                if e is not None and e.pins > 0:
                    e.pins -= 1

    def guard(self, keys, until: int) -> list[Key]:
        """Guard the present ones of `keys` from background evictions until request
        `until` (see the module notes); returns those present."""
        with self._cond:
            present = [k for k in keys if k in self._entries]
            for k in present:
                e = self._entries[k]
                e.guard = max(e.guard, until)
            return present

    def state(self, key: Key) -> str | None:
        """LOADING, READY or None (not cached)."""
        e = self._entries.get(key)
        return e.state if e is not None else None

    def present_ids(self, layer: int) -> set[int]:
        """The expert ids of `layer` whose blob is cached or being read (cache-aware routing)."""
        stored = self._store.entries
        with self._cond:
            entries = self._entries
            out = set()
            for e in range(self._store.args.experts_per_layer):
                info = stored.get((layer, e))
                if info is not None and info.blob_key in entries:
                    out.add(e)
            return out

    def smallest_blob(self) -> int:
        """Bytes of the smallest expert blob in the store."""
        return min((i.length for i in self._store.entries.values()), default=0)

    def bandwidth(self) -> float | None:
        """Read rate measured on recent loads, bytes per second (None before the first)."""
        return self._bw

    def hold_background(self) -> None:
        """The compute thread is about to read on demand (a layer with misses): pause
        background reads until `release_background`."""
        with self._cond:
            self._demand += 1

    def release_background(self) -> None:
        with self._cond:
            self._demand -= 1
            if not self._demand:
                self._cond.notify_all()

    # ----------------------------------------------------------------- on-demand path

    def acquire(self, key: Key) -> tuple[Entry, bool]:
        """The expert, READY and leased to the caller (release it after use), and whether
        it was a hit. A miss is read in the calling thread; errors are raised here. A
        read-ahead entry (`read_ahead`) counts as a miss (when it was reserved): waited for
        if the loader is reading it, read here if the loader has not started it."""
        t0 = time.perf_counter()
        inserted = False  # the policy heard of it already
        with self._cond:
            waited = False
            while True:
                e = self._entries.get(key)
                if e is None:
                    break
                if e.state == READY:
                    e.leases += 1
                    self._policy.on_access(key)
                    dt = time.perf_counter() - t0 if waited else 0.0
                    self._n.stall_s += dt
                    if e.readahead:  # read ahead for this use: a miss, counted when reserved
                        e.readahead = False
                        self._n.miss_s += dt
                        return e, False
                    self._n.hits += 1
                    return e, True
                if not e.claimed:  # reserved for read-ahead, not started: read it here
                    e.claimed, e.readahead = True, False
                    inserted = True  # by read_ahead
                    break
                # Being read by another thread (a prefetch or a read-ahead): waiting beats
                # reading it twice, and from now on that read goes ahead of other background reads.
                e.urgent = True
                self._cond.notify_all()  # if its read was paused for a demand, it resumes
                waited = True
                self._n.waits += not e.readahead
                self._demand += 1  # other background reads pause meanwhile
                try:
                    self._cond.wait()
                finally:
                    self._demand -= 1
                    if not self._demand:
                        self._cond.notify_all()
            if e is None:
                e = self._reserve(key, wait=True)
                self._n.misses += 1
            e.leases += 1
            self._demand += 1
        try:
            self._fill(e, insert=not inserted)
        finally:
            with self._cond:
                self._demand -= 1
                if not self._demand:
                    self._cond.notify_all()
        with self._cond:
            self._policy.on_access(key)
            dt = time.perf_counter() - t0
            self._n.stall_s += dt
            self._n.miss_s += dt
        return e, False

    def lease_cached(self, keys) -> dict[Key, Entry]:
        """Lease every one of `keys`, all cached and READY (holds_all), as hits, under one
        lock: what `acquire` does per key, for a layer whose experts are all in memory.
        End the leases with `release_all`."""
        with self._cond:
            out = {key: self._entries.get(key) for key in keys}
            for key, e in out.items():
                if e is None or e.state != READY:  # checked before any lease is taken
                    raise EdgeMoEError(f"lease_cached: expert {key} is not cached and ready")
            for key, e in out.items():
                e.leases += 1
                self._policy.on_access(key)
                self._n.hits += 1
            return out

    def release_all(self, entries) -> None:
        """End the leases from `lease_cached`."""
        with self._cond:
            free = False
            for entry in entries:
                entry.leases -= 1
                free |= entry.leases == 0
            if free:
                self._cond.notify_all()

    def release(self, entry: Entry) -> None:
        """End a lease from `acquire`."""
        with self._cond:
            entry.leases -= 1
            if entry.leases == 0:
                self._cond.notify_all()

    def expert(self, entry: Entry) -> Expert:
        """The callable expert for a leased entry, built from views into the slab.

        Building one costs ~100 us of Python per use, so built experts are kept by
        (format, offset, length): an expert of one format is nothing but views of a slab
        range, valid for whatever blob of that format is read there later. This holds
        only for formats whose experts hold no tensor outside the slab (checked on the
        first build of each format): one that converted on load would keep a copy
        outside the budget, and is built anew for every lease."""
        where = (entry.info.format, entry.offset, entry.length)
        expert = self._built.get(where)
        if expert is not None:
            return expert
        blob = self._slab.tensor[entry.offset : entry.offset + entry.length]
        expert = self._store.expert(entry.info, blob, self._act, self._dtype)
        fmt = entry.info.format
        if fmt not in self._views_only:
            self._views_only[fmt] = views_only(expert, self._slab.address, self._slab.address + self.capacity)
        if self._views_only[fmt]:
            self._built[where] = expert
        return expert

    # ----------------------------------------------------------------- loads

    def load(self, key: Key, wait: bool = False, guard: int = -1, urgent: bool = False, abort=None) -> bool:
        """Make `key` cached without leasing it (what background loads do). Returns False
        if it was already there. Without `wait` it never blocks on other loads, evicts no
        guarded expert, and raises CacheFull when only protected experts could make room.
        `guard` guards the expert (present or loaded) until that request. An `urgent`
        (demand) load may evict guarded experts and reads ahead of the others; `abort`
        is checked between chunks of a throttled read (see ExpertStore.read_into)."""
        with self._cond:
            if not (wait or urgent) and self._demand:  # demand first: start once it is served
                t0 = time.perf_counter()
                while self._demand and not (abort is not None and abort()):
                    self._cond.wait()
                self._n.paused += 1
                self._n.paused_s += time.perf_counter() - t0
                if abort is not None and abort():
                    raise ReadAborted(f"layer {key[0]} expert {key[1]}: background load dropped before it started", 0)
            e = self._entries.get(key)
            if e is not None:
                e.guard = max(e.guard, guard)
                return False
            e = self._reserve(key, wait=wait, background=not (wait or urgent))
            e.guard, e.urgent = guard, urgent
            self._n.background_loads += 1
        self._fill(e, abort=abort)
        with self._cond:
            self._n.background_bytes += e.length
        return True

    def _queued(self, key: Key, guard: int, priority: int, abort) -> bool:
        """A load the background loader runs (see `submit_many` and `read_ahead`)."""
        if priority == READAHEAD:
            with self._cond:
                e = self._entries.get(key)
                if e is None or e.claimed:  # acquire got to it first (or its read failed there)
                    return False
                e.claimed = True
            self._fill(e, insert=False)
            return True
        return self.load(key, guard=guard, urgent=priority <= DEMAND, abort=abort)

    def load_all(self) -> None:
        """Read every expert of the store (IO-FREE: the capacity must hold them all)."""
        entries = self._store.entries
        for key in sorted(entries, key=lambda k: entries[k].offset):
            self.load(key, wait=True)

    def submit(self, key: Key, priority: int = PREFETCH, guard: int = -1) -> LoadFuture:
        """Queue a background load; lower priorities run first (DEMAND before PREFETCH,
        and a DEMAND load also reads ahead of prefetches under a read throttle). The
        Future's result is True if it read the expert, False if it was cached already;
        `future.abort()` stops it between chunks of a throttled read (ReadAborted)."""
        return self.submit_many([(key, priority, guard)])[0]

    def submit_many(self, items) -> list[LoadFuture]:
        """Queue several background loads, (key, priority, guard) each, with one wake-up."""
        with self._cond:
            if self._loader is None:
                self._loader = Loader(self._queued, self._loader_threads)
        return self._loader.submit_many(items)

    def read_ahead(self, keys) -> list[Key]:
        """Misses the compute thread will ask for next, in this order: room for each is
        reserved now, in the calling thread (evicting by the policy, as reading them one
        by one would: the cache evolves the same way whatever the threads' timing), and the
        loader reads them one after another, ahead of every other queued load, while the
        caller computes with what it has. Returns the keys taken: each is pinned once
        (unpin it after its `acquire`) and counts as a miss; `acquire` waits for one being
        read, and reads one the loader has not started. Reserving stops at the first key
        with no room (every other expert pinned, leased or loading): `acquire` reads that
        one and those after it, in turn."""
        taken: list[Key] = []
        jobs = []
        with self._cond:
            for key in keys:
                e = self._entries.get(key)
                if e is not None:  # cached or being read meanwhile: just keep it
                    e.pins += 1
                    taken.append(key)
                    continue
                try:
                    e = self._reserve(key, wait=False)
                except CacheFull:
                    break
                e.pins, e.readahead, e.claimed = 1, True, False
                self._n.misses += 1
                self._policy.on_insert(key)  # here, not when its read ends: a fixed order
                taken.append(key)
                jobs.append((key, READAHEAD, -1))
        if jobs:
            self.submit_many(jobs)
        return taken

    def _reserve(self, key: Key, wait: bool, background: bool = False) -> Entry:
        """Find room (see "Making room" in the module notes) and register `key` as
        LOADING. Lock held."""
        info = self._store.entries.get(key)
        if info is None:
            raise EdgeMoEError(f"layer {key[0]} expert {key[1]} is not in the expert store")
        need = info.length
        if need > self.capacity:
            raise BudgetError(f"{info.name} needs {need} bytes but the expert cache holds {self.capacity}")
        compacted = False
        while True:
            off = self._alloc.alloc(need)
            if off is not None:
                break
            victims = [k for k, e in self._entries.items()
                       if e.state == READY and not e.pins and not e.leases and e.guard <= self._now]
            if not victims and not background:
                victims = [k for k, e in self._entries.items() if e.state == READY and not e.pins and not e.leases]
            fit = self._victim_that_fits(victims, need) if victims else None
            if fit is not None:  # one eviction makes the hole: cheaper than moving blobs around
                self._evict(fit)
                compacted = False
                continue
            if self._alloc.free_bytes >= need and not compacted:
                self._compact()
                compacted = True
                continue
            if victims:
                self._evict(self._policy.victim(victims))
                compacted = False
                continue
            if wait and any(e.state == LOADING or e.leases for e in self._entries.values()):
                for e in self._entries.values():  # a background read paused for this demand must end
                    if e.state == LOADING:
                        e.urgent = True
                self._cond.notify_all()
                self._cond.wait()  # another thread's load or use ends, then its room may be taken
                compacted = False
                continue
            if not wait:
                raise CacheFull(f"no room for {info.name}: every cached expert is pinned or in use")
            raise BudgetError(f"no room for {info.name} in a {self.capacity}-byte cache: every cached expert "
                              "is pinned; the memory budget is too small for this access pattern")
        e = Entry(key, info, off, need)
        self._entries[key] = e
        self._n.peak_used = max(self._n.peak_used, self.used)
        self._touched = max(self._touched, off + need)
        return e

    def _fill(self, e: Entry, abort=None, insert: bool = True) -> None:
        """Read and verify a LOADING entry outside the lock, then publish it as READY. On
        failure the entry and its room are given back and the error propagates."""
        store = self._store
        paused = [0.0]

        def stop() -> bool:
            """Between chunks of a background read: pause while the compute thread waits
            for a demand read (unless this read became urgent), then ask `abort`."""
            if self._demand and not e.urgent:
                t = time.perf_counter()
                with self._cond:
                    while self._demand and not e.urgent and not (abort is not None and abort()):
                        self._cond.wait()
                    self._n.paused += 1
                paused[0] += time.perf_counter() - t
            return abort is not None and abort()

        try:
            buf = self._slab.view[e.offset : e.offset + e.length]
            t0 = time.perf_counter()
            if e.urgent and abort is None:
                store.read_into(e.info, buf)
            else:  # a background read: its urgency can change while it runs
                store.read_into(e.info, buf, urgent=lambda: e.urgent, abort=stop)
            dt = time.perf_counter() - t0 - paused[0]
            if dt > 0:
                with self._cond:  # an exponential average over the last few reads
                    rate = e.length / dt
                    self._bw = rate if self._bw is None else 0.7 * self._bw + 0.3 * rate
                    self._n.paused_s += paused[0]
            # "first": each expert's first read in this cache is checked, not its re-reads
            # after an eviction; "always": every read from storage is.
            if self.verify == "always" or e.key not in self._verified:
                t0 = time.perf_counter()
                store.verify(e.info, buf)
                with self._cond:
                    self._n.verify_s += time.perf_counter() - t0
                    self._n.verifications += 1
                    self._n.verify_bytes += e.info.size
                    self._verified.add(e.key)
        except BaseException:
            with self._cond:
                del self._entries[e.key]
                self._alloc.release(e.offset, e.length)
                self._cond.notify_all()
            raise
        with self._cond:
            e.state = READY
            self._ready += 1
            if insert:
                self._policy.on_insert(e.key)
            self._cond.notify_all()

    def _victim_that_fits(self, victims: list[Key], need: int) -> Key | None:
        """The policy's pick among the victims whose room, with the free space around it,
        holds `need` bytes (None if none does, or with fit_victims off). With experts of
        mixed sizes (a bitwidth plan) the policy's overall pick may leave only fragments,
        and compaction copies up to the whole slab (measured: 17 GB moved in a 32-token run
        of a 2.3 B model), far more than re-reading one expert costs. With equal sizes every
        victim fits, so the policy's order is unchanged."""
        if not self.fit_victims:
            return None
        if self._uniform and need == self._uniform:  # every victim's room holds it: skip the checks
            return self._policy.victim(victims)
        entries = self._entries
        fits = [k for k in victims if self._alloc.hole_around(entries[k].offset, entries[k].length) >= need]
        return self._policy.victim(fits) if fits else None

    def _evict(self, key: Key) -> None:
        e = self._entries.pop(key)
        self._ready -= e.state == READY
        self._alloc.release(e.offset, e.length)
        self._policy.on_evict(key)
        self._n.evictions += 1

    def _compact(self) -> None:
        """Slide movable blobs (READY, not leased) towards offset 0, around the immovable
        ones, so the free bytes become contiguous. Lock held."""
        live = sorted(self._entries.values(), key=lambda e: e.offset)
        walls = [e.offset for e in live if e.state != READY or e.leases]
        cursor, moved = 0, 0
        for e in live:
            if e.state != READY or e.leases:
                cursor = max(cursor, e.offset + e.length)
                continue
            j = bisect.bisect_left(walls, cursor)
            limit = walls[j] if j < len(walls) else self.capacity  # the next immovable blob
            if e.offset > cursor and cursor + e.length <= limit:
                self._slab.move(cursor, e.offset, e.length)
                moved += e.length
                e.offset = cursor
            cursor = e.offset + e.length
        self._alloc.rebuild([(e.offset, e.length) for e in live])
        self._n.compactions += 1
        self._n.compact_bytes += moved

    # ----------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Stop the loader, drop every expert, give the slab back and close the store."""
        with self._cond:  # no demand is coming any more: a paused background read ends
            self._demand = 0
            self._cond.notify_all()
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        with self._cond:
            self._entries.clear()
        self._built.clear()
        self._slab.close()
        self._store.close()

