"""A token-bucket limit on read bandwidth, to emulate slower storage on a fast disk.

`--read-throttle 90MB/s` makes the expert store read no faster than a Raspberry Pi's SD
card, `550MB/s` like a SATA SSD on a Jetson. Every expert read (on demand, prefetch, or
the IO-FREE load) takes its bytes from one bucket shared by all threads, so concurrent
readers split the bandwidth the way they would on the real device. Reads go through in
chunks; before each chunk the reader waits until the bucket holds the chunk's bytes.

Demand reads (the compute thread is waiting for them) go first: while one waits, a
background chunk does not take bytes, so a prefetch in progress yields at its next chunk
boundary. The bucket holds at most one chunk (no burst): storage that was idle while
the model computed does not read faster afterwards.
"""

from __future__ import annotations

import re
import threading
import time

from ..errors import EdgeMoEError

CHUNK = 64 * 1024  # bytes per throttled read request (a multiple of 4 KiB, for O_DIRECT)

_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*(?:/\s*s)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_rate(value: str | int | float) -> int:
    """'90MB/s' -> 90_000_000 bytes per second ('550MB/s', '1.5GB/s', '64MiB/s', '1000000')."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = int(value)
    else:
        m = _RATE.fullmatch(str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise EdgeMoEError(f"cannot parse read rate {value!r} (examples: 90MB/s, 550MB/s, 1.5GB/s, 64MiB/s)")
        rate = int(float(m.group(1)) * _UNITS[unit])
    if rate < 4096:
        raise EdgeMoEError(f"read rate {value!r} is below 4 KB/s")
    return rate


class TokenBucket:
    """Bytes per second shared by all threads; `take(n, urgent)` blocks until n bytes
    may be read. Urgent (demand) takers are served before the others."""

    def __init__(self, rate: int, burst: int = CHUNK):
        self.rate = float(rate)
        self.burst = float(max(burst, CHUNK))
        self.tokens = self.burst
        self.last = time.monotonic()
        self.cond = threading.Condition()
        self.urgent_waiting = 0
        self.wait_s = 0.0  # total time readers spent waiting for bytes

    def take(self, n: int, urgent: bool = True) -> float:
        """Wait until `n` (at most one burst) bytes are available and take them; returns
        the seconds waited."""
        n = min(float(n), self.burst)
        t0 = time.monotonic()
        with self.cond:
            if urgent:
                self.urgent_waiting += 1
            try:
                while True:
                    now = time.monotonic()
                    self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
                    self.last = now
                    if urgent or not self.urgent_waiting:
                        if self.tokens >= n:
                            self.tokens -= n
                            break
                        self.cond.wait((n - self.tokens) / self.rate)
                    else:
                        self.cond.wait(0.05)  # an urgent reader is waiting: it is woken first
            finally:
                if urgent:
                    self.urgent_waiting -= 1
                    self.cond.notify_all()
            waited = time.monotonic() - t0
            self.wait_s += waited
        return waited
