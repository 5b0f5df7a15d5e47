"""Matmul on quantized weights, CPU.

Paths, picked per call by batch size (rows of x):

* 2/3/4-bit group-wise (`QMatrix`): a small C kernel (csrc/qmm.c) that computes straight
  from the packed codes with int16 activations; above PACKED_MAX_BATCH rows the weights
  are instead dequantized, a chunk of rows at a time, into a reused fp32 buffer for an MKL
  matmul.
* int8 per-channel (`Int8Matrix`, also behind `Int8Linear` for non-expert weights), stored
  in the layout torch's `_weight_int8pack_mm` reads: the same C kernel (3-6x faster than
  `_weight_int8pack_mm` on this machine) up to INT8_NATIVE_MAX_BATCH rows, then dequantize
  + matmul; `_weight_int8pack_mm` only when the C kernel is missing or K is not a multiple
  of 64, and only for tiny batches (its cost grows linearly with the batch).

Without a C compiler everything still works: group-wise weights go through torch
dequantize-then-matmul (correct, 5-10x slower at batch 1), int8 through torch's kernels,
and a warning says why once.

The C kernel is compiled on first use with the system compiler into a cache directory
keyed by the source, the flags, the compiler and the CPU; a compile takes a few seconds.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cpu import linear
from .quantize import QuantSpec

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "qmm.c"
ABI = 3  # must match EM_ABI in qmm.c

# Batch sizes above these use dequantize + matmul instead of the packed kernels (crossovers
# measured in bench/results/quant_kernels.md). CPUs with bf16 matrix units (AMX,
# AVX512-BF16) run the dequantized matmul in bf16 several times faster than fp32, so
# there the crossover comes much earlier.
PACKED_MAX_BATCH = 64
INT8_NATIVE_MAX_BATCH = 64
PACKED_MAX_BATCH_BF16_CPU = 16
# torch's _weight_int8pack_mm, only for K a multiple of 64 (bf16 with K = 72 and batch >= 4
# segfaults in torch 2.11 on an AMX Xeon): on AVX-512 CPUs it beats the C kernel up to
# batch 64; on AVX2 ones it is 3-6x slower, so there it only serves when the C kernel is
# missing, for tiny batches (its cost grows linearly with the batch).
INT8PACK_MAX_BATCH = 4
INT8PACK_MAX_BATCH_AVX512 = 64
DEQUANT_ROWS = 1024  # weight rows dequantized per chunk on the large-batch path

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}




# ----------------------------------------------------------------------------- build


class _Native:
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
                        self.path = _build()
                        self.lib = _load(self.path)
                    except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
                        self.error = " ".join(str(e).split())[:600] or repr(e)
                        log.warning(
                            "edgemoe: could not build the quantized-matmul C kernel (%s); "
                            "quantized experts fall back to torch, 5-10x slower",
                            self.error,
                        )
                    self._tried = True
        return self.lib


_native = _Native()


def native_available() -> bool:
    """Whether the C kernel is built and loaded (building it on first call)."""
    return _native.get() is not None


def native_error() -> str | None:
    """Why the C kernel is unavailable, if it is."""
    _native.get()
    return _native.error


def use_native(enabled: bool) -> None:
    """Turn the C kernel off (tests of the fallback, comparisons) or back on."""
    _native.disabled = not enabled


def _cache_dir() -> Path:
    for base in (Path.home() / ".cache" / "edgemoe" / "kernels", Path(tempfile.gettempdir()) / "edgemoe-kernels"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if os.access(base, os.W_OK):
                return base
        except OSError:
            continue
    raise RuntimeError("no writable cache directory for the compiled kernel")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's feature flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _has_bf16_matmul() -> bool:
    try:
        flags = _cpu_id().split()
    except Exception:  # noqa: BLE001
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# dtype of the large-batch dequantize + matmul path
MATMUL_DTYPE = torch.bfloat16 if _has_bf16_matmul() else torch.float32


def packed_max_batch() -> int:
    """Largest batch that the packed kernels take on this CPU."""
    return PACKED_MAX_BATCH_BF16_CPU if MATMUL_DTYPE == torch.bfloat16 else PACKED_MAX_BATCH


# torch's int8pack kernel has an AVX-512 implementation that beats ours there.
INT8PACK_PREFERRED = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _compiler() -> str:
    for cc in ("cc", "gcc", "clang"):
        path = shutil.which(cc)
        if path:
            return path
    raise RuntimeError("no C compiler found (install gcc)")


# Tried in order: the first that compiles wins. Without OpenMP the kernel runs on one thread.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)


def _build(flag_sets=None) -> Path:
    """Compile qmm.c (or find it in the cache) with the first flag set that works."""
    cc = _compiler()
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    out_dir = _cache_dir()
    errors = []
    for flags in flag_sets or _FLAG_SETS:
        key = hashlib.sha256(src + repr((flags, version, _cpu_id(), ABI)).encode()).hexdigest()[:16]
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


def _load(path: Path) -> ctypes.CDLL:
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


# ----------------------------------------------------------------------------- 2/3/4-bit


@dataclass
class QMatrix:
    """A group-wise quantized (N, K) weight held as (views of) its packed tensors."""

    packed: torch.Tensor  # (N, Kp * bits / 8) uint8
    scale: torch.Tensor  # (N, Kp / G) fp16
    zero: torch.Tensor | None  # (N, Kp / G) fp16, asymmetric only
    spec: QuantSpec
    k: int  # true input size (x has k columns)

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def kp(self) -> int:
        return self.spec.padded(self.k)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + (self.zero.nbytes if self.zero is not None else 0)


def qmm(x: torch.Tensor, w: QMatrix, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(w)^T -> (M, N) in out_dtype (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    lib = _native.get()
    if lib is None:
        return _dequant_matmul_torch(x, w).to(out_dtype)
    if x.shape[0] > packed_max_batch():
        return _dequant_matmul_native(lib, x, w).to(out_dtype)
    return qmm_packed(x, w, out_dtype, lib)


def qmm_packed(x: torch.Tensor, w: QMatrix, out_dtype: torch.dtype | None = None, lib=None) -> torch.Tensor:
    """The packed C kernel at any batch size (the dispatcher's small-batch path)."""
    lib = lib or _native.get()
    if lib is None:
        raise RuntimeError(f"C kernel unavailable: {_native.error}")
    out_dtype = out_dtype or x.dtype
    if x.dtype not in _DTYPES:
        x = x.float()
    x = x.contiguous()
    m, k = x.shape
    if k != w.k:
        raise ValueError(f"x has {k} columns, weight expects {w.k}")
    if w.spec.bits not in (2, 3, 4):  # the C kernel reads 8-bit codes as signed int8 (Int8Matrix)
        raise ValueError(f"packed group-wise kernel takes 2/3/4-bit codes, not {w.spec.bits}")
    ydt = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch.empty(m, w.n, dtype=ydt)  # (M, N)
    rc = lib.em_qmm(
        x.data_ptr(), _DTYPES[x.dtype], m, k,
        w.packed.data_ptr(), w.scale.data_ptr(), _DTYPES[torch.float16], 0,
        w.zero.data_ptr() if w.zero is not None else None,
        w.n, w.kp, w.spec.bits, w.spec.group,
        y.data_ptr(), _DTYPES[ydt], torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"em_qmm failed with code {rc}")
    return y if ydt == out_dtype else y.to(out_dtype)


def quantize_native(w: torch.Tensor, spec: QuantSpec, search: bool):
    """The C version of quantize.quantize (same algorithm, ~50x faster), or None when the
    kernel is not built. Returns codes (N, Kp) uint8, scale and zero (N, Kp/G) fp16."""
    lib = _native.get()
    if lib is None:
        return None
    w = w.detach().float().contiguous()
    n, k = w.shape
    kp, ng = spec.padded(k), spec.groups(k)
    q = torch.empty(n, kp, dtype=torch.uint8)
    scale = torch.empty(n, ng, dtype=torch.float16)
    zero = torch.empty(n, ng, dtype=torch.float16) if spec.asym else None
    rc = lib.em_quantize(
        w.data_ptr(), n, k, kp, spec.bits, spec.group, int(spec.asym), int(search),
        q.data_ptr(), scale.data_ptr(), zero.data_ptr() if zero is not None else None, torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"em_quantize failed with code {rc}")
    return q, scale, zero


def dequant_rows(w: QMatrix, n0: int, n1: int, dtype: torch.dtype = torch.float32, out=None) -> torch.Tensor:
    """Rows [n0, n1) of the dequantized weight, (n1 - n0, K), with the C kernel if built."""
    lib = _native.get()
    if lib is None or dtype not in (torch.float32, torch.bfloat16):
        return _dequant_torch(w, n0, n1).to(dtype)
    out = torch.empty(n1 - n0, w.k, dtype=dtype) if out is None else out
    rc = lib.em_dequant(
        w.packed.data_ptr(), w.scale.data_ptr(), w.zero.data_ptr() if w.zero is not None else None,
        n0, n1, w.k, w.kp, w.spec.bits, w.spec.group, out.data_ptr(), _DTYPES[dtype], torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"em_dequant failed with code {rc}")
    return out


def _dequant_matmul_native(lib, x: torch.Tensor, w: QMatrix) -> torch.Tensor:
    """Large batches: dequantize DEQUANT_ROWS weight rows at a time into one reused
    buffer (a few MiB, stays in cache) and let torch's matmul (MKL, oneDNN/AMX in bf16)
    do the rest."""
    dt = MATMUL_DTYPE
    xd = x.to(dt)
    m = xd.shape[0]
    y = torch.empty(m, w.n, dtype=dt)  # (M, N)
    rows = min(DEQUANT_ROWS, w.n)
    buf = torch.empty(rows, w.k, dtype=dt)  # (rows, K)
    for n0 in range(0, w.n, rows):
        n1 = min(w.n, n0 + rows)
        wt = dequant_rows(w, n0, n1, dt, out=buf[: n1 - n0])
        y[:, n0:n1] = linear(xd, wt)  # (M, n1-n0); bucketed rows, see edgemoe.cpu
    return y


def _dequant_torch(w: QMatrix, n0: int, n1: int) -> torch.Tensor:
    from .quantize import unpack

    spec = w.spec
    q = unpack(w.packed[n0:n1], spec.bits).float()  # (n, Kp)
    n, kp = q.shape
    s = w.scale[n0:n1].float().unsqueeze(-1)  # (n, ng, 1)
    q = q.view(n, kp // spec.group, spec.group)
    if w.zero is None:
        wt = s * (q - spec.offset)
    else:
        wt = s * q + w.zero[n0:n1].float().unsqueeze(-1)
    return wt.view(n, kp)[:, : w.k]


def _dequant_matmul_torch(x: torch.Tensor, w: QMatrix) -> torch.Tensor:
    """No C kernel: dequantize with torch ops, a chunk of rows at a time, and matmul."""
    xf = x.float()
    y = torch.empty(x.shape[0], w.n, dtype=torch.float32)
    for n0 in range(0, w.n, DEQUANT_ROWS):
        n1 = min(w.n, n0 + DEQUANT_ROWS)
        y[:, n0:n1] = xf @ _dequant_torch(w, n0, n1).t()
    return y


# ----------------------------------------------------------------------------- int8

INT8_XGROUP = 64  # activation quantization group of the native int8 path (K must be a multiple)


@dataclass
class Int8Matrix:
    """Per-output-channel symmetric int8 weight: W = scale[:, None] * q."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) bf16/fp16/fp32

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> Int8Matrix:
    """Round-to-nearest per-row int8 with levels [-127, 127]; the scale is rounded to
    scale_dtype first and the codes are computed against the rounded scale."""
    wf = w.float()
    s = (wf.abs().amax(dim=1) / 127).clamp_min(1e-12).to(scale_dtype)  # (N,)
    q = torch.round(wf / s.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return Int8Matrix(q, s)


def int8_mm(x: torch.Tensor, w: Int8Matrix, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) @ (scale * q)^T -> (M, N)."""
    out_dtype = out_dtype or x.dtype
    m, k = x.shape
    if k != w.q.shape[1]:
        raise ValueError(f"x has {k} columns, weight expects {w.q.shape[1]}")
    aligned = k % INT8_XGROUP == 0
    if aligned and x.dtype in _DTYPES and m <= (INT8PACK_MAX_BATCH_AVX512 if INT8PACK_PREFERRED else 0):
        return _int8pack(x, w, out_dtype)
    lib = _native.get()
    if lib is not None and aligned and w.scale.dtype in _DTYPES:
        limit = INT8_NATIVE_MAX_BATCH if MATMUL_DTYPE == torch.float32 else PACKED_MAX_BATCH_BF16_CPU
        if m <= limit:
            return _int8_native(lib, x, w, out_dtype)
    elif aligned and x.dtype in _DTYPES and m <= INT8PACK_MAX_BATCH:
        return _int8pack(x, w, out_dtype)
    # bf16 matmul only pays (and is only worth its rounding) for large batches
    dt = MATMUL_DTYPE if m > packed_max_batch() else torch.float32
    xd = x.to(dt)
    y = torch.empty(m, w.q.shape[0], dtype=dt)
    for n0 in range(0, w.q.shape[0], DEQUANT_ROWS):
        n1 = min(w.q.shape[0], n0 + DEQUANT_ROWS)
        wt = (w.q[n0:n1].float() * w.scale[n0:n1].float().unsqueeze(1)).to(dt)  # (rows, K)
        y[:, n0:n1] = linear(xd, wt)  # (M, n1-n0); bucketed rows, see edgemoe.cpu
    return y.to(out_dtype)


def _int8pack(x: torch.Tensor, w: Int8Matrix, out_dtype: torch.dtype) -> torch.Tensor:
    s = w.scale if w.scale.dtype == x.dtype else w.scale.to(x.dtype)  # (N,) transient if cast
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.q, s).to(out_dtype)


def _int8_native(lib, x: torch.Tensor, w: Int8Matrix, out_dtype: torch.dtype) -> torch.Tensor:
    """The C kernel on torch's int8pack layout: signed codes (N, K), one scale per row."""
    if x.dtype not in _DTYPES:
        x = x.float()
    x = x.contiguous()
    m, k = x.shape
    n = w.q.shape[0]
    ydt = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch.empty(m, n, dtype=ydt)  # (M, N)
    rc = lib.em_qmm(
        x.data_ptr(), _DTYPES[x.dtype], m, k, w.q.data_ptr(), w.scale.data_ptr(), _DTYPES[w.scale.dtype], 1, None,
        n, k, 8, INT8_XGROUP, y.data_ptr(), _DTYPES[ydt], torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"em_qmm (int8) failed with code {rc}")
    return y if ydt == out_dtype else y.to(out_dtype)
