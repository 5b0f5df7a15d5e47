"""Background loads: a small pool of threads that runs cache loads in priority order,
and the Future-like requests it hands out.

A request is queued with a priority (lower runs first: DEMAND before PREFETCH) and
returns a `LoadFuture` that carries the load's result or error to whoever asks it. A
request that is no longer wanted can be cancelled while queued and aborted while
reading (between chunks of a throttled read). The loader knows nothing of the cache: it
calls the `load` function it was given, which does the work and the locking.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import CancelledError
from typing import Callable

from .policies import Key

READAHEAD, DEMAND, PREFETCH = -1, 0, 10  # loader priorities: lower runs first; up to DEMAND urgent

# load(key, guard=, priority=, abort=) -> True if it read the expert, False if it was cached.
LoadFn = Callable[..., bool]


class LoadFuture:
    """A background load request: Future-like (`result`, `exception`, `done`, `cancel`,
    `cancelled`), lighter than concurrent.futures.Future (the runtime makes thousands),
    and abortable while it reads."""

    __slots__ = ("key", "priority", "guard", "state", "value", "error", "aborted", "_loader")
    PENDING, RUNNING, DONE, CANCELLED = range(4)

    def __init__(self, key: Key, priority: int, guard: int, loader: "Loader"):
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
        """The load's error (None if it succeeded), waiting for it to end."""
        self._wait(timeout)
        if self.state == self.CANCELLED:
            raise CancelledError()
        return self.error

    def result(self, timeout: float | None = None):
        """True if it read the expert, False if it was cached already; raises its error."""
        if self.exception(timeout) is not None:
            raise self.error
        return self.value


class Loader:
    """Background threads (one by default) running loads in priority order (then in
    submission order). Requests submitted together cost one wake-up."""

    def __init__(self, load: LoadFn, threads: int = 1):
        self.load = load
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

    def submit_many(self, items) -> list[LoadFuture]:
        """Queue (key, priority, guard) triples; returns their requests."""
        reqs = [LoadFuture(key, priority, guard, self) for key, priority, guard in items]
        if reqs:
            with self.lock:
                for r in reqs:
                    heapq.heappush(self.heap, (r.priority, next(self.seq), r))
                self.ready.notify(len(reqs))
        return reqs

    def cancel_pending(self) -> int:
        """Cancel every queued request that has not started; returns how many."""
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
                r.value = self.load(r.key, guard=r.guard, priority=r.priority,
                                    abort=None if urgent else (lambda: r.aborted))
            except BaseException as e:  # delivered to whoever asks the request
                r.error = e
            with self.lock:
                r.state = LoadFuture.DONE
                self.done.notify_all()

    def close(self) -> None:
        """Cancel what is queued, let running loads end, stop the threads."""
        self.cancel_pending()
        with self.lock:
            self.closing = True
            self.ready.notify_all()
        for t in self.threads:
            t.join(timeout=30)
