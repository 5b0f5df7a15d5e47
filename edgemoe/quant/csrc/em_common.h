/*
 * edgemoe kernels: what every C file of the library shares (conversions, activation loads,
 * the instruction-set macros and the names of the exported functions).
 *
 * The library is one shared object holding several builds of the same kernels, one per
 * instruction set (see native.py): every kernel file is compiled once per variant with
 * -DEM_VARIANT=<name> and that variant's flags (e.g. -mavx2 -mfma -mf16c), so its public
 * functions are em_<variant>_<function>; dispatch.c picks a variant at run time from the
 * CPU's features. Nothing here depends on the machine the library was built on.
 *
 * EM_PORTABLE (the "generic" variant) turns every intrinsic off: plain C, which the
 * compiler vectorises for the baseline of the target (SSE2 on x86-64, NEON on aarch64).
 */
#ifndef EM_COMMON_H
#define EM_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef EM_VARIANT
#define EM_VARIANT native
#endif
#define EM_CAT3_(a, b, c) a##_##b##_##c
#define EM_CAT3(a, b, c) EM_CAT3_(a, b, c)
/* em_<variant>_<name>: the per-variant public symbols dispatch.c calls */
#define EM_API(name) EM_CAT3(em, EM_VARIANT, name)

#if !defined(EM_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define EM_AVX2 1
/* vpdpwssd (AVX512-VNNI or AVX-VNNI) fuses vpmaddwd and the int32 add. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define EM_VNNI 1
#define EM_DPWSSD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#define EM_DPBUSD(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define EM_VNNI 1
#define EM_DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#define EM_DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#elif defined(EM_EMULATE_VNNI) /* tests: run the VNNI loop structure on plain AVX2 */
#define EM_VNNI 1
#define EM_DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
/* exact for the operands used here: pairs of u8 x s8 products stay within int16 */
#define EM_DPBUSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)))
#endif
/* 512-bit integer dot products: AVX-512 F/BW/VL with VNNI */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define EM_AVX512 1
#endif
#endif

#if !defined(EM_PORTABLE) && defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define EM_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
#define EM_SDOT 1
#endif
#endif

#define EM_ABI 4
#define EM_BLOCK 64 /* codes per packed block */
#define EM_MR 4     /* activation rows computed together */
#define EM_NB 16    /* weight rows per parallel work item */
/* Below this many multiply-adds (~10 us on one core) waking a second thread costs more
 * than it saves. */
#define EM_PAR_MIN (1 << 18)

enum { EM_F32 = 0, EM_BF16 = 1, EM_F16 = 2 };

/* ------------------------------------------------------------------ scalar conversions */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                             /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
#ifdef EM_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        float f = (float)man * (1.0f / 16777216.0f); /* zero or subnormal: man * 2^-24 */
        return sign ? -f : f;
    }
    u = exp == 31 ? sign | 0x7f800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline uint16_t f32_to_f16(float f) { /* round to nearest even, like torch */
#ifdef EM_AVX2
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);        /* NaN */
    if (u >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);       /* rounds to inf */
    if (u < 0x38800000u) {                                         /* fp16 subnormal or zero */
        float a;
        memcpy(&a, &u, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.0f)); /* units of 2^-24, RNE */
    }
    const uint32_t r = u + 0x0fffu + ((u >> 13) & 1u); /* RNE on the 13 dropped bits */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
#endif
}

static inline float load_act(const void *x, int dt, int64_t i) {
    if (dt == EM_BF16) return bf16_to_f32(((const uint16_t *)x)[i]);
    if (dt == EM_F16) return f16_to_f32(((const uint16_t *)x)[i]);
    return ((const float *)x)[i];
}

static inline void store_out(void *y, int dt, int64_t i, float v) {
    if (dt == EM_BF16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

#ifdef EM_AVX2
/* 8 activations as fp32 (dt is EM_F32 or EM_BF16). */
static inline __m256 load8(const void *x, int dt, int64_t i) {
    if (dt == EM_BF16) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
    return _mm256_loadu_ps((const float *)x + i);
}
#endif

#ifdef EM_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif /* EM_COMMON_H */
