"""The machine under the benchmark: page-cache drops, CPU load, waiting for quiet, disk
bandwidth and a one-line description."""

from __future__ import annotations

import mmap
import os
import platform
import time
from pathlib import Path


def drop_caches() -> bool:
    """Write back dirty pages and drop the page cache (root only). False if not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_busy(seconds: float = 3.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat)."""
    def sample():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit_s: float, threshold: float = 0.15, sample_s: float = 3.0, log=None) -> dict:
    """Wait, up to `limit_s`, until other processes leave the CPUs idle (busy fraction
    below `threshold` over `sample_s`). Returns what was seen."""
    t0 = time.monotonic()
    busy = cpu_busy(sample_s)
    while busy > threshold and time.monotonic() - t0 < limit_s:
        if log:
            log(f"waiting for idle CPUs: {100 * busy:.0f}% busy")
        busy = cpu_busy(sample_s)
    return {"waited_s": round(time.monotonic() - t0, 1), "cpu_busy": round(busy, 3), "quiet": busy <= threshold}


def quiet_repeat(limit_s: float, rep: int) -> dict:
    """Before repeat `rep` (0-based) of a lab experiment: wait up to `limit_s` for idle
    CPUs (busy under 10 % over 5 s), print how long it took, and return the record the
    experiments keep ({"waited_s", "cpu_busy_before"})."""
    q = wait_quiet(limit_s, threshold=0.1, sample_s=5.0)
    waited, busy = q["waited_s"], q["cpu_busy"]
    print(f"repeat {rep + 1}: waited {waited:.0f} s for idle CPUs (busy {100 * busy:.0f}%)", flush=True)
    return {"waited_s": waited, "cpu_busy_before": busy}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def mem_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def describe() -> dict:
    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "neon", "asimd") if f in flags]
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "simd": simd,
        "memory_bytes": mem_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def disk_read_bandwidth(path: Path, max_bytes: int = 1 << 30, chunk: int = 4 << 20) -> dict:
    """Sequential O_DIRECT read of up to `max_bytes` of `path` in `chunk`-byte reads on one
    thread (the way edgemoe reads an expert). Falls back to buffered reads after a page
    cache drop where O_DIRECT is refused. Returns bytes, seconds, bytes/s and the mode."""
    size = min(os.path.getsize(path), max_bytes)
    size -= size % 4096
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    def read_all(fd: int) -> tuple[int, float]:
        done = 0
        t0 = time.perf_counter()
        while done < size:
            n = os.preadv(fd, [memoryview(buf)[: min(chunk, size - done)]], done)
            if n <= 0:
                break
            done += n
        return done, time.perf_counter() - t0

    try:
        mode = "direct"
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            try:
                done, dt = read_all(fd)
            finally:
                os.close(fd)
        except OSError:  # the file system refuses O_DIRECT (e.g. tmpfs): cold buffered reads instead
            drop_caches()
            mode = "buffered-cold"
            fd = os.open(path, os.O_RDONLY)
            try:
                done, dt = read_all(fd)
            finally:
                os.close(fd)
    finally:
        buf.close()
    return {"bytes": done, "seconds": round(dt, 4), "bytes_per_s": round(done / dt) if dt > 0 else 0, "mode": mode,
            "chunk_bytes": chunk}
