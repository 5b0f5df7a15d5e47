"""The expert cache: one preallocated slab, a variable-size allocator, pins, and loads.

Memory. The slab is a single anonymous mapping sized from the budget at start-up; loads
read straight into it (O_DIRECT `pread`) and experts compute from zero-copy views of it,
so nothing is allocated per load. Pages count in RSS once first written, so the cache
never holds more than its capacity.

Allocation. Blobs may differ in size (experts of one model can have different formats),
so the slab is managed as byte ranges in 4 KiB units: best fit over a sorted, coalesced
free list. To make room, the eviction policy names victims one at a time until enough
bytes are free; if the free bytes are then scattered, the cache compacts: it slides
movable blobs down over the gaps (memmove inside the slab) and frees one contiguous
tail. With equal-sized blobs an eviction always leaves a hole that fits, so compaction
only ever happens with mixed formats; it is counted in the statistics.

States and protection. An entry is LOADING (its range is being written by some thread:
neither evicted nor moved) or READY. A READY entry can additionally be
- pinned (`pin`/`unpin`, counted): not evicted, but may be moved by compaction. The
  provider pins the cached experts the current layer still needs.
- leased (`acquire`/`release`, counted): in use by compute through views, so neither
  evicted nor moved.
- guarded (`guard`): predicted for a layer that has not run yet. The provider numbers
  layer requests (`now`); an entry guarded up to request g > now is never evicted to make
  room for a background load (a prefetch), and a demand load takes it only when no
  unguarded expert can go. Guards lapse by themselves as the requests advance.

Threads. All bookkeeping happens under one condition variable; reads and checksum
verification run outside it, so loads in different threads overlap. `acquire` (the
on-demand path) reads a missing expert in the calling thread, so it never queues behind
background requests; `submit` queues a load for the background loader (a small pool of
threads) in priority order and returns a request (Future-like) that carries any error to
whoever asks it. A background load that is no longer wanted can be cancelled while queued and
aborted while reading (between chunks of a throttled read).
"""

from __future__ import annotations

import bisect
import ctypes
import heapq
import itertools
import mmap
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass

import torch

from ..errors import BudgetError, EdgeMoEError
from ..experts import Expert
from ..store.format import ALIGN, ExpertEntry
from ..store.reader import ExpertStore
from .policies import Key, Policy

LOADING, READY = "loading", "ready"
DEMAND, PREFETCH = 0, 10  # loader priorities: lower runs first


class CacheFull(EdgeMoEError):
    """A background load found no room that it was allowed to take."""


class Slab:
    """Page-aligned memory for expert blobs (an anonymous mapping)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._mm = mmap.mmap(-1, max(capacity, ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self._mm)  # for preadv
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)  # (capacity,) for zero-copy views
        self.address = self.tensor.data_ptr()  # page-aligned: what O_DIRECT needs

    def move(self, dst: int, src: int, n: int) -> None:
        """memmove inside the slab (ranges may overlap)."""
        ctypes.memmove(self.address + dst, self.address + src, n)

    def close(self) -> None:
        try:
            self.view.release()
        except BufferError:
            pass
        self.tensor = None
        try:
            self._mm.close()
        except BufferError:  # views of a blob are still alive somewhere; the GC frees the mapping later
            pass


class SlabAllocator:
    """Best-fit allocation of byte ranges in [0, capacity); sizes are multiples of ALIGN."""

    def __init__(self, capacity: int):
        self.capacity = capacity - capacity % ALIGN
        self.free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # (offset, size) by offset
        self.free_bytes = self.capacity

    def alloc(self, size: int) -> int | None:
        best = None
        for i, (off, n) in enumerate(self.free):
            if n >= size and (best is None or n < self.free[best][1]):
                best = i
                if n == size:
                    break
        if best is None:
            return None
        off, n = self.free[best]
        if n == size:
            del self.free[best]
        else:
            self.free[best] = (off + size, n - size)
        self.free_bytes -= size
        return off

    def release(self, offset: int, size: int) -> None:
        self.free_bytes += size
        i = bisect.bisect_left(self.free, (offset, 0))
        # Coalesce with the free neighbours on either side.
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == offset:
            i -= 1
            offset, size = self.free[i][0], self.free[i][1] + size
            del self.free[i]
        if i < len(self.free) and offset + size == self.free[i][0]:
            size += self.free[i][1]
            del self.free[i]
        self.free.insert(i, (offset, size))

    def rebuild(self, used: list[tuple[int, int]]) -> None:
        """Free list = the complement of the given (offset, size) ranges."""
        self.free, pos = [], 0
        for off, n in sorted(used):
            if off > pos:
                self.free.append((pos, off - pos))
            pos = max(pos, off + n)
        if pos < self.capacity:
            self.free.append((pos, self.capacity - pos))
        self.free_bytes = sum(n for _, n in self.free)

    def hole_around(self, offset: int, size: int) -> int:
        """Bytes of the contiguous free range that releasing [offset, offset + size) would make."""
        hole = size
        i = bisect.bisect_left(self.free, (offset, 0))
        if i > 0 and self.free[i - 1][0] + self.free[i - 1][1] == offset:
            hole += self.free[i - 1][1]
        if i < len(self.free) and self.free[i][0] == offset + size:
            hole += self.free[i][1]
        return hole

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self.free), default=0)


@dataclass(eq=False)
class Entry:
    key: Key
    info: ExpertEntry
    offset: int
    length: int
    state: str = LOADING
    pins: int = 0
    leases: int = 0
    guard: int = -1  # protected from background evictions while the cache's `now` is below this
    urgent: bool = True  # its read goes ahead of background reads (a demand waits for it)


class ExpertCache:
    """Experts of one store held in a slab of `capacity` bytes under an eviction policy."""

    def __init__(self, store: ExpertStore, capacity: int, policy: Policy, act: str, dtype: torch.dtype,
                 verify: str = "first", loader_threads: int = 1):
        if verify not in ("first", "always"):
            raise EdgeMoEError(f"verify must be 'first' or 'always', got {verify!r}")
        if loader_threads < 1:
            raise EdgeMoEError(f"the background loader needs at least one thread, got {loader_threads}")
        self.loader_threads = loader_threads
        self.now = 0  # the provider's layer-request counter, for guards
        self.store, self.policy, self.act, self.dtype, self.verify = store, policy, act, dtype, verify
        self.capacity = capacity - capacity % ALIGN
        self.slab = Slab(self.capacity)
        self.alloc = SlabAllocator(self.capacity)
        self.fit_victims = True  # False: make room in the policy's order only, compacting fragments
        self.entries: dict[Key, Entry] = {}
        self.cond = threading.Condition()
        self.verified: set[Key] = set()
        self.touched = 0  # highest slab byte ever written: those pages are in RSS
        self._loader: _Loader | None = None
        self._built: dict[tuple[str, int, int], Expert] = {}  # see expert()
        self._views_only: dict[str, bool] = {}
        self.reset_stats()

    # ----------------------------------------------------------------- statistics

    def reset_stats(self) -> None:
        with self.cond:
            self.hits = self.misses = self.evictions = self.compactions = self.compact_bytes = 0
            self.background_loads = self.background_bytes = self.waits = 0
            self.stall_s = self.verify_s = 0.0
            self.verifications = self.verify_bytes = 0
            self.peak_used = self.used
            self.store.bytes_read = self.store.reads = 0
            self.store.read_s = 0.0

    @property
    def used(self) -> int:
        return self.alloc.capacity - self.alloc.free_bytes

    def stats(self) -> dict:
        with self.cond:
            n = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / n, 4) if n else 0.0,
                "bytes_read": self.store.bytes_read,
                "read_s": round(self.store.read_s, 6),
                "verify_s": round(self.verify_s, 6),
                "verifications": self.verifications,
                "verify_bytes": self.verify_bytes,
                "stall_s": round(self.stall_s, 6),
                "evictions": self.evictions,
                "compactions": self.compactions,
                "compact_bytes": self.compact_bytes,
                "background_loads": self.background_loads,
                "background_bytes": self.background_bytes,
                "waits": self.waits,
                "cache_bytes": self.capacity,
                "cache_used_bytes": self.used,
                "cache_peak_bytes": self.peak_used,
                "cache_touched_bytes": self.touched,
                "cached_experts": len(self.entries),
            }

    # ----------------------------------------------------------------- queries

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def cached(self) -> list[Key]:
        with self.cond:
            return [k for k, e in self.entries.items() if e.state == READY]

    def pin(self, keys) -> list[Key]:
        """Protect cached experts from eviction; returns the keys that were present
        (READY or being loaded). Call with the same keys to `unpin`."""
        with self.cond:
            present = [k for k in keys if k in self.entries]
            for k in present:
                self.entries[k].pins += 1
            return present

    def unpin(self, keys) -> None:
        with self.cond:
            for k in keys:
                e = self.entries.get(k)
                if e is not None and e.pins > 0:
                    e.pins -= 1

    def guard(self, keys, until: int) -> list[Key]:
        """Guard the present ones of `keys` from background evictions until request
        `until` (see the module notes); returns those present."""
        with self.cond:
            present = [k for k in keys if k in self.entries]
            for k in present:
                e = self.entries[k]
                e.guard = max(e.guard, until)
            return present

    def state(self, key: Key) -> str | None:
        """LOADING, READY or None (not cached)."""
        e = self.entries.get(key)
        return e.state if e is not None else None

    # ----------------------------------------------------------------- on-demand path

    def acquire(self, key: Key) -> tuple[Entry, bool]:
        """The expert, READY and leased to the caller (release it after use), and whether
        it was a hit. A miss is read in the calling thread; errors are raised here."""
        t0 = time.perf_counter()
        with self.cond:
            waited = False
            while True:
                e = self.entries.get(key)
                if e is None:
                    break
                if e.state == READY:
                    e.leases += 1
                    self.policy.on_access(key)
                    self.hits += 1
                    if waited:
                        self.stall_s += time.perf_counter() - t0
                    return e, True
                # Being read by another thread (a prefetch): waiting beats reading it twice,
                # and from now on that read goes ahead of other background reads.
                e.urgent = True
                waited = True
                self.waits += 1
                self.cond.wait()
            e = self._reserve(key, wait=True)
            e.leases = 1
            self.misses += 1
        self._fill(e)
        with self.cond:
            self.policy.on_access(key)
            self.stall_s += time.perf_counter() - t0
        return e, False

    def release(self, entry: Entry) -> None:
        with self.cond:
            entry.leases -= 1
            if entry.leases == 0:
                self.cond.notify_all()

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
        blob = self.slab.tensor[entry.offset : entry.offset + entry.length]
        expert = self.store.expert(entry.info, blob, self.act, self.dtype)
        fmt = entry.info.format
        if fmt not in self._views_only:
            self._views_only[fmt] = _views_only(expert, self.slab.address, self.slab.address + self.capacity)
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
        with self.cond:
            e = self.entries.get(key)
            if e is not None:
                e.guard = max(e.guard, guard)
                return False
            e = self._reserve(key, wait=wait, background=not (wait or urgent))
            e.guard, e.urgent = guard, urgent
            self.background_loads += 1
        self._fill(e, abort=abort)
        with self.cond:
            self.background_bytes += e.length
        return True

    def load_all(self) -> None:
        """Read every expert of the store (IO-FREE: the capacity must hold them all)."""
        for key in sorted(self.store.entries, key=lambda k: self.store.entries[k].offset):
            self.load(key, wait=True)

    def submit(self, key: Key, priority: int = PREFETCH, guard: int = -1) -> "LoadFuture":
        """Queue a background load; lower priorities run first (DEMAND before PREFETCH,
        and a DEMAND load also reads ahead of prefetches under a read throttle). The
        Future's result is True if it read the expert, False if it was cached already;
        `future.abort()` stops it between chunks of a throttled read (ReadAborted)."""
        return self.submit_many([(key, priority, guard)])[0]

    def submit_many(self, items) -> list["LoadFuture"]:
        """Queue several background loads, (key, priority, guard) each, with one wake-up."""
        with self.cond:
            if self._loader is None:
                self._loader = _Loader(self, self.loader_threads)
        return self._loader.submit_many(items)

    def cancel_pending(self) -> int:
        """Drop queued background loads that have not started; returns how many."""
        return self._loader.cancel_pending() if self._loader is not None else 0

    def _reserve(self, key: Key, wait: bool, background: bool = False) -> Entry:
        """Find room (evicting, compacting) and register `key` as LOADING. A background
        load evicts no guarded expert; a demand load takes guarded ones last. Lock held."""
        info = self.store.entries.get(key)
        if info is None:
            raise EdgeMoEError(f"layer {key[0]} expert {key[1]} is not in the expert store")
        need = info.length
        if need > self.capacity:
            raise BudgetError(f"{info.name} needs {need} bytes but the expert cache holds {self.capacity}")
        compacted = False
        while True:
            off = self.alloc.alloc(need)
            if off is not None:
                break
            victims = [k for k, e in self.entries.items()
                       if e.state == READY and not e.pins and not e.leases and e.guard <= self.now]
            if not victims and not background:
                victims = [k for k, e in self.entries.items() if e.state == READY and not e.pins and not e.leases]
            fit = self._victim_that_fits(victims, need) if victims else None
            if fit is not None:  # one eviction makes the hole: cheaper than moving blobs around
                self._evict(fit)
                compacted = False
                continue
            if self.alloc.free_bytes >= need and not compacted:
                self._compact()
                compacted = True
                continue
            if victims:
                self._evict(self.policy.victim(victims))
                compacted = False
                continue
            if wait and any(e.state == LOADING or e.leases for e in self.entries.values()):
                self.cond.wait()  # another thread's load or use ends, then its room may be taken
                compacted = False
                continue
            if not wait:
                raise CacheFull(f"no room for {info.name}: every cached expert is pinned or in use")
            raise BudgetError(f"no room for {info.name} in a {self.capacity}-byte cache: every cached expert "
                              "is pinned; the memory budget is too small for this access pattern")
        e = Entry(key, info, off, need)
        self.entries[key] = e
        self.peak_used = max(self.peak_used, self.used)
        self.touched = max(self.touched, off + need)
        return e

    def _fill(self, e: Entry, abort=None) -> None:
        """Read and verify a LOADING entry outside the lock, then publish it as READY. On
        failure the entry and its room are given back and the error propagates."""
        try:
            buf = self.slab.view[e.offset : e.offset + e.length]
            if e.urgent and abort is None:
                self.store.read_into(e.info, buf)
            else:  # a background read: its urgency can change while it runs
                self.store.read_into(e.info, buf, urgent=lambda: e.urgent, abort=abort)
            # "first": each expert's first read in this cache is checked, not its re-reads
            # after an eviction; "always": every read from storage is.
            if self.verify == "always" or e.key not in self.verified:
                t0 = time.perf_counter()
                self.store.verify(e.info, buf)
                with self.cond:
                    self.verify_s += time.perf_counter() - t0
                    self.verifications += 1
                    self.verify_bytes += e.info.size
                    self.verified.add(e.key)
        except BaseException:
            with self.cond:
                del self.entries[e.key]
                self.alloc.release(e.offset, e.length)
                self.cond.notify_all()
            raise
        with self.cond:
            e.state = READY
            self.policy.on_insert(e.key)
            self.cond.notify_all()

    def _victim_that_fits(self, victims: list[Key], need: int) -> Key | None:
        """The policy's pick among the victims whose room, with the free space around it,
        holds `need` bytes (None if none does, or with fit_victims off). With experts of
        mixed sizes (a bitwidth plan) the policy's overall pick may leave only fragments,
        and compaction copies up to the whole slab (measured: 17 GB moved in a 32-token run
        of a 2.3 B model), far more than re-reading one expert costs. With equal sizes every
        victim fits, so the policy's order is unchanged."""
        if not self.fit_victims:
            return None
        fits = [k for k in victims if self.alloc.hole_around(self.entries[k].offset, self.entries[k].length) >= need]
        return self.policy.victim(fits) if fits else None

    def _evict(self, key: Key) -> None:
        e = self.entries.pop(key)
        self.alloc.release(e.offset, e.length)
        self.policy.on_evict(key)
        self.evictions += 1

    def _compact(self) -> None:
        """Slide movable blobs (READY, not leased) towards offset 0, around the immovable
        ones, so the free bytes become contiguous. Lock held."""
        live = sorted(self.entries.values(), key=lambda e: e.offset)
        walls = [e.offset for e in live if e.state != READY or e.leases]
        cursor, moved = 0, 0
        for e in live:
            if e.state != READY or e.leases:
                cursor = max(cursor, e.offset + e.length)
                continue
            j = bisect.bisect_left(walls, cursor)
            limit = walls[j] if j < len(walls) else self.capacity  # the next immovable blob
            if e.offset > cursor and cursor + e.length <= limit:
                self.slab.move(cursor, e.offset, e.length)
                moved += e.length
                e.offset = cursor
            cursor = e.offset + e.length
        self.alloc.rebuild([(e.offset, e.length) for e in live])
        self.compactions += 1
        self.compact_bytes += moved

    # ----------------------------------------------------------------- shutdown

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        with self.cond:
            self.entries.clear()
        self._built.clear()
        self.slab.close()
        self.store.close()


def _views_only(obj, lo: int, hi: int, depth: int = 3) -> bool:
    """Whether every tensor reachable from obj's attributes (a few levels deep) lies in
    memory [lo, hi), and there is at least one."""
    found = []

    def walk(o, d) -> bool:
        for v in vars(o).values() if hasattr(o, "__dict__") else ():
            if isinstance(v, torch.Tensor):
                p = v.data_ptr()
                if not (lo <= p < hi) or p + v.numel() * v.element_size() > hi:
                    return False
                found.append(v)
            elif d > 0 and hasattr(v, "__dict__") and not callable(v):
                if not walk(v, d - 1):
                    return False
        return True

    return walk(obj, depth) and bool(found)


class LoadFuture:
    """A background load request: Future-like (`result`, `exception`, `done`, `cancel`,
    `cancelled`), lighter than concurrent.futures.Future (the runtime makes thousands),
    and abortable while it reads."""

    __slots__ = ("key", "priority", "guard", "state", "value", "error", "aborted", "_loader")
    PENDING, RUNNING, DONE, CANCELLED = range(4)

    def __init__(self, key: Key, priority: int, guard: int, loader: "_Loader"):
        self.key, self.priority, self.guard = key, priority, guard
        self.state = self.PENDING
        self.value = None
        self.error: BaseException | None = None
        self.aborted = False
        self._loader = loader

    def cancel(self) -> bool:
        """Cancel it if it has not started; True if it is (now) cancelled."""
        with self._loader.lock:
            if self.state == self.PENDING:
                self.state = self.CANCELLED
                self._loader.done.notify_all()
            return self.state == self.CANCELLED

    def abort(self) -> bool:
        """Cancel it if queued, else ask the read to stop at its next chunk (ReadAborted).
        True if it was cancelled before it started."""
        self.aborted = True
        return self.cancel()

    def done(self) -> bool:
        return self.state >= self.DONE

    def cancelled(self) -> bool:
        return self.state == self.CANCELLED

    def running(self) -> bool:
        return self.state == self.RUNNING

    def _wait(self, timeout: float | None) -> None:
        if self.state >= self.DONE:
            return
        with self._loader.lock:
            if not self._loader.done.wait_for(lambda: self.state >= self.DONE, timeout):
                raise TimeoutError(f"background load of layer {self.key[0]} expert {self.key[1]} "
                                   f"did not finish within {timeout} s")

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        if self.state == self.CANCELLED:
            raise CancelledError()
        return self.error

    def result(self, timeout: float | None = None):
        if self.exception(timeout) is not None:
            raise self.error
        return self.value


class _Loader:
    """Background threads (one by default) running cache loads in priority order (then
    in submission order). Requests submitted together cost one wake-up."""

    def __init__(self, cache: ExpertCache, threads: int = 1):
        self.cache = cache
        self.heap: list = []
        self.seq = itertools.count()
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)  # work queued
        self.done = threading.Condition(self.lock)  # a request finished or was cancelled
        self.closing = False
        self.threads = [threading.Thread(target=self._run, name=f"edgemoe-loader-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, key: Key, priority: int, guard: int = -1) -> LoadFuture:
        return self.submit_many([(key, priority, guard)])[0]

    def submit_many(self, items) -> list[LoadFuture]:
        """items: (key, priority, guard) triples."""
        reqs = [LoadFuture(key, priority, guard, self) for key, priority, guard in items]
        if reqs:
            with self.lock:
                for r in reqs:
                    heapq.heappush(self.heap, (r.priority, next(self.seq), r))
                self.ready.notify(len(reqs))
        return reqs

    def cancel_pending(self) -> int:
        n = 0
        with self.lock:
            for _, _, r in self.heap:
                if r.state == LoadFuture.PENDING:
                    r.state = LoadFuture.CANCELLED
                    n += 1
            self.heap.clear()
            self.done.notify_all()
        return n

    def _next(self) -> LoadFuture | None:
        with self.lock:
            while True:
                while self.heap:
                    r = heapq.heappop(self.heap)[2]
                    if r.state == LoadFuture.PENDING:
                        r.state = LoadFuture.RUNNING
                        return r
                if self.closing:
                    return None
                self.ready.wait()

    def _run(self) -> None:
        while True:
            r = self._next()
            if r is None:  # shutdown
                return
            try:
                urgent = r.priority <= DEMAND
                r.value = self.cache.load(r.key, guard=r.guard, urgent=urgent,
                                          abort=None if urgent else (lambda: r.aborted))
            except BaseException as e:  # delivered to whoever asks the request
                r.error = e
            with self.lock:
                r.state = LoadFuture.DONE
                self.done.notify_all()

    def close(self) -> None:
        self.cancel_pending()
        with self.lock:
            self.closing = True
            self.ready.notify_all()
        for t in self.threads:
            t.join(timeout=30)
