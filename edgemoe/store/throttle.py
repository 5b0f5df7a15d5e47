"""A bandwidth limit on read bandwidth, to emulate slower storage on a fast disk.

`--read-throttle 90MB/s` makes the expert store read no faster than a Raspberry Pi's SD
card, `550MB/s` like a SATA SSD on a Jetson. Every expert read (on demand, prefetch, or
the IO-FREE load) takes its bytes from one bucket shared by all threads, so concurrent
readers split the bandwidth the way they would on the real device. Reads go through in
chunks; before each chunk the reader waits until the bucket holds the chunk's bytes.

Demand reads (the compute thread is waiting for them) go first: a background chunk
reserves the device only once it is idle, so a prefetch in progress yields at its next
chunk boundary. There is no burst: storage that was idle while the model computed does
not read faster afterwards, and every chunk takes its bytes / rate.
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
    """Bytes per second shared by all threads, modelled as one device that reads one
    request at a time: `take(n, urgent)` reserves the next n / rate seconds of the device
    and sleeps until they have passed. Idle time earns no credit (no burst), as on a real
    SD card. A background (non-urgent) request waits until the device is free before it
    reserves, so a demand read that arrives meanwhile goes first."""

    def __init__(self, rate: int):
        self.rate = float(rate)
        self.free_at = time.monotonic()  # when the device finishes the requests reserved so far
        self.cond = threading.Condition()
        self.wait_s = 0.0  # total time readers spent waiting for bytes

    def take(self, n: int, urgent: bool = True) -> float:
        """Wait until `n` bytes have had their time on the device; returns the seconds waited."""
        t0 = time.monotonic()
        with self.cond:
            while not urgent and self.free_at > time.monotonic():
                self.cond.wait(self.free_at - time.monotonic())
            start = max(time.monotonic(), self.free_at)
            self.free_at = end = start + n / self.rate
            self.cond.notify_all()
        time.sleep(max(0.0, end - time.monotonic()))
        waited = time.monotonic() - t0
        with self.cond:
            self.wait_s += waited
        return waited
