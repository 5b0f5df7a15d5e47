"""Small helpers shared by the CLI and the runtime: byte sizes and their formatting."""

from __future__ import annotations

import math
import re

from .errors import EdgeMoEError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(value: str | int | float) -> int:
    """'800MB' -> 800_000_000, '1.5GiB' -> 1610612736, '12345' -> 12345 (decimal units
    are powers of 1000, binary ones powers of 1024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise EdgeMoEError(f"size must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise EdgeMoEError(f"cannot parse size {value!r} (examples: 800MB, 1.5GB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    kb = _proc_status_kb("VmRSS")
    return kb * 1024 if kb is not None else 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_large_frees_to_os(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of `threshold` bytes and more with mmap, so that
    freeing them returns the memory to the OS at once. By default glibc raises that
    threshold (up to 32 MB) after the first large free, and later blocks below it are
    kept in the heap, and in RSS, after they are freed: a converter streaming 10 MB
    tensors then looks like it holds 70 MB more than it does. Process-wide; returns
    False where the C library has no mallopt."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


MALLOC_KEEP_MAX = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit


def keep_frees_for_reuse(limit: int) -> bool:
    """Have glibc keep freed blocks of up to `limit` bytes (at most MALLOC_KEEP_MAX) in
    the heap for the next allocation, mmap only larger ones, and give the heap's free top
    back to the OS only past `limit`: the setting for generation, whose every prefill
    chunk allocates its activations anew. Served by fresh mmaps (return_large_frees_to_os)
    they page-fault on every chunk: the bench model prefilled 1.44x faster kept in the heap
    (edgemoe_lab/results/malloc_reuse.md). What stays is at most about `limit`, which
    the memory budget reserves as workspace. Process-wide; False without mallopt."""
    import ctypes

    limit = max(1 << 20, min(int(limit), MALLOC_KEEP_MAX))
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):
        return False


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (for cleaning up what dead runs left behind)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def save_npz_atomic(path, arrays: dict) -> None:
    """Write numpy arrays as a compressed .npz, atomically (a temporary sibling, then a
    rename), so that a reader never sees half a file."""
    import io
    import os
    from pathlib import Path

    import numpy as np

    path = Path(path)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


class NLLSums:
    """Running sums of per-token negative log-likelihoods over batches, as
    evaluate.perplexity and seq2seq.pair_loss report them."""

    def __init__(self, per_window: bool = False):
        self.total, self.count = 0.0, 0
        self.window_nll: list[float] | None = [] if per_window else None

    def add(self, nll) -> None:
        """nll: (B, T) tensor of one batch's per-token NLLs."""
        self.total += float(nll.sum())
        self.count += nll.numel()
        if self.window_nll is not None:
            self.window_nll += nll.mean(dim=1).tolist()

    def result(self) -> dict:
        """{"nll": mean per token, "ppl", "tokens"}, plus "window_nll" (each row's mean)
        when asked for."""
        mean = self.total / self.count
        out = {"nll": mean, "ppl": math.exp(mean), "tokens": self.count}
        if self.window_nll is not None:
            out["window_nll"] = self.window_nll
        return out
