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

Threads. All bookkeeping happens under one condition variable; reads and checksum
verification run outside it, so loads in different threads overlap. `acquire` (the
on-demand path) reads a missing expert in the calling thread, so it never queues behind
background requests; `submit` queues a load for the background loader thread in priority
order and returns a Future that carries any error to whoever waits on it.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import mmap
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from ..errors import BudgetError, EdgeMoEError
from ..models.moe import Expert
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


class ExpertCache:
    """Experts of one store held in a slab of `capacity` bytes under an eviction policy."""

    def __init__(self, store: ExpertStore, capacity: int, policy: Policy, act: str, dtype: torch.dtype,
                 verify: str = "first"):
        if verify not in ("first", "always"):
            raise EdgeMoEError(f"verify must be 'first' or 'always', got {verify!r}")
        self.store, self.policy, self.act, self.dtype, self.verify = store, policy, act, dtype, verify
        self.capacity = capacity - capacity % ALIGN
        self.slab = Slab(self.capacity)
        self.alloc = SlabAllocator(self.capacity)
        self.entries: dict[Key, Entry] = {}
        self.cond = threading.Condition()
        self.verified: set[Key] = set()
        self.touched = 0  # highest slab byte ever written: those pages are in RSS
        self._loader: _Loader | None = None
        self.reset_stats()

    # ----------------------------------------------------------------- statistics

    def reset_stats(self) -> None:
        with self.cond:
            self.hits = self.misses = self.evictions = self.compactions = self.compact_bytes = 0
            self.background_loads = self.waits = 0
            self.stall_s = self.verify_s = 0.0
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
                "stall_s": round(self.stall_s, 6),
                "evictions": self.evictions,
                "compactions": self.compactions,
                "compact_bytes": self.compact_bytes,
                "background_loads": self.background_loads,
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
                # Being read by another thread (a prefetch): waiting beats reading it twice.
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
        """The callable expert for a leased entry, built from views into the slab. Built
        anew for every lease (a few microseconds): a cached one would go stale when its
        blob moves, and a format that converts on load (fp16 storage computed in fp32)
        would keep its converted copy outside the slab and the budget."""
        blob = self.slab.tensor[entry.offset : entry.offset + entry.length]
        return self.store.expert(entry.info, blob, self.act, self.dtype)

    # ----------------------------------------------------------------- loads

    def load(self, key: Key, wait: bool = False) -> bool:
        """Make `key` cached without leasing it (what background loads do). Returns False
        if it was already there. Without `wait` it never blocks on other loads and raises
        CacheFull when only protected experts could make room."""
        with self.cond:
            if key in self.entries:
                return False
            e = self._reserve(key, wait=wait)
            self.background_loads += 1
        self._fill(e)
        return True

    def load_all(self) -> None:
        """Read every expert of the store (IO-FREE: the capacity must hold them all)."""
        for key in sorted(self.store.entries, key=lambda k: self.store.entries[k].offset):
            self.load(key, wait=True)

    def submit(self, key: Key, priority: int = PREFETCH) -> Future:
        """Queue a background load; lower priorities run first (DEMAND before PREFETCH).
        The Future's result is True if it read the expert, False if it was cached already."""
        with self.cond:
            if self._loader is None:
                self._loader = _Loader(self)
        return self._loader.submit(key, priority)

    def cancel_pending(self) -> int:
        """Drop queued background loads that have not started; returns how many."""
        return self._loader.cancel_pending() if self._loader is not None else 0

    def _reserve(self, key: Key, wait: bool) -> Entry:
        """Find room (evicting, compacting) and register `key` as LOADING. Lock held."""
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
            if self.alloc.free_bytes >= need and not compacted:
                self._compact()
                compacted = True
                continue
            victims = [k for k, e in self.entries.items() if e.state == READY and not e.pins and not e.leases]
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

    def _fill(self, e: Entry) -> None:
        """Read and verify a LOADING entry outside the lock, then publish it as READY. On
        failure the entry and its room are given back and the error propagates."""
        try:
            buf = self.slab.view[e.offset : e.offset + e.length]
            self.store.read_into(e.info, buf)
            if self.verify == "always" or e.key not in self.verified:
                t0 = time.perf_counter()
                self.store.verify(e.info, buf)
                with self.cond:
                    self.verify_s += time.perf_counter() - t0
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
        self.slab.close()
        self.store.close()


class _Loader:
    """One background thread running cache loads from a priority queue."""

    def __init__(self, cache: ExpertCache):
        self.cache = cache
        self.q: queue.PriorityQueue = queue.PriorityQueue()
        self.seq = itertools.count()
        self.thread = threading.Thread(target=self._run, name="edgemoe-loader", daemon=True)
        self.thread.start()

    def submit(self, key: Key, priority: int) -> Future:
        fut: Future = Future()
        self.q.put((priority, next(self.seq), key, fut))
        return fut

    def cancel_pending(self) -> int:
        n = 0
        while True:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                return n
            if item[3] is not None and item[3].cancel():
                n += 1

    def _run(self) -> None:
        while True:
            _, _, key, fut = self.q.get()
            if fut is None:  # shutdown
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self.cache.load(key))
            except BaseException as e:  # delivered to whoever waits on the Future
                fut.set_exception(e)

    def close(self) -> None:
        self.cancel_pending()
        self.q.put((-1, -1, None, None))
        self.thread.join(timeout=30)
