"""The memory the expert cache holds its blobs in: one page-aligned slab and a
variable-size allocator over its byte ranges.

The slab is a single anonymous mapping sized from the budget at start-up, backed by
transparent huge pages where the kernel gives them (`_ask_huge_pages`); loads read
straight into it (O_DIRECT `pread`) and experts compute from zero-copy views of it, so
nothing is allocated per load. Pages count in RSS once first written, and never beyond
the mapping, so the cache never holds more than its capacity.

Blobs may differ in size (experts of one model can have different formats), so the
slab is managed as byte ranges in 4 KiB units: best fit over a sorted, coalesced free
list. Neither class locks: the cache calls them under its own lock.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap

import torch

from ..store.manifest import ALIGN


class Slab:
    """Page-aligned memory for expert blobs (an anonymous mapping)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._mm = mmap.mmap(-1, max(capacity, ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.huge_pages = _ask_huge_pages(self._mm)
        self.view = memoryview(self._mm)  # for preadv
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)  # (capacity,) for zero-copy views
        self.address = self.tensor.data_ptr()  # page-aligned: what O_DIRECT needs

    def move(self, dst: int, src: int, n: int) -> None:
        """memmove inside the slab (ranges may overlap)."""
        ctypes.memmove(self.address + dst, self.address + src, n)

    def close(self) -> None:
        """Give the mapping back (or leave it to the GC while views of it are alive)."""
        try:
            self.view.release()
        except BufferError:
            pass
        self.tensor = None
        try:
            self._mm.close()
        except BufferError:  # views of a blob are still alive somewhere; the GC frees the mapping later
            pass


def _ask_huge_pages(mm: mmap.mmap) -> bool:
    """Ask for transparent huge pages (2 MB) under the slab; True if the kernel took the
    advice (it still decides per page: THP "never" or no free 2 MB frames give 4 KiB).

    O_DIRECT reads DMA into the slab's pages. Under a tight memory cgroup, 4 KiB pages come
    back from reclaim scattered, each read becomes thousands of one-page segments and many
    small device requests: on these VMs the expert reads ran at 1.5 GB/s instead of 2.9-3.7
    with huge pages, and decode 2.3x slower (edgemoe_lab/results/huge_pages.md)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:  # not Linux
        return False
    try:
        mm.madvise(advice)
    except OSError:  # a kernel built without THP
        return False
    return True


class SlabAllocator:
    """Best-fit allocation of byte ranges in [0, capacity); sizes are multiples of ALIGN."""

    def __init__(self, capacity: int):
        self.capacity = capacity - capacity % ALIGN
        self.free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # (offset, size) by offset
        self.free_bytes = self.capacity

    def alloc(self, size: int) -> int | None:
        """The offset of a free range of `size` bytes (the smallest that fits), or None."""
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
        """Give a range back to the free list."""
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


def views_only(obj, lo: int, hi: int, depth: int = 3) -> bool:
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
