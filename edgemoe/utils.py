"""Small helpers shared by the CLI and the runtime: byte sizes and their formatting."""

from __future__ import annotations

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
