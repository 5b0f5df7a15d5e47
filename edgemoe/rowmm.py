"""A bf16 matmul for a few rows whose cost hardly grows with the rows: the kernel of the
decode steps that run several sequences together (edgemoe.batching).

A decode step computes x (B, K) @ W (N, K)^T for every weight matrix W, with B the
number of sequences in the step (1 to a few). Reading W dominates: one row of x is a
matrix-vector product bound by memory bandwidth, and B rows could share that read. On
CPUs torch's native bf16 kernel instead costs about B times its one-row time (it is
bound by converting and multiplying, not by reading), and oneDNN reorders W into its
own layout on every call of a different weight, which costs about a copy of W. Measured
on a 2-core AVX512-BF16 EPYC, one thread, 2816 x 1024 bf16 weights taken in turn
(edgemoe_lab/results/concurrent.md has the table): native 226 / 431 / 837 us for 1 / 2 / 4
rows, this kernel 230 / 236 / 349 us.

The kernel streams each row of W once and accumulates every row of x against it in
fp32 (AVX512-BF16 `vdpbf16ps` where the CPU has it, a loop the compiler vectorises for
any other CPU), then rounds to bf16 as torch does. It is compiled with the system C
compiler on first use into a cache directory (keyed by the source, the flags, the
compiler and the CPU's features), like edgemoe.quant's kernels; without a compiler
`rows_matmul` declines and torch computes as before.

It is used only inside decode steps of several sequences (`active`, entered by
batching.decode_rows): a sequence decoded alone keeps torch's kernels, so its tokens do
not change.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import subprocess
import threading
from pathlib import Path

import torch

from .quant.native import cache_dir, compiler, cpu_id  # one place builds and caches C kernels

log = logging.getLogger(__name__)

ABI = 3  # must match em_rows_abi() below
MAX_ROWS = 64  # rows per call the kernel takes (blocks of 16 inside)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

int em_rows_abi(void) { return 3; }

int em_rows_simd(void) {
#if defined(__AVX512BF16__)
    return 2;
#else
    return 0;
#endif
}

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as torch converts fp32 to bf16; NaN stays NaN. */
static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define MB 16 /* rows of x per pass over w */

#if defined(__AVX512BF16__)
/* Output columns n .. n+NR-1 for MR rows of x. w is read as one sequential stream (row
   after row; the prefetch runs PF bytes ahead), each 64-byte piece multiplied into every
   row's accumulator; two accumulators per row (even and odd pieces) halve the chain that
   waits on the dot-product latency. */
#define PF 1024
static inline __attribute__((always_inline)) void cols_bf16(const int MR, const int NR, const uint16_t *x,
                                                             int64_t K, const uint16_t *w, float *out) {
    const int64_t K64 = K / 64 * 64, K32 = K / 32 * 32;
    for (int r = 0; r < NR; r++) {
        const uint16_t *wr = w + r * K;
        __m512 a0[MB], a1[MB];
        for (int m = 0; m < MR; m++) a0[m] = a1[m] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k < K64; k += 64) {
            _mm_prefetch((const char *)(wr + k) + PF, _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + k) + PF + 64, _MM_HINT_T0);
            __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wr + k));
            __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(wr + k + 32));
            for (int m = 0; m < MR; m++) {
                a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k)), w0);
                a1[m] = _mm512_dpbf16_ps(a1[m], (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k + 32)), w1);
            }
        }
        for (; k < K32; k += 32) {
            __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wr + k));
            for (int m = 0; m < MR; m++)
                a0[m] = _mm512_dpbf16_ps(a0[m], (__m512bh)_mm512_loadu_si512((const void *)(x + m * K + k)), w0);
        }
        for (int m = 0; m < MR; m++) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
            for (int64_t j = K32; j < K; j++) s += bf2f(x[m * K + j]) * bf2f(wr[j]);
            out[r * MB + m] = s;
        }
    }
}
#else
static inline __attribute__((always_inline)) void cols_generic(const int MR, const int NR, const uint16_t *x,
                                                                int64_t K, const uint16_t *w, float *out) {
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MR; m++) {
            float acc[16] = {0};
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                for (int j = 0; j < 16; j++) acc[j] += bf2f(x[m * K + k + j]) * bf2f(w[r * K + k + j]);
            float s = 0;
            for (int j = 0; j < 16; j++) s += acc[j];
            for (; k < K; k++) s += bf2f(x[m * K + k]) * bf2f(w[r * K + k]);
            out[r * MB + m] = s;
        }
}
#endif

/* NR output columns per loop iteration (the threads share the iterations out). */
static inline __attribute__((always_inline)) void block(const int MR, const uint16_t *x, int64_t K,
                                                         const uint16_t *w, int64_t N, const uint16_t *bias,
                                                         uint16_t *y, int threads) {
    const int NR = 8;
    const int64_t nb = (N + NR - 1) / NR;
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < nb; i++) {
        const int64_t n0 = i * NR;
        const int nr = (int)(N - n0 < NR ? N - n0 : NR);
        float out[8 * MB];
        if (nr == NR) {
#if defined(__AVX512BF16__)
            cols_bf16(MR, NR, x, K, w + n0 * K, out);
#else
            cols_generic(MR, NR, x, K, w + n0 * K, out);
#endif
        } else {
            for (int r = 0; r < nr; r++)
#if defined(__AVX512BF16__)
                cols_bf16(MR, 1, x, K, w + (n0 + r) * K, out + r * MB);
#else
                cols_generic(MR, 1, x, K, w + (n0 + r) * K, out + r * MB);
#endif
        }
        for (int r = 0; r < nr; r++) {
            const float b = bias ? bf2f(bias[n0 + r]) : 0.0f;
            for (int m = 0; m < MR; m++) y[m * N + n0 + r] = f2bf(out[r * MB + m] + b);
        }
    }
}

#define CASE(R) case R: block(R, xb, K, w, N, bias, yb, threads); break;

/* y (M, N) = x (M, K) @ w (N, K)^T (+ bias (N)): bf16 in and out, fp32 accumulation.
   Returns 0, or -1 for bad sizes. */
int em_rows_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const uint16_t *bias,
                 uint16_t *y, int threads) {
    if (M < 1 || K < 1 || N < 1) return -1;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int MR = (int)(M - m0 < MB ? M - m0 : MB);
        const uint16_t *xb = x + m0 * K;
        uint16_t *yb = y + m0 * N;
        switch (MR) {
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
            CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16)
        }
    }
    return 0;
}
"""

# Tried in order: the first that compiles wins (no OpenMP: one thread).
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
# Below this many weight values a call runs on one thread: waking the others costs more.
PARALLEL_MIN = 1 << 18


class _Library:
    """The built kernel, or why there is none (built once, on first use)."""

    def __init__(self):
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self.disabled = os.environ.get("EDGEMOE_ROW_KERNEL", "1") == "0"
        self._tried = False
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        if self.disabled:
            return None
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self.lib = _load(_build())
                    except Exception as e:  # noqa: BLE001 - any failure means "let torch compute"
                        self.error = " ".join(str(e).split())[:600] or repr(e)
                        log.warning("edgemoe: could not build the batched-decode bf16 kernel (%s); decode steps "
                                    "of several sequences use torch's kernels", self.error)
                    self._tried = True
        return self.lib


library = _Library()


def available() -> bool:
    """Whether the kernel is built and loaded (building it on first call)."""
    return library.get() is not None


def simd() -> str:
    """Which code the kernel runs: "avx512bf16", "generic" or "unavailable"."""
    lib = library.get()
    if lib is None:
        return "unavailable"
    return {2: "avx512bf16"}.get(lib.em_rows_simd(), "generic")


def _build() -> Path:
    cc = compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    out_dir = cache_dir()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256((SOURCE + repr((flags, version, cpu_id(), ABI))).encode()).hexdigest()[:16]
        lib = out_dir / f"rowmm-{key}.so"
        if lib.exists():
            return lib
        src = out_dir / f".rowmm-{key}-{os.getpid()}.c"
        tmp = out_dir / f".rowmm-{key}-{os.getpid()}.so"
        src.write_text(SOURCE)
        try:
            res = subprocess.run([cc, *flags, "-std=c11", "-fPIC", "-shared", "-o", str(tmp), str(src)],
                                 capture_output=True, text=True, timeout=300)
        finally:
            src.unlink(missing_ok=True)
        if res.returncode == 0:
            os.replace(tmp, lib)  # atomic: concurrent builders never see a partial file
            return lib
        tmp.unlink(missing_ok=True)
        errors.append(f"[{' '.join(flags)}] {' '.join(res.stderr.split())[-300:]}")
    raise RuntimeError("the kernel failed to compile: " + " | ".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.em_rows_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.em_rows_abi()}, expected {ABI}")
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.em_rows_bf16.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, i32]
    lib.em_rows_bf16.restype = i32
    lib.em_rows_simd.restype = i32
    return lib


_BF16 = torch.bfloat16


def rows_matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., K) @ w (N, K)^T (+ b) for bf16 CPU tensors of at most MAX_ROWS rows, or None
    when the kernel does not take the call (another dtype, a non-contiguous weight, a
    tensor that needs grad, no kernel): the caller then computes it as usual. Called for
    every matmul of a batched decode step, so the checks are kept cheap."""
    if x.dtype is not _BF16 or w.dtype is not _BF16 or w.dim() != 2 or not w.is_contiguous() or not x.is_cpu:
        return None
    if b is not None and (b.dtype is not _BF16 or not b.is_contiguous()):
        return None
    N, K = w.shape
    if x.shape[-1] != K or K == 0 or w.requires_grad or x.requires_grad:
        return None
    rows = x.numel() // K
    if not 1 <= rows <= MAX_ROWS:
        return None
    lib = library.lib if library._tried and not library.disabled else library.get()
    if lib is None:
        return None
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(rows, K).contiguous()  # (R, K)
    y = torch.empty(rows, N, dtype=_BF16)  # (R, N)
    threads = torch.get_num_threads() if N * K >= PARALLEL_MIN else 1
    if lib.em_rows_bf16(x2.data_ptr(), rows, K, w.data_ptr(), N, None if b is None else b.data_ptr(),
                        y.data_ptr(), threads) != 0:
        return None
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)


@contextlib.contextmanager
def active(enabled: bool = True):
    """Within the body (on this thread), float matmuls of edgemoe.cpu.linear go through
    `rows_matmul` where it takes them."""
    from . import cpu

    if not enabled or not available():
        yield
        return
    with cpu.row_matmul(rows_matmul):
        yield
