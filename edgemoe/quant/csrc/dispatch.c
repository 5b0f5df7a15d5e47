/*
 * edgemoe kernels: the exported functions, dispatched at run time to the instruction-set
 * variant the CPU supports.
 *
 * qmm.c and qmm8.c are compiled once per variant (em_common.h) into em_<variant>_<fn>;
 * this file is compiled with the baseline flags of the target only, plus -DEM_HAVE_<v> for
 * every variant that was built, so the shared object runs on any CPU of its architecture:
 * a build made on an AVX-512 machine and copied to an AVX2-only one picks the AVX2
 * variant there (and the generic one on a CPU without AVX2).
 *
 * Variants (ids are stable; names are what native.py and EDGEMOE_ISA use):
 *   0 generic     plain C (baseline of the target)
 *   1 avx2        AVX2 + FMA + F16C
 *   2 avxvnni     the above + AVX-VNNI (256-bit vpdpbusd / vpdpwssd, VEX)
 *   3 avx512vnni  the above + AVX-512 F/BW/VL/DQ + VNNI (512-bit vpdpbusd)
 *   4 neon        AArch64 Advanced SIMD
 *   5 dotprod     AArch64 with the ARMv8.2 dot product (sdot)
 * The best supported variant is picked at load; em_set_isa picks another one (any the CPU
 * supports: to compare paths, or to cap a machine at a lower one).
 */
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define EM_X86 1
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#define EM_ABI 4 /* must match em_common.h and native.py */

typedef int (*qmm_t)(const void *, int, int64_t, int64_t, const uint8_t *, const void *, int, int, const uint16_t *,
                     int64_t, int64_t, int, int64_t, void *, int, int);
typedef int (*dequant_t)(const uint8_t *, const uint16_t *, const uint16_t *, int64_t, int64_t, int64_t, int64_t, int,
                         int64_t, void *, int, int);
typedef int (*quantize_t)(const float *, int64_t, int64_t, int64_t, int, int64_t, int, int, uint8_t *, uint16_t *,
                          uint16_t *, int);
typedef int (*mx_t)(const void *, int, int64_t, int64_t, const uint8_t *, const uint8_t *, int64_t, int64_t, void *,
                    int, int);
typedef int (*mxdq_t)(const uint8_t *, const uint8_t *, int64_t, int64_t, int64_t, int64_t, void *, int, int);
typedef int (*order_t)(int, int, uint8_t *);
typedef int (*expert_t)(const void *, int, int64_t, int64_t, int64_t, const int64_t *, const int64_t *, int, void *,
                        int, int);

typedef struct {
    const char *name;
    qmm_t qmm, qmm8;
    dequant_t dequant;
    quantize_t quantize;
    mx_t mx, mx8;
    mxdq_t mxdq;
    order_t order;
    expert_t expert8;
} impl_t;

#define EM_DECL(v)                                                                                                   \
    int em_##v##_qmm(const void *, int, int64_t, int64_t, const uint8_t *, const void *, int, int, const uint16_t *, \
                     int64_t, int64_t, int, int64_t, void *, int, int);                                              \
    int em_##v##_qmm8(const void *, int, int64_t, int64_t, const uint8_t *, const void *, int, int,                  \
                      const uint16_t *, int64_t, int64_t, int, int64_t, void *, int, int);                           \
    int em_##v##_dequant(const uint8_t *, const uint16_t *, const uint16_t *, int64_t, int64_t, int64_t, int64_t,    \
                         int, int64_t, void *, int, int);                                                            \
    int em_##v##_quantize(const float *, int64_t, int64_t, int64_t, int, int64_t, int, int, uint8_t *, uint16_t *,   \
                          uint16_t *, int);                                                                          \
    int em_##v##_mxfp4_mm(const void *, int, int64_t, int64_t, const uint8_t *, const uint8_t *, int64_t, int64_t,   \
                          void *, int, int);                                                                         \
    int em_##v##_mxfp4_mm8(const void *, int, int64_t, int64_t, const uint8_t *, const uint8_t *, int64_t, int64_t,  \
                           void *, int, int);                                                                        \
    int em_##v##_mxfp4_dequant(const uint8_t *, const uint8_t *, int64_t, int64_t, int64_t, int64_t, void *, int,    \
                               int);                                                                                 \
    int em_##v##_x8_order(int, int, uint8_t *);                                                                     \
    int em_##v##_expert8(const void *, int, int64_t, int64_t, int64_t, const int64_t *, const int64_t *, int, void *, \
                         int, int);
#define EM_IMPL(v)                                                                                              \
    {                                                                                                           \
        #v, em_##v##_qmm, em_##v##_qmm8, em_##v##_dequant, em_##v##_quantize, em_##v##_mxfp4_mm,               \
            em_##v##_mxfp4_mm8, em_##v##_mxfp4_dequant, em_##v##_x8_order, em_##v##_expert8                    \
    }
#define EM_MISSING(v) {#v, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL}

EM_DECL(generic)
#ifdef EM_HAVE_avx2
EM_DECL(avx2)
#endif
#ifdef EM_HAVE_avxvnni
EM_DECL(avxvnni)
#endif
#ifdef EM_HAVE_avx512vnni
EM_DECL(avx512vnni)
#endif
#ifdef EM_HAVE_neon
EM_DECL(neon)
#endif
#ifdef EM_HAVE_dotprod
EM_DECL(dotprod)
#endif

#define EM_NISA 6
static const impl_t IMPLS[EM_NISA] = {
    EM_IMPL(generic),
#ifdef EM_HAVE_avx2
    EM_IMPL(avx2),
#else
    EM_MISSING(avx2),
#endif
#ifdef EM_HAVE_avxvnni
    EM_IMPL(avxvnni),
#else
    EM_MISSING(avxvnni),
#endif
#ifdef EM_HAVE_avx512vnni
    EM_IMPL(avx512vnni),
#else
    EM_MISSING(avx512vnni),
#endif
#ifdef EM_HAVE_neon
    EM_IMPL(neon),
#else
    EM_MISSING(neon),
#endif
#ifdef EM_HAVE_dotprod
    EM_IMPL(dotprod),
#else
    EM_MISSING(dotprod),
#endif
};

/* ------------------------------------------------------------------ CPU features */

/* Bit i set: the CPU (and the OS, for the register state) supports variant i. */
static int cpu_mask(void) {
    int mask = 1; /* generic */
#ifdef EM_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return mask;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    unsigned long long xcr0 = 0;
    if (osxsave) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        xcr0 = ((unsigned long long)hi << 32) | lo;
    }
    const int ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6; /* SSE+AVX, + opmask/ZMM state */
    unsigned b7 = 0, c7 = 0, a71 = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) b7 = b, c7 = c;
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) a71 = a;
    const int avx2 = (b7 >> 5) & 1;
    const int f512 = (b7 >> 16) & 1, dq512 = (b7 >> 17) & 1, bw512 = (b7 >> 30) & 1, vl512 = (b7 >> 31) & 1;
    const int vnni512 = (c7 >> 11) & 1, avxvnni = (a71 >> 4) & 1;
    if (avx && ymm && avx2 && fma && f16c) {
        mask |= 1 << 1;
        if (avxvnni) mask |= 1 << 2;
        if (zmm && f512 && dq512 && bw512 && vl512 && vnni512) mask |= 1 << 3;
    }
#endif
#if defined(__aarch64__)
    mask |= 1 << 4; /* Advanced SIMD is part of AArch64 */
#if defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) mask |= 1 << 5;
#endif
#endif
    return mask;
}

static int g_mask = -1;
static const impl_t *g_impl = &IMPLS[0];
static int g_isa = 0;

static int mask(void) {
    if (g_mask < 0) g_mask = cpu_mask();
    return g_mask;
}

int em_abi(void) { return EM_ABI; }
int em_isa_count(void) { return EM_NISA; }
const char *em_isa_name(int id) { return id >= 0 && id < EM_NISA ? IMPLS[id].name : NULL; }
/* 1 when variant id is in this build, whatever the CPU */
int em_isa_built(int id) { return id >= 0 && id < EM_NISA && IMPLS[id].qmm != NULL; }
/* 1 when variant id is built and this CPU runs it */
int em_isa_supported(int id) { return em_isa_built(id) && ((mask() >> id) & 1); }
/* the CPU's features as the variant bit mask above (built or not) */
int em_cpu_mask(void) { return mask(); }

int em_isa_best(void) {
    static const int order[] = {3, 2, 1, 5, 4, 0}; /* widest first */
    for (unsigned i = 0; i < sizeof(order) / sizeof(order[0]); i++)
        if (em_isa_supported(order[i])) return order[i];
    return 0;
}

/* Use variant id (-1: the best this CPU supports). Returns the variant now in use, or -1
 * (nothing changed) when id is not built or the CPU lacks it. */
int em_set_isa(int id) {
    if (id < 0) id = em_isa_best();
    if (!em_isa_supported(id)) return -1;
    g_impl = &IMPLS[id];
    g_isa = id;
    return id;
}

int em_isa(void) { return g_isa; }

__attribute__((constructor)) static void em_init(void) { em_set_isa(-1); }

/* ------------------------------------------------------------------ exported kernels */

int em_qmm(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt, int per_row,
           const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt, int nthreads) {
    return g_impl->qmm(x, xdt, M, K, w, scale, sdt, per_row, zero, N, Kp, bits, G, y, ydt, nthreads);
}

int em_qmm8(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt, int per_row,
            const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt, int nthreads) {
    return g_impl->qmm8(x, xdt, M, K, w, scale, sdt, per_row, zero, N, Kp, bits, G, y, ydt, nthreads);
}

int em_dequant(const uint8_t *w, const uint16_t *scale, const uint16_t *zero, int64_t n0, int64_t n1, int64_t K,
               int64_t Kp, int bits, int64_t G, void *out, int odt, int nthreads) {
    return g_impl->dequant(w, scale, zero, n0, n1, K, Kp, bits, G, out, odt, nthreads);
}

int em_quantize(const float *w, int64_t N, int64_t K, int64_t Kp, int bits, int64_t G, int asym, int search,
                uint8_t *q, uint16_t *scale, uint16_t *zero, int nthreads) {
    return g_impl->quantize(w, N, K, Kp, bits, G, asym, search, q, scale, zero, nthreads);
}

int em_mxfp4_mm(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *blocks, const uint8_t *scales, int64_t N,
                int64_t G, void *y, int ydt, int nthreads) {
    return g_impl->mx(x, xdt, M, K, blocks, scales, N, G, y, ydt, nthreads);
}

int em_mxfp4_mm8(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *blocks, const uint8_t *scales, int64_t N,
                 int64_t G, void *y, int ydt, int nthreads) {
    return g_impl->mx8(x, xdt, M, K, blocks, scales, N, G, y, ydt, nthreads);
}

int em_mxfp4_dequant(const uint8_t *blocks, const uint8_t *scales, int64_t n0, int64_t n1, int64_t K, int64_t G,
                     void *out, int odt, int nthreads) {
    return g_impl->mxdq(blocks, scales, n0, n1, K, G, out, odt, nthreads);
}

int em_x8_order(int bits, int B, uint8_t *ord) { return g_impl->order(bits, B, ord); }

int em_expert8(const void *x, int xdt, int64_t M, int64_t H, int64_t I, const int64_t *d13, const int64_t *d2, int act,
               void *y, int ydt, int nthreads) {
    return g_impl->expert8(x, xdt, M, H, I, d13, d2, act, y, ydt, nthreads);
}

/* ------------------------------------------------------------------ int8 dequantize */

/* Rows [n0, n1) of an int8 per-row matrix, out[n - n0][k] = q[n][k] * scale[n], as fp32
 * (odt 0) or bf16 (odt 1, rounded to nearest even as torch rounds); scales fp32 or bf16. The prefill path of the
 * resident int8 layers: one pass over the codes instead of torch's three (cast, multiply,
 * cast). Plain C the compiler vectorises with the baseline ISA; it is bound by memory. */
int em_dequant8(const int8_t *q, const void *scale, int sdt, int64_t n0, int64_t n1, int64_t K, void *out, int odt,
                int nthreads) {
    (void)nthreads;
    if (sdt < 0 || sdt > 1 || odt < 0 || odt > 1) return -2; /* fp16 scales: the caller uses torch */
#pragma omp parallel for schedule(static) num_threads(nthreads) if ((n1 - n0) * K >= (1 << 18))
    for (int64_t n = n0; n < n1; n++) {
        float s;
        if (sdt == 0) {
            s = ((const float *)scale)[n];
        } else {
            const uint32_t b = (uint32_t)((const uint16_t *)scale)[n] << 16;
            __builtin_memcpy(&s, &b, 4);
        }
        const int8_t *row = q + n * K;
        if (odt == 0) {
            float *o = (float *)out + (n - n0) * K;
            for (int64_t k = 0; k < K; k++) o[k] = (float)row[k] * s;
        } else {
            uint16_t *o = (uint16_t *)out + (n - n0) * K;
            for (int64_t k = 0; k < K; k++) {
                const float v = (float)row[k] * s;
                uint32_t b;
                __builtin_memcpy(&b, &v, 4);
                o[k] = (uint16_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ memory bandwidth */

/* Reads n bytes (n a multiple of 64, p 64-byte aligned) on nthreads threads and returns a
 * checksum: the benchmark's "physical limit" (DRAM read bandwidth) measured with the same
 * threads as the kernels. Plain C that the compiler vectorises with the baseline ISA. */
uint64_t em_read(const uint64_t *p, int64_t n, int nthreads) {
    (void)nthreads;
    const int64_t words = n / 8;
    uint64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* independent sums: the adds never bound the reads */
#pragma omp for schedule(static)
        for (int64_t c = 0; c < words; c += 8)
            for (int j = 0; j < 8; j++) acc[j] += p[c + j];
        for (int j = 0; j < 8; j++) total += acc[j];
    }
    return total;
}
