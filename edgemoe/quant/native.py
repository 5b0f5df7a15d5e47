"""The C kernel library (csrc/qmm.c): compiled on first use, cached, loaded with ctypes.

Owns the build (compiler, flag sets, cache directory keyed by the source, the flags, the
compiler and the CPU), the loading and the ctypes signatures of the exported functions,
and the switch that turns the library off. It does not call the kernels: kernels.py,
quantize.py and mxfp4.py do, each falling back to torch when `get()` returns None.

A leaf of edgemoe.quant: it imports nothing from edgemoe.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "qmm.c"
ABI = 3  # must match EM_ABI in qmm.c

# dtype codes the C functions take for their float arguments
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class Library:
    """The loaded C library, or the reason it could not be built."""

    def __init__(self):
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self.path: Path | None = None
        self.disabled = False
        self._lock = threading.Lock()
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if self.disabled:
            return None
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self.path = build()
                        self.lib = load(self.path)
                    except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
                        self.error = " ".join(str(e).split())[:600] or repr(e)
                        log.warning(
                            "edgemoe: could not build the quantized-matmul C kernel (%s); "
                            "quantized experts fall back to torch, 5-10x slower",
                            self.error,
                        )
                    self._tried = True
        return self.lib


library = Library()


def get() -> ctypes.CDLL | None:
    """The C library (building it on first call), or None when it is off or unavailable."""
    return library.get()


def native_available() -> bool:
    """Whether the C kernel is built and loaded (building it on first call)."""
    return library.get() is not None


def native_error() -> str | None:
    """Why the C kernel is unavailable, if it is."""
    library.get()
    return library.error


def use_native(enabled: bool) -> None:
    """Turn the C kernel off (tests of the fallback, comparisons) or back on."""
    library.disabled = not enabled


def _cache_dir() -> Path:
    for base in (Path.home() / ".cache" / "edgemoe" / "kernels", Path(tempfile.gettempdir()) / "edgemoe-kernels"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base
        except OSError:
            continue
    raise RuntimeError("no writable cache directory for the compiled kernel")


def cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> str:
    for cc in ("cc", "gcc", "clang"):
        path = shutil.which(cc)
        if path:
            return path
    raise RuntimeError("no C compiler found (install gcc)")


# Tried in order: the first that compiles wins. Without OpenMP the kernel runs on one thread.
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)


def build(flag_sets=None) -> Path:
    """Compile qmm.c (or find it in the cache) with the first flag set that works."""
    cc = _compiler()
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    out_dir = _cache_dir()
    errors = []
    for flags in flag_sets or FLAG_SETS:
        key = hashlib.sha256(src + repr((flags, version, cpu_id(), ABI)).encode()).hexdigest()[:16]
        lib = out_dir / f"qmm-{key}.so"
        if lib.exists():
            return lib
        tmp = out_dir / f".qmm-{key}-{os.getpid()}.so"
        cmd = [cc, *flags, "-std=c11", "-fPIC", "-shared", "-o", str(tmp), str(SOURCE), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode == 0:
            os.replace(tmp, lib)  # atomic: concurrent builders never see a partial file
            return lib
        tmp.unlink(missing_ok=True)
        errors.append(f"[{' '.join(flags)}] {' '.join(res.stderr.split())[-300:]}")
    raise RuntimeError("C kernel failed to compile: " + " | ".join(errors))


def load(path: Path) -> ctypes.CDLL:
    """Load a built library, check its ABI and declare the exported functions."""
    lib = ctypes.CDLL(str(path))
    if lib.em_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.em_abi()}, expected {ABI}")
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.em_qmm.argtypes = [ptr, i32, i64, i64, ptr, ptr, i32, i32, ptr, i64, i64, i32, i64, ptr, i32, i32]
    lib.em_qmm.restype = i32
    lib.em_dequant.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, i32, i64, ptr, i32, i32]
    lib.em_dequant.restype = i32
    lib.em_quantize.argtypes = [ptr, i64, i64, i64, i32, i64, i32, i32, ptr, ptr, ptr, i32]
    lib.em_quantize.restype = i32
    lib.em_mxfp4_mm.argtypes = [ptr, i32, i64, i64, ptr, ptr, i64, i64, ptr, i32, i32]
    lib.em_mxfp4_mm.restype = i32
    lib.em_mxfp4_dequant.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, i32, i32]
    lib.em_mxfp4_dequant.restype = i32
    return lib
