"""Matmul on quantized weights, CPU.

Paths, picked per call by batch size (rows of x):

* 2/3/4-bit group-wise (`QMatrix`): a small C kernel (csrc/) that computes straight from
  the packed codes; above packed_max_batch() rows the weights are instead dequantized, a
  chunk of rows at a time, into a reused buffer for an MKL / oneDNN matmul.
* int8 per-channel (`Int8Matrix`, also behind `Int8Linear` for non-expert weights), stored
  in the layout torch's `_weight_int8pack_mm` reads: the same C kernel (8-20x faster than
  `_weight_int8pack_mm` on a Zen 5 EPYC) up to INT8_NATIVE_MAX_BATCH rows, then
  dequantize + matmul; `_weight_int8pack_mm` only when the C kernel is missing, K is a
  multiple of 64, and the batch tiny (its cost grows linearly with the batch).

The C kernels quantize the activations per call, to int8 (one scale per 64 activations;
csrc/qmm8.c: u8 x s8 integer dot products, vpmaddubsw / vpdpbusd / sdot) or to int16
(one scale per weight group; csrc/qmm.c: vpmaddwd / vpdpwssd). int8 is the default for
expert weights (`ACTIVATIONS`): about 2x faster at batch 1 and 32 where the CPU has AVX2
or better, for a held-out perplexity change within +-0.1% on the bundled model
(edgemoe_lab/results/quant_kernels.md). EDGEMOE_QMM_ACT=int16 or `set_activations("int16")`
selects the int16 path, whose results are bit for bit those of the kernels before the
int8 path existed. Resident int8 layers keep int16 (`RESIDENT_ACTIVATIONS`, linear.py),
MXFP4 experts fp32 (mxfp4.ACTIVATIONS). A gated expert can run as one C call
(`expert_fused`, used by experts.QuantExpert). Which instruction set the kernels run is
native.py's (runtime dispatch, EDGEMOE_ISA).

Without a C compiler everything still works: group-wise weights go through torch
dequantize-then-matmul (correct, 5-10x slower at batch 1), int8 through torch's kernels,
and a warning says why once.

Owns the matrix types and which path a call takes. It neither builds nor loads the C
library (native.py; `native_available`, `native_error` and `use_native` are re-exported
from there for the callers that switch or report it) nor makes the codes (quantize.py).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

from ..cpu import bucket_rows, linear, onednn_used
from . import native
from .native import DTYPES as _DTYPES
from .native import native_available, native_error, use_native  # noqa: F401 - re-exported
from .quantize import QuantSpec, unpack

# edgemoe_lab/experiments/quant_kernels.py reports the SIMD level through `K._native.get()`.
_native = native.library

# ----------------------------------------------------------------------------- activations

ACT_ENV = "EDGEMOE_QMM_ACT"
ACT_PATHS = ("int8", "int16")
DEFAULT_ACTIVATIONS = "int8"


def _env_activations() -> str:
    v = os.environ.get(ACT_ENV, "").strip().lower()
    if v in ("", "auto", "default"):
        return DEFAULT_ACTIVATIONS
    if v not in ACT_PATHS:
        raise ValueError(f"{ACT_ENV}={v!r}: expected one of {', '.join(ACT_PATHS)}")
    return v


ACTIVATIONS = _env_activations()  # how the C kernels quantize activations: "int8" or "int16"


def _env_resident() -> str:
    v = os.environ.get("EDGEMOE_RESIDENT_ACT", "").strip().lower() or "int16"
    if v not in ACT_PATHS:
        raise ValueError(f"EDGEMOE_RESIDENT_ACT={v!r}: expected one of {', '.join(ACT_PATHS)}")
    return v


# The activations of resident int8 layers (quant/linear.py: attention, LM head, shared
# experts): int16 unless EDGEMOE_RESIDENT_ACT=int8 (see linear.py for why).
RESIDENT_ACTIVATIONS = _env_resident()


def set_activations(path: str | None) -> str:
    """Select the activation path of the C kernels ("int8" or "int16"; None: the default
    or EDGEMOE_QMM_ACT). Returns the previous one."""
    global ACTIVATIONS
    prev = ACTIVATIONS
    path = _env_activations() if path is None else path
    if path not in ACT_PATHS:
        raise ValueError(f"activation path {path!r}: expected one of {', '.join(ACT_PATHS)}")
    ACTIVATIONS = path
    return prev


def _act8(act: str | None) -> bool:
    return (act or ACTIVATIONS) == "int8"

# Batch sizes above these use dequantize + matmul instead of the packed kernels (crossovers
# measured in edgemoe_lab/results/quant_kernels.md). CPUs with bf16 matrix units (AMX,
# AVX512-BF16) run the dequantized matmul in bf16 several times faster than fp32, so
# there the crossover comes much earlier; the int8-activation kernels are about twice as
# fast as the int16 ones, which moves it from 16 to 32 on a Zen 5 EPYC.
PACKED_MAX_BATCH = 64
INT8_NATIVE_MAX_BATCH = 64
PACKED_MAX_BATCH_BF16_CPU = 32  # int8 activations
PACKED_MAX_BATCH_BF16_CPU_INT16 = 16  # int16 activations (and MXFP4's fp32 ones)
# torch's _weight_int8pack_mm, only for K a multiple of 64 (bf16 with K = 72 and batch >= 4
# segfaults in torch 2.11 on an AMX Xeon). It used to be preferred on AVX-512 CPUs up to
# batch 64 (it beat the int16 kernel on a Xeon); on a Zen 5 EPYC it is 8-20x slower than
# the C kernel at batch 1-64 (edgemoe_lab/results/quant_kernels.md), so now it serves only when
# the C kernel is missing, for tiny batches (its cost grows linearly with the batch).
INT8PACK_MAX_BATCH = 4
INT8PACK_MAX_BATCH_AVX512 = 64
DEQUANT_ROWS = 1024  # weight rows dequantized per chunk on the large-batch path
ROW_BLOCK_MIN = 16  # smallest block of activation rows one oneDNN matmul gets (row_blocks)


# ----------------------------------------------------------------------------- dispatch


def _has_bf16_matmul() -> bool:
    try:
        flags = native.cpu_id().split()
    except Exception:  # noqa: BLE001
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# dtype of the large-batch dequantize + matmul path
MATMUL_DTYPE = torch.bfloat16 if _has_bf16_matmul() else torch.float32


def packed_max_batch(act: str | None = None) -> int:
    """Largest batch that the packed kernels take on this CPU, for activation path `act`
    (default ACTIVATIONS; "int16" also stands for MXFP4's fp32 activations)."""
    if MATMUL_DTYPE == torch.bfloat16:
        return PACKED_MAX_BATCH_BF16_CPU if _act8(act) else PACKED_MAX_BATCH_BF16_CPU_INT16
    return PACKED_MAX_BATCH


# Route int8 weights to torch's _weight_int8pack_mm up to INT8PACK_MAX_BATCH_AVX512 rows
# (see above: off, the C kernel is faster wherever measured since the int8 path).
INT8PACK_PREFERRED = False


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
    lib = native.get()
    if lib is None:
        return _dequant_matmul_torch(x, w).to(out_dtype)
    if x.shape[0] > packed_max_batch():
        return _dequant_matmul_native(lib, x, w, out_dtype)
    return qmm_packed(x, w, out_dtype, lib)


def qmm_packed(x: torch.Tensor, w: QMatrix, out_dtype: torch.dtype | None = None, lib=None,
               act: str | None = None) -> torch.Tensor:
    """The packed C kernel at any batch size (the dispatcher's small-batch path), with
    int8 or int16 activations (`act`; default ACTIVATIONS)."""
    lib = lib or native.get()
    if lib is None:
        raise RuntimeError(f"C kernel unavailable: {native.library.error}")
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
    fn = lib.em_qmm8 if _act8(act) else lib.em_qmm
    rc = fn(
        x.data_ptr(), _DTYPES[x.dtype], m, k,
        w.packed.data_ptr(), w.scale.data_ptr(), _DTYPES[torch.float16], 0,
        w.zero.data_ptr() if w.zero is not None else None,
        w.n, w.kp, w.spec.bits, w.spec.group,
        y.data_ptr(), _DTYPES[ydt], torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"em_qmm failed with code {rc}")
    return y if ydt == out_dtype else y.to(out_dtype)


def dequant_rows(w: QMatrix, n0: int, n1: int, dtype: torch.dtype = torch.float32, out=None) -> torch.Tensor:
    """Rows [n0, n1) of the dequantized weight, (n1 - n0, K), with the C kernel if built."""
    lib = native.get()
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


def row_blocks(m: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """The row ranges [a, b) a matmul of m rows in `dtype` against one dequantized weight
    chunk is split into. On oneDNN (edgemoe.cpu: it gets power-of-two row counts only,
    padded by `linear`) m is cut into power-of-two blocks of at least ROW_BLOCK_MIN rows
    (the last one cut short at m, which `linear` pads): 130 rows cost 128 + 2 rows, not 256
    (1.5x faster; edgemoe_lab/results/prefill_profile.md). The blocks' rows came out bit for
    bit those of the padded call wherever measured (oneDNN's kernels do not mix rows), but
    a lone row takes torch's one-row kernel, so a last block of one row is taken as its
    last two. Elsewhere one block."""
    if m <= ROW_BLOCK_MIN or not onednn_used(dtype) or bucket_rows(m) == m:
        return [(0, m)]
    total, out = -(-m // ROW_BLOCK_MIN) * ROW_BLOCK_MIN, []
    for bit in reversed(range(total.bit_length())):
        if total >> bit & 1 and (a := out[-1][1] if out else 0) < m:
            out.append((a, min(m, a + (1 << bit))))
    if out[-1][1] - out[-1][0] == 1:  # torch computes a single row another way (not bit for bit)
        out[-1] = (m - 2, m)  # so the last row goes with its neighbour, computed twice
    return out


def _matmul_blocks(y: torch.Tensor, xd: torch.Tensor, wt: torch.Tensor, n0: int, n1: int,
                   blocks: list[tuple[int, int]]) -> None:
    """y[:, n0:n1] = xd @ wt^T, one `linear` per row block (row_blocks)."""
    for a, b in blocks:
        y[a:b, n0:n1] = linear(xd[a:b], wt)  # (b-a, n1-n0)


def _dequant_matmul_native(lib, x: torch.Tensor, w: QMatrix, out_dtype: torch.dtype) -> torch.Tensor:
    """Large batches: dequantize DEQUANT_ROWS weight rows at a time into one reused
    buffer (a few MiB, stays in cache) and let torch's matmul (MKL, oneDNN/AMX in bf16)
    do the rest; each block of the product goes straight into y in out_dtype."""
    dt = MATMUL_DTYPE
    xd = x.to(dt)
    m = xd.shape[0]
    y = torch.empty(m, w.n, dtype=out_dtype)  # (M, N)
    rows = min(DEQUANT_ROWS, w.n)
    buf = torch.empty(rows, w.k, dtype=dt)  # (rows, K)
    blocks = row_blocks(m, dt)
    for n0 in range(0, w.n, rows):
        n1 = min(w.n, n0 + rows)
        wt = dequant_rows(w, n0, n1, dt, out=buf[: n1 - n0])
        _matmul_blocks(y, xd, wt, n0, n1, blocks)
    return y


def _dequant_torch(w: QMatrix, n0: int, n1: int) -> torch.Tensor:
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


def int8_mm(x: torch.Tensor, w: Int8Matrix, out_dtype: torch.dtype | None = None,
            act: str | None = None) -> torch.Tensor:
    """x (M, K) @ (scale * q)^T -> (M, N); `act`: the C kernel's activations (default
    ACTIVATIONS)."""
    out_dtype = out_dtype or x.dtype
    m, k = x.shape
    if k != w.q.shape[1]:
        raise ValueError(f"x has {k} columns, weight expects {w.q.shape[1]}")
    aligned = k % INT8_XGROUP == 0
    if aligned and x.dtype in _DTYPES and m <= (INT8PACK_MAX_BATCH_AVX512 if INT8PACK_PREFERRED else 0):
        return _int8pack(x, w, out_dtype)
    lib = native.get()
    if lib is not None and aligned and w.scale.dtype in _DTYPES:
        limit = INT8_NATIVE_MAX_BATCH if MATMUL_DTYPE == torch.float32 or _act8(act) else PACKED_MAX_BATCH_BF16_CPU_INT16
        if m <= limit:
            return _int8_native(lib, x, w, out_dtype, act)
    elif aligned and x.dtype in _DTYPES and m <= INT8PACK_MAX_BATCH:
        return _int8pack(x, w, out_dtype)
    # bf16 matmul only pays (and is only worth its rounding) for large batches
    dt = MATMUL_DTYPE if m > packed_max_batch(act) else torch.float32
    xd = x.to(dt)
    n = w.q.shape[0]
    y = torch.empty(m, n, dtype=out_dtype)  # (M, N), each block converted as it is stored
    rows = min(DEQUANT_ROWS, n)
    buf = torch.empty(rows, k, dtype=dt) if lib is not None else None  # (rows, K), reused
    blocks = row_blocks(m, dt)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        wt = _dequant8_rows(lib, w, n0, n1, dt, buf)  # (rows, K)
        _matmul_blocks(y, xd, wt, n0, n1, blocks)
    return y


def _dequant8_rows(lib, w: Int8Matrix, n0: int, n1: int, dt: torch.dtype, buf: torch.Tensor | None) -> torch.Tensor:
    """Rows [n0, n1) of scale * q in dt: one C pass (em_dequant8) into `buf` when the
    kernel library is built, else torch's cast-multiply-cast (the same values: the product
    of an int8 and a bf16/fp32 scale is exact in fp32, rounded once to dt)."""
    if lib is not None and buf is not None and w.scale.dtype in (torch.float32, torch.bfloat16):
        out = buf[: n1 - n0]
        rc = lib.em_dequant8(w.q.data_ptr(), w.scale.data_ptr(), _DTYPES[w.scale.dtype], n0, n1, w.q.shape[1],
                             out.data_ptr(), _DTYPES[dt], torch.get_num_threads())
        if rc == 0:
            return out
    return (w.q[n0:n1].float() * w.scale[n0:n1].float().unsqueeze(1)).to(dt)  # (rows, K)


def _int8pack(x: torch.Tensor, w: Int8Matrix, out_dtype: torch.dtype) -> torch.Tensor:
    s = w.scale if w.scale.dtype == x.dtype else w.scale.to(x.dtype)  # (N,) transient if cast
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), w.q, s).to(out_dtype)


def _int8_native(lib, x: torch.Tensor, w: Int8Matrix, out_dtype: torch.dtype, act: str | None = None) -> torch.Tensor:
    """The C kernel on torch's int8pack layout: signed codes (N, K), one scale per row."""
    if x.dtype not in _DTYPES:
        x = x.float()
    x = x.contiguous()
    m, k = x.shape
    n = w.q.shape[0]
    ydt = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch.empty(m, n, dtype=ydt)  # (M, N)
    fn = lib.em_qmm8 if _act8(act) else lib.em_qmm
    rc = fn(
        x.data_ptr(), _DTYPES[x.dtype], m, k, w.q.data_ptr(), w.scale.data_ptr(), _DTYPES[w.scale.dtype], 1, None,
        n, k, 8, INT8_XGROUP, y.data_ptr(), _DTYPES[ydt], torch.get_num_threads(),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"em_qmm (int8) failed with code {rc}")
    return y if ydt == out_dtype else y.to(out_dtype)


# ----------------------------------------------------------------------------- fused expert

# Elementwise activations the C expert call computes (em_expert8); other gated
# combinations (gpt-oss's clamped SwiGLU) and experts with biases take two calls.
FUSED_ACTS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "relu": 3}


def matrix_desc(w) -> ctypes.Array | None:
    """The int64 description em_expert8 reads for one matrix ({codes, scale, zero, scale
    dtype, per_row, Kp, bits, G}), or None when the fused call cannot take it. The
    tensors must outlive the description (the expert holds them)."""
    if isinstance(w, QMatrix) and w.spec.bits in (2, 3, 4):
        vals = (w.packed.data_ptr(), w.scale.data_ptr(), w.zero.data_ptr() if w.zero is not None else 0,
                _DTYPES[torch.float16], 0, w.kp, w.spec.bits, w.spec.group)
    elif isinstance(w, Int8Matrix) and w.q.shape[1] % INT8_XGROUP == 0 and w.scale.dtype in _DTYPES:
        vals = (w.q.data_ptr(), w.scale.data_ptr(), 0, _DTYPES[w.scale.dtype], 1, w.q.shape[1], 8, INT8_XGROUP)
    else:
        return None
    return (ctypes.c_int64 * 8)(*vals)


def row_desc(w, act: str | None) -> tuple[int, ...] | None:
    """The arguments a one-row call on `w` passes to em_qmm8 / em_qmm now, as the 11 int64
    csrc/decode.c's em_attn_half1 reads ({codes, scale, zero, scale dtype, per_row, N, K,
    Kp, bits, G, int8 activations}), or None when such a call would not take the C kernel
    (no library, torch's int8pack path, an unaligned K). `act` as for qmm_packed / int8_mm."""
    if native.library.disabled or native.get() is None:
        return None
    if isinstance(w, QMatrix):
        if w.spec.bits not in (2, 3, 4):
            return None
        return (w.packed.data_ptr(), w.scale.data_ptr(), w.zero.data_ptr() if w.zero is not None else 0,
                _DTYPES[torch.float16], 0, w.n, w.k, w.kp, w.spec.bits, w.spec.group, int(_act8(act)))
    if isinstance(w, Int8Matrix):
        k = w.q.shape[1]
        if INT8PACK_PREFERRED or k % INT8_XGROUP or w.scale.dtype not in _DTYPES:
            return None
        return (w.q.data_ptr(), w.scale.data_ptr(), 0, _DTYPES[w.scale.dtype], 1, w.q.shape[0], k, k, 8,
                INT8_XGROUP, int(_act8(act)))
    return None


def fused_ok(m: int, w) -> bool:
    """Whether an expert call of m rows on weights like `w` takes em_expert8 now: the C
    kernel built, int8 activations, and a batch the packed kernels take."""
    if ACTIVATIONS != "int8" or native.library.disabled or native.get() is None:
        return False
    if isinstance(w, Int8Matrix):
        return not INT8PACK_PREFERRED and m <= INT8_NATIVE_MAX_BATCH
    return m <= packed_max_batch()


def expert_fused(x: torch.Tensor, d13, d2, inter: int, act: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y (M, H) = act(x W_gate^T) * (x W_up^T) @ W_down^T in one C call (int8 activations)."""
    lib = native.get()
    if x.dtype not in _DTYPES:
        x = x.float()
    x = x.contiguous()
    m, h = x.shape
    ydt = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
    y = torch.empty(m, h, dtype=ydt)  # (M, H)
    rc = lib.em_expert8(x.data_ptr(), _DTYPES[x.dtype], m, h, inter, d13, d2, act, y.data_ptr(), _DTYPES[ydt],
                        torch.get_num_threads())
    if rc:
        raise RuntimeError(f"em_expert8 failed with code {rc}")
    return y if ydt == out_dtype else y.to(out_dtype)
