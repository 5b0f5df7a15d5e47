/*
 * edgemoe: matmul on quantized weights with int8 activations and integer dot products
 * (the "int8" activation path; qmm.c has the int16 one).
 *
 * Same arguments, weights and layouts as em_qmm / em_mxfp4_mm (y (M, N) = x (M, K) @
 * dequant(W)^T), but x is quantized per call to int8, one fp32 scale per block of 64
 * activations (32 for MXFP4, one scale per weight block): xs = absmax / 127,
 * q = round-half-even(x * 127 / absmax), so q is in [-127, 127]. The integer sums are
 * exact, so the result is the float matmul of the dequantized weights with those int8
 * activations, up to the rounding of the float folds (tests/quant/refs.py: act8). Each
 * activation is off by at most half a step, absmax / 254 of its block. The inner loop multiplies unsigned 8-bit weight codes
 * by signed 8-bit activations, four products summed per int32 lane:
 *
 *   AVX2          vpmaddubsw (u8 x s8, pairs to int16) + vpmaddwd by ones (to int32)
 *   AVX-VNNI      vpdpbusd on 256 bits (VEX), the two above fused
 *   AVX-512 VNNI  vpdpbusd on 512 bits: one instruction per 64 weights
 *   NEON          smull/smlal2 + sadalp (portable AArch64), or sdot (ARMv8.2 dotprod)
 *   generic C     the same integer sums in plain C
 *
 * Once per block the int32 sums fold into fp32 with scale_w * xs. The zero point (and the
 * symmetric grid's centre) is applied once per weight group through the sum of that
 * group's quantized activations, as in qmm.c. int8 weights (signed, one scale per row) go
 * through vpsign/vpabs on 256 bits (|w| x sign(x, w)), and on 512 bits as w + 128 (an xor
 * of the sign bit) with 128 * sum(x) subtracted like a zero point.
 *
 * No product or pair sum can saturate: codes are at most 15 (127 for |int8|, 12 for twice
 * an FP4 value) and activations at most 127 in magnitude, so a vpmaddubsw pair sum is at
 * most 2 * 127 * 127 < 2^15; int8 weights never add two pairs in int16.
 *
 * The activations are stored in the order each block's codes come out of the unpacking
 * (em_x8_order), the same for every instruction set, so no code is ever permuted.
 */
#include "em_common.h"

/* ------------------------------------------------------------------ activation order */

/* Position i of a stored activation block holds activation ord[i] of the block:
 *   4-bit:  q0..15, q32..47, q16..31, q48..63 (low nibbles of both halves, then high)
 *   3-bit:  q0, q16, q1, q17, ..., q15, q31, then q32, q48, ..., q47, q63 (12-bit fields
 *           split into byte pairs)
 *   2-bit, 8-bit: natural order
 *   MXFP4 (bits 1 here, 32-blocks): even elements, then odd ones (low nibbles, high). */
static void x8_order(int bits, int B, uint8_t *ord) {
    for (int i = 0; i < B; i++) {
        int k = i;
        if (bits == 4)
            k = i < 16 ? i : i < 32 ? i + 16 : i < 48 ? i - 16 : i;
        else if (bits == 3)
            k = i < 32 ? i / 2 + 16 * (i % 2) : 32 + (i - 32) / 2 + 16 * (i % 2);
        else if (bits == 1)
            k = i < 16 ? 2 * i : 2 * (i - 16) + 1;
        ord[i] = (uint8_t)k;
    }
}

/* Exported for the tests: the order above (bits 1 = MXFP4), B entries. */
int EM_API(x8_order)(int bits, int B, uint8_t *ord) {
    if (B != 64 && B != 32) return -3;
    x8_order(bits, B, ord);
    return 0;
}

/* round half to even for |v| < 2^22 (ISO C: no contraction, no reassociation) */
static inline float em_rne(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* x (M, K) -> xq (M, Kp) int8 in block order, xs (M, Kp / B) block scales, and, when xsum
 * is given, xsum (M, Kp / G): per weight group, the sum of the dequantized int8 activations. */
static void quantize_x8(const void *x, int dt, int64_t M, int64_t K, int64_t Kp, int B, const uint8_t *ord,
                        int64_t G, int8_t *xq, float *xs, float *xsum, int nthreads) {
    (void)nthreads;
    const int64_t nb = Kp / B;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * K > 65536)
    for (int64_t mb = 0; mb < M * nb; mb++) {
        const int64_t m = mb / nb, k0 = (mb % nb) * B;
        float v[64];
        const int64_t kn = K - k0 < B ? (K - k0 > 0 ? K - k0 : 0) : B;
#ifdef EM_AVX2
        if (kn == B && dt != EM_F16) {
            for (int j = 0; j < B; j += 8) _mm256_storeu_ps(v + j, load8(x, dt, m * K + k0 + j));
        } else
#endif
        {
            for (int j = 0; j < kn; j++) v[j] = load_act(x, dt, m * K + k0 + j);
            for (int j = (int)kn; j < B; j++) v[j] = 0.f;
        }
        float amax = 0.f;
        for (int j = 0; j < B; j++) {
            const float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int8_t *q = xq + m * Kp + k0;
        for (int i = 0; i < B; i++) q[i] = (int8_t)(int)em_rne(v[ord[i]] * inv);
        xs[mb] = amax / 127.f;
    }
    if (!xsum) return;
    const int64_t ng = Kp / G, bpg = G / B;
    for (int64_t mg = 0; mg < M * ng; mg++) {
        const int8_t *q = xq + (mg / ng) * Kp + (mg % ng) * G;
        float s = 0.f;
        for (int64_t i = 0; i < bpg; i++) {
            int isum = 0;
            for (int j = 0; j < B; j++) isum += q[i * B + j];
            s += (float)isum * xs[(mg / ng) * nb + (mg % ng) * bpg + i];
        }
        xsum[mg] = s;
    }
}

/* ------------------------------------------------------------------ unpacking */

#if defined(EM_AVX512)
/* 64 codes as 64 u8 lanes in block order; int8 codes as w + 128. */
static inline __attribute__((always_inline)) __m512i unpack_512(const int bits, const uint8_t *b) {
    if (bits == 8) return _mm512_xor_si512(_mm512_loadu_si512((const void *)b), _mm512_set1_epi8((char)0x80));
    if (bits == 4) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)b), m15 = _mm256_set1_epi8(15);
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m15)),
                                  _mm256_and_si256(_mm256_srli_epi16(v, 4), m15), 1);
    }
    if (bits == 2) {
        const __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)b));
        const __m512i sh = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                            0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
        return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(3));
    }
    /* 3-bit: the sixteen 12-bit fields as int16 lanes (see qmm.c's unpack64), then for the
     * lower half the bytes (f & 7, f >> 3 & 7) and for the upper (f >> 6 & 7, f >> 9). */
    const __m256i pick = _mm256_setr_epi8(0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11,
                                          4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13, 14, 14, 15);
    __m256i v = _mm256_loadu2_m128i((const __m128i *)(b + 8), (const __m128i *)b);
    v = _mm256_shuffle_epi8(v, pick);
    const __m256i u = _mm256_blend_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0fff)), _mm256_srli_epi16(v, 4), 0xaa);
    const __m512i sh = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0006000600060006LL,
                                        0x0006000600060006LL, 0, 0, 0, 0);
    const __m512i U = _mm512_srlv_epi16(_mm512_broadcast_i64x4(u), sh);
    return _mm512_or_si512(_mm512_and_si512(U, _mm512_set1_epi16(0x0007)),
                           _mm512_and_si512(_mm512_slli_epi16(U, 5), _mm512_set1_epi16(0x0700)));
}
#endif

#if defined(EM_AVX2)
/* 64 codes as two vectors of 32 u8 lanes in block order (int8: the signed codes). */
static inline __attribute__((always_inline)) void unpack_256(const int bits, const uint8_t *b, __m256i w[2]) {
    if (bits == 8) {
        w[0] = _mm256_loadu_si256((const __m256i *)b);
        w[1] = _mm256_loadu_si256((const __m256i *)(b + 32));
        return;
    }
    if (bits == 4) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)b), m15 = _mm256_set1_epi8(15);
        w[0] = _mm256_and_si256(v, m15);
        w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
        return;
    }
    if (bits == 2) { /* shifting 32-bit lanes is exact here: each byte is masked to its own 2 bits */
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b)), m3 = _mm256_set1_epi8(3);
        w[0] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), m3);
        w[1] = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), m3);
        return;
    }
    const __m256i pick = _mm256_setr_epi8(0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11,
                                          4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13, 14, 14, 15);
    __m256i v = _mm256_loadu2_m128i((const __m128i *)(b + 8), (const __m128i *)b);
    v = _mm256_shuffle_epi8(v, pick);
    const __m256i u = _mm256_blend_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0fff)), _mm256_srli_epi16(v, 4), 0xaa);
    const __m256i m7 = _mm256_set1_epi16(0x0007), m700 = _mm256_set1_epi16(0x0700);
    const __m256i u6 = _mm256_srli_epi16(u, 6);
    w[0] = _mm256_or_si256(_mm256_and_si256(u, m7), _mm256_and_si256(_mm256_slli_epi16(u, 5), m700));
    w[1] = _mm256_or_si256(_mm256_and_si256(u6, m7), _mm256_and_si256(_mm256_slli_epi16(u6, 5), m700));
}

/* int32 lanes += dot products of 4 (u8 w, s8 x) pairs */
static inline __attribute__((always_inline)) __m256i dot_u8s8(__m256i acc, __m256i w, __m256i x) {
#ifdef EM_VNNI
    return EM_DPBUSD(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}
#endif

#if defined(EM_NEON)
/* 3-bit: two vectors of eight 12-bit fields (fields 0-7 and 8-15) */
static inline __attribute__((always_inline)) uint8x16_t split3(uint16x8_t u) {
    return vreinterpretq_u8_u16(vorrq_u16(vandq_u16(u, vdupq_n_u16(7)), vandq_u16(vshlq_n_u16(u, 5), vdupq_n_u16(0x700))));
}

/* 64 codes as four vectors of 16 s8 lanes in block order. */
static inline __attribute__((always_inline)) void unpack_neon(const int bits, const uint8_t *b, int8x16_t w[4]) {
    if (bits == 8) {
        for (int t = 0; t < 4; t++) w[t] = vld1q_s8((const int8_t *)b + 16 * t);
        return;
    }
    if (bits == 4) {
        const uint8x16_t v0 = vld1q_u8(b), v1 = vld1q_u8(b + 16), m15 = vdupq_n_u8(15);
        w[0] = vreinterpretq_s8_u8(vandq_u8(v0, m15));
        w[1] = vreinterpretq_s8_u8(vandq_u8(v1, m15));
        w[2] = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4));
        w[3] = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));
        return;
    }
    if (bits == 2) {
        const uint8x16_t v = vld1q_u8(b), m3 = vdupq_n_u8(3);
        w[0] = vreinterpretq_s8_u8(vandq_u8(v, m3));
        w[1] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), m3));
        w[2] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), m3));
        w[3] = vreinterpretq_s8_u8(vshrq_n_u8(v, 6));
        return;
    }
    static const uint8_t pick[16] = {0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11};
    static const int16_t shr[8] = {0, -4, 0, -4, 0, -4, 0, -4};
    const uint8x16_t p = vld1q_u8(pick);
    const int16x8_t sh = vld1q_s16(shr);
    const uint16x8_t m = vdupq_n_u16(0x0fff);
    /* fields 0-7 from bytes 0-11, fields 8-15 from bytes 12-23 (bytes 4-15 of a load at b + 8) */
    const uint8x16_t p4 = vaddq_u8(p, vdupq_n_u8(4));
    const uint16x8_t lo = vandq_u16(vshlq_u16(vreinterpretq_u16_u8(vqtbl1q_u8(vld1q_u8(b), p)), sh), m);
    const uint16x8_t hi = vandq_u16(vshlq_u16(vreinterpretq_u16_u8(vqtbl1q_u8(vld1q_u8(b + 8), p4)), sh), m);
    w[0] = vreinterpretq_s8_u8(split3(lo));
    w[1] = vreinterpretq_s8_u8(split3(hi));
    w[2] = vreinterpretq_s8_u8(split3(vshrq_n_u16(lo, 6)));
    w[3] = vreinterpretq_s8_u8(split3(vshrq_n_u16(hi, 6)));
}

/* int32 lanes += dot products of 4 (s8, s8) pairs (sdot), or of pairs widened to int16
 * then pairwise added (portable NEON) */
static inline __attribute__((always_inline)) int32x4_t dot_s8(int32x4_t acc, int8x16_t w, int8x16_t x) {
#ifdef EM_SDOT
    return vdotq_s32(acc, w, x);
#else
    int16x8_t p = vmull_s8(vget_low_s8(w), vget_low_s8(x));
    p = vmlal_high_s8(p, w, x);
    return vpadalq_s16(acc, p);
#endif
}
#endif

/* Portable: 64 codes in block order (x8_order; int8 codes signed), so the dot product
 * below is a plain loop the compiler vectorises. */
static inline void unpack64_ordered(int bits, const uint8_t *b, int8_t w[EM_BLOCK]) {
    if (bits == 8) {
        memcpy(w, b, EM_BLOCK);
    } else if (bits == 4) {
        for (int i = 0; i < 32; i++) w[i] = (int8_t)(b[i] & 15), w[32 + i] = (int8_t)(b[i] >> 4);
    } else if (bits == 3) {
        for (int i = 0; i < 8; i++) {
            const uint32_t v = b[3 * i] | (uint32_t)b[3 * i + 1] << 8 | (uint32_t)b[3 * i + 2] << 16;
            for (int h = 0; h < 2; h++) { /* field j = 2i + h */
                const uint32_t f = (v >> (12 * h)) & 0xfff;
                const int j = 2 * i + h;
                w[2 * j] = (int8_t)(f & 7), w[2 * j + 1] = (int8_t)((f >> 3) & 7);
                w[32 + 2 * j] = (int8_t)((f >> 6) & 7), w[33 + 2 * j] = (int8_t)(f >> 9);
            }
        }
    } else {
        for (int t = 0; t < 4; t++)
            for (int j = 0; j < 16; j++) w[16 * t + j] = (int8_t)((b[j] >> (2 * t)) & 3);
    }
}

/* ------------------------------------------------------------------ one weight row */

/* Offset the int8 codes are computed with (w + 128 on 512 bits, see unpack_512). */
#if defined(EM_AVX512)
#define EM_I8_OFF 128.f
#else
#define EM_I8_OFF 0.f
#endif

typedef struct {
    const int8_t *xq;   /* (MR rows, ldq) activations in block order */
    int64_t ldq;
    const float *xs;    /* (MR rows, ldxs) block scales */
    int64_t ldxs;
    const float *xsum;  /* (MR rows, ng) group sums */
} x8_t;

#define EM_CH 64 /* blocks whose combined scales are computed together (4096 weights) */

/* out[i] = scale of block b0 + i (group (b0 + i) / bpg) * xs[b0 + i], for blocks [b0, b1). */
static inline void block_scales(const void *srow, int sdt, int64_t sstep, int64_t bpg, int64_t b0, int64_t b1,
                                const float *xs, float *out) {
    const int64_t n = b1 - b0;
    if (sstep == 0) { /* one scale for the row */
        const float s = load_act(srow, sdt, 0);
        for (int64_t i = 0; i < n; i++) out[i] = s * xs[b0 + i];
        return;
    }
    if (bpg == 1 && sdt == EM_F16) {
        const uint16_t *s16 = (const uint16_t *)srow + b0;
        int64_t i = 0;
#ifdef EM_AVX2
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s16 + i))),
                                                    _mm256_loadu_ps(xs + b0 + i)));
#elif defined(EM_NEON)
        for (; i + 4 <= n; i += 4)
            vst1q_f32(out + i, vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s16 + i))), vld1q_f32(xs + b0 + i)));
#endif
        for (; i < n; i++) out[i] = f16_to_f32(s16[i]) * xs[b0 + i];
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = load_act(srow, sdt, ((b0 + i) / bpg) * sstep) * xs[b0 + i];
}

/* sum over groups of zt_g * xsum[g]: zt the group's zero (asymmetric) or -off * scale. */
static inline float row_corr(const void *srow, int sdt, int64_t sstep, const uint16_t *zrow, int64_t ng, float off,
                             const float *xsum) {
    if (!zrow && off == 0.f) return 0.f;
    if (sstep == 0) {
        float t = 0.f;
        for (int64_t g = 0; g < ng; g++) t += xsum[g];
        return -off * load_act(srow, sdt, 0) * t;
    }
    const uint16_t *v = zrow ? zrow : (const uint16_t *)srow; /* fp16 zeros, or fp16 scales */
    const float f = zrow ? 1.f : -off;
    if (!zrow && sdt != EM_F16) {
        float t = 0.f;
        for (int64_t g = 0; g < ng; g++) t += load_act(srow, sdt, g) * xsum[g];
        return f * t;
    }
    int64_t g = 0;
    float t = 0.f;
#ifdef EM_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; g + 8 <= ng; g += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + g))), _mm256_loadu_ps(xsum + g), acc);
    t = hsum8(acc);
#elif defined(EM_NEON)
    float32x4_t acc = vdupq_n_f32(0.f);
    for (; g + 4 <= ng; g += 4) acc = vfmaq_f32(acc, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(v + g))), vld1q_f32(xsum + g));
    t = vaddvq_f32(acc);
#endif
    for (; g < ng; g++) t += f16_to_f32(v[g]) * xsum[g];
    return f * t;
}

/* res[m] = sum_k W[n, k] x[m, k] for MR activation rows, one weight row n. The weight scale
 * of group g is srow[g * sstep] (sstep 0: one scale for the row); off: the symmetric grid
 * centre ((2^b - 1) / 2; int8: 0). Per chunk of EM_CH blocks the combined scales
 * scale_w * xs are computed first, vectorised, so the inner loop per block and row is a
 * load, the integer dot product, a convert and one fmadd with a broadcast from memory. */
static inline __attribute__((always_inline)) void row_dot8(const int bits, const int MR, const uint8_t *wrow,
                                                           const void *srow, int sdt, int64_t sstep,
                                                           const uint16_t *zrow, int64_t ng, int64_t bpg,
                                                           const x8_t *X, float off, float *res) {
    const int64_t bb = 8 * bits, nb = ng * bpg; /* bytes per block, blocks per row */
    if (bits == 8) off = EM_I8_OFF;
    const int8_t *xq = X->xq;
    float sc[EM_MR][EM_CH] __attribute__((aligned(64)));
#if defined(EM_AVX512)
    /* two accumulators per row, swapped after every block: consecutive blocks' fmadds do
     * not wait on each other (at batch 1 one chain would bound the row at 4 cycles a block) */
    __m512 facc[EM_MR], fb[EM_MR];
    for (int m = 0; m < MR; m++) facc[m] = fb[m] = _mm512_setzero_ps();
#elif defined(EM_AVX2)
    __m256 facc[EM_MR], fb[EM_MR];
    for (int m = 0; m < MR; m++) facc[m] = fb[m] = _mm256_setzero_ps();
#elif defined(EM_NEON)
    float32x4_t facc[EM_MR], fb[EM_MR];
    for (int m = 0; m < MR; m++) facc[m] = fb[m] = vdupq_n_f32(0.f);
#else
    float facc[EM_MR];
    for (int m = 0; m < MR; m++) facc[m] = 0.f;
#endif
    for (int64_t b0 = 0; b0 < nb; b0 += EM_CH) {
        const int64_t b1 = b0 + EM_CH < nb ? b0 + EM_CH : nb;
        for (int m = 0; m < MR; m++) block_scales(srow, sdt, sstep, bpg, b0, b1, X->xs + m * X->ldxs, sc[m]);
        for (int64_t blk = b0; blk < b1; blk++) {
            const uint8_t *wb = wrow + blk * bb;
#if defined(EM_AVX512)
            const __m512i w = unpack_512(bits, wb);
            for (int m = 0; m < MR; m++) {
                const __m512i x = _mm512_loadu_si512((const void *)(xq + m * X->ldq + blk * EM_BLOCK));
                const __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
                facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(sc[m][blk - b0]), facc[m]);
            }
            for (int m = 0; m < MR; m++) {
                const __m512 t = facc[m];
                facc[m] = fb[m], fb[m] = t;
            }
#elif defined(EM_AVX2)
            __m256i w[2];
            unpack_256(bits, wb, w);
            __m256i a0 = w[0], a1 = w[1];
            if (bits == 8) a0 = _mm256_abs_epi8(w[0]), a1 = _mm256_abs_epi8(w[1]);
            for (int m = 0; m < MR; m++) {
                const int8_t *xm = xq + m * X->ldq + blk * EM_BLOCK;
                __m256i x0 = _mm256_loadu_si256((const __m256i *)xm);
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xm + 32));
                __m256i acc;
                if (bits == 8) { /* |w| x sign(x, w) */
                    x0 = _mm256_sign_epi8(x0, w[0]), x1 = _mm256_sign_epi8(x1, w[1]);
                    acc = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), a0, x0), a1, x1);
                } else {
#ifdef EM_VNNI
                    acc = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), a0, x0), a1, x1);
#else /* codes <= 15: the two int16 pair sums add without saturating */
                    acc = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(a0, x0), _mm256_maddubs_epi16(a1, x1)),
                                            _mm256_set1_epi16(1));
#endif
                }
                facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(sc[m][blk - b0]), facc[m]);
            }
            for (int m = 0; m < MR; m++) {
                const __m256 t = facc[m];
                facc[m] = fb[m], fb[m] = t;
            }
#elif defined(EM_NEON)
            int8x16_t w[4];
            unpack_neon(bits, wb, w);
            for (int m = 0; m < MR; m++) {
                const int8_t *xm = xq + m * X->ldq + blk * EM_BLOCK;
                int32x4_t acc = vdupq_n_s32(0);
                for (int t = 0; t < 4; t++) acc = dot_s8(acc, w[t], vld1q_s8(xm + 16 * t));
                facc[m] = vfmaq_n_f32(facc[m], vcvtq_f32_s32(acc), sc[m][blk - b0]);
            }
            for (int m = 0; m < MR; m++) {
                const float32x4_t t = facc[m];
                facc[m] = fb[m], fb[m] = t;
            }
#else
            int8_t w[EM_BLOCK];
            unpack64_ordered(bits, wb, w);
            for (int m = 0; m < MR; m++) {
                const int8_t *xm = xq + m * X->ldq + blk * EM_BLOCK;
                int32_t t = 0;
                for (int j = 0; j < EM_BLOCK; j++) t += (int32_t)w[j] * xm[j];
                facc[m] += (float)t * sc[m][blk - b0];
            }
#endif
        }
    }
    for (int m = 0; m < MR; m++) {
        const float corr = row_corr(srow, sdt, sstep, zrow, ng, off, X->xsum + m * ng);
#if defined(EM_AVX512)
        res[m] = _mm512_reduce_add_ps(_mm512_add_ps(facc[m], fb[m])) + corr;
#elif defined(EM_AVX2)
        res[m] = hsum8(_mm256_add_ps(facc[m], fb[m])) + corr;
#elif defined(EM_NEON)
        res[m] = vaddvq_f32(vaddq_f32(facc[m], fb[m])) + corr;
#else
        res[m] = facc[m] + corr;
#endif
    }
}

typedef void (*row8_fn)(const uint8_t *wrow, const void *srow, int sdt, int64_t sstep, const uint16_t *zrow,
                        int64_t ng, int64_t bpg, const x8_t *X, float off, float *res);

#define EM_ROW8(B, R)                                                                                          \
    static void row8_b##B##_m##R(const uint8_t *wrow, const void *srow, int sdt, int64_t sstep,                \
                                 const uint16_t *zrow, int64_t ng, int64_t bpg, const x8_t *X, float off,      \
                                 float *res) {                                                                 \
        row_dot8(B, R, wrow, srow, sdt, sstep, zrow, ng, bpg, X, off, res);                                    \
    }
EM_ROW8(2, 1) EM_ROW8(2, 2) EM_ROW8(2, 3) EM_ROW8(2, 4)
EM_ROW8(3, 1) EM_ROW8(3, 2) EM_ROW8(3, 3) EM_ROW8(3, 4)
EM_ROW8(4, 1) EM_ROW8(4, 2) EM_ROW8(4, 3) EM_ROW8(4, 4)
EM_ROW8(8, 1) EM_ROW8(8, 2) EM_ROW8(8, 3) EM_ROW8(8, 4)

static const row8_fn ROWS8[4][EM_MR] = {
    {row8_b2_m1, row8_b2_m2, row8_b2_m3, row8_b2_m4},
    {row8_b3_m1, row8_b3_m2, row8_b3_m3, row8_b3_m4},
    {row8_b4_m1, row8_b4_m2, row8_b4_m3, row8_b4_m4},
    {row8_b8_m1, row8_b8_m2, row8_b8_m3, row8_b8_m4},
};

/* ------------------------------------------------------------------ entry points */

/* em_qmm with int8 activations: same arguments, layouts and return codes (see qmm.c). */
int EM_API(qmm8)(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt,
                 int per_row, const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt,
                 int nthreads) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return -2;
    if (G <= 0 || G % EM_BLOCK || G > 8192 || Kp % G || K > Kp) return -3;
    if (bits == 8 && (!per_row || zero)) return -3;
    const int64_t ng = Kp / G, bpg = G / EM_BLOCK, nb = Kp / EM_BLOCK, row_bytes = Kp * bits / 8;
    const float off = bits == 8 ? 0.f : (float)((1 << bits) - 1) / 2.f;
    const int64_t srow_len = per_row ? 1 : ng, sstep = per_row ? 0 : 1;
    const size_t ssize = sdt == EM_F32 ? 4 : 2;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((M * Kp + 63) / 64 * 64));
    float *xs = (float *)malloc((size_t)(M * nb + 1) * sizeof(float));
    float *xsum = (float *)malloc((size_t)(M * ng + 1) * sizeof(float));
    if (!xq || !xs || !xsum) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    uint8_t ord[EM_BLOCK];
    x8_order(bits, EM_BLOCK, ord);
    quantize_x8(x, xdt, M, K, Kp, EM_BLOCK, ord, G, xq, xs, xsum, nthreads);
    const int64_t nblk = (N + EM_NB - 1) / EM_NB;
#pragma omp parallel for schedule(guided) num_threads(nthreads) if (N * Kp * M >= EM_PAR_MIN)
    for (int64_t ib = 0; ib < nblk; ib++) {
        const int64_t n0 = ib * EM_NB, n1 = n0 + EM_NB < N ? n0 + EM_NB : N;
        for (int64_t m0 = 0; m0 < M; m0 += EM_MR) {
            const int mr = M - m0 < EM_MR ? (int)(M - m0) : EM_MR;
            const row8_fn fn = ROWS8[bits == 8 ? 3 : bits - 2][mr - 1];
            const x8_t X = {xq + m0 * Kp, Kp, xs + m0 * nb, nb, xsum + m0 * ng};
            for (int64_t n = n0; n < n1; n++) {
                float r[EM_MR];
                fn(w + n * row_bytes, (const char *)scale + n * srow_len * ssize, sdt, sstep,
                   zero ? zero + n * ng : NULL, ng, bpg, &X, off, r);
                for (int i = 0; i < mr; i++) store_out(y, ydt, (m0 + i) * N + n, r[i]);
            }
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

/* ------------------------------------------------------------------ MXFP4 */

/* Twice the E2M1 values: small integers, so a code decodes with one byte shuffle. */
static const int8_t EM_FP4X2_8[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

static inline __attribute__((always_inline)) void mx_row_dot8(const int MR, const uint8_t *wrow, const uint8_t *erow,
                                                              int64_t ng, const int8_t *xq, int64_t ldq,
                                                              const float *xs, int64_t ldxs, const float *pw,
                                                              float *res) {
#if defined(EM_AVX2)
    const __m128i lut = _mm_loadu_si128((const __m128i *)EM_FP4X2_8), m15 = _mm_set1_epi8(15);
    __m256 facc[EM_MR];
    for (int m = 0; m < MR; m++) facc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(wrow + 16 * g));
        const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, m15));
        const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m15));
        const __m256i w = _mm256_set_m128i(hi, lo), a = _mm256_abs_epi8(w);
        const float s = pw[erow[g]];
        for (int m = 0; m < MR; m++) {
            const __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + m * ldq + 32 * g)), w);
            const __m256i acc = dot_u8s8(_mm256_setzero_si256(), a, x);
            facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s * xs[m * ldxs + g]), facc[m]);
        }
    }
    for (int m = 0; m < MR; m++) res[m] = hsum8(facc[m]);
#elif defined(EM_NEON)
    const int8x16_t lut = vld1q_s8(EM_FP4X2_8);
    const uint8x16_t m15 = vdupq_n_u8(15);
    float32x4_t facc[EM_MR];
    for (int m = 0; m < MR; m++) facc[m] = vdupq_n_f32(0.f);
    for (int64_t g = 0; g < ng; g++) {
        const uint8x16_t v = vld1q_u8(wrow + 16 * g);
        const int8x16_t lo = vqtbl1q_s8(lut, vandq_u8(v, m15)), hi = vqtbl1q_s8(lut, vshrq_n_u8(v, 4));
        const float s = pw[erow[g]];
        for (int m = 0; m < MR; m++) {
            const int8_t *xm = xq + m * ldq + 32 * g;
            const int32x4_t acc = dot_s8(dot_s8(vdupq_n_s32(0), lo, vld1q_s8(xm)), hi, vld1q_s8(xm + 16));
            facc[m] = vfmaq_n_f32(facc[m], vcvtq_f32_s32(acc), s * xs[m * ldxs + g]);
        }
    }
    for (int m = 0; m < MR; m++) res[m] = vaddvq_f32(facc[m]);
#else
    for (int m = 0; m < MR; m++) res[m] = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *b = wrow + 16 * g;
        const float s = pw[erow[g]];
        for (int m = 0; m < MR; m++) {
            const int8_t *xm = xq + m * ldq + 32 * g;
            int32_t t = 0;
            for (int j = 0; j < 16; j++) t += EM_FP4X2_8[b[j] & 15] * xm[j] + EM_FP4X2_8[b[j] >> 4] * xm[16 + j];
            res[m] += (float)t * (s * xs[m * ldxs + g]);
        }
    }
#endif
}

typedef void (*mx_row8_fn)(const uint8_t *, const uint8_t *, int64_t, const int8_t *, int64_t, const float *, int64_t,
                           const float *, float *);
#define EM_MX_ROW8(R)                                                                                             \
    static void mx_row8_m##R(const uint8_t *wrow, const uint8_t *erow, int64_t ng, const int8_t *xq, int64_t ldq, \
                             const float *xs, int64_t ldxs, const float *pw, float *res) {                        \
        mx_row_dot8(R, wrow, erow, ng, xq, ldq, xs, ldxs, pw, res);                                               \
    }
EM_MX_ROW8(1) EM_MX_ROW8(2) EM_MX_ROW8(3) EM_MX_ROW8(4)
static const mx_row8_fn MX_ROWS8[EM_MR] = {mx_row8_m1, mx_row8_m2, mx_row8_m3, mx_row8_m4};

/* em_mxfp4_mm with int8 activations (one scale per 32-block): same arguments and codes. */
int EM_API(mxfp4_mm8)(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *blocks, const uint8_t *scales,
                      int64_t N, int64_t G, void *y, int ydt, int nthreads) {
    if (G != (K + 31) / 32 || M < 0 || N < 0) return -3;
    const int64_t Kp = G * 32;
    float pw[256]; /* 2^(e - 128): the factor of twice an FP4 value; 255 is NaN */
    for (int e = 0; e < 255; e++) pw[e] = ldexpf(0.5f, e - 127);
    pw[255] = NAN;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)((M * Kp + 63) / 64 * 64));
    float *xs = (float *)malloc((size_t)(M * G + 1) * sizeof(float));
    if (!xq || !xs) {
        free(xq), free(xs);
        return -1;
    }
    uint8_t ord[32];
    x8_order(1, 32, ord);
    quantize_x8(x, xdt, M, K, Kp, 32, ord, 0, xq, xs, NULL, nthreads);
    const int64_t nblk = (N + EM_NB - 1) / EM_NB;
#pragma omp parallel for schedule(guided) num_threads(nthreads) if (N * Kp * M >= EM_PAR_MIN)
    for (int64_t ib = 0; ib < nblk; ib++) {
        const int64_t n0 = ib * EM_NB, n1 = n0 + EM_NB < N ? n0 + EM_NB : N;
        for (int64_t m0 = 0; m0 < M; m0 += EM_MR) {
            const int mr = M - m0 < EM_MR ? (int)(M - m0) : EM_MR;
            for (int64_t n = n0; n < n1; n++) {
                float r[EM_MR];
                MX_ROWS8[mr - 1](blocks + n * G * 16, scales + n * G, G, xq + m0 * Kp, Kp, xs + m0 * G, G, pw, r);
                for (int i = 0; i < mr; i++) store_out(y, ydt, (m0 + i) * N + n, r[i]);
            }
        }
    }
    free(xq), free(xs);
    return 0;
}

/* ------------------------------------------------------------------ one expert, one call */

enum { EM_ACT_SILU = 0, EM_ACT_GELU = 1, EM_ACT_GELU_TANH = 2, EM_ACT_RELU = 3 };

static inline float em_act(int act, float g) {
    switch (act) {
    case EM_ACT_GELU:
        return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
    case EM_ACT_GELU_TANH:
        return 0.5f * g * (1.f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));
    case EM_ACT_RELU:
        return g > 0.f ? g : 0.f;
    default:
        return g / (1.f + expf(-g));
    }
}

/* A gated expert in one call, int8 activations throughout:
 *     h = x @ W13^T (M, 2I), a = act(h[:, :I]) * h[:, I:], y = a @ W2^T (M, H).
 * d13 and d2 describe the two matrices as em_qmm takes them, as int64:
 * {codes, scale, zero (0: none), scale dtype, per_row, Kp, bits, G}. One fp32 scratch of
 * M * 3I floats per call; the OpenMP threads are the persistent pool of libgomp. Returns
 * em_qmm's codes, or -4 for an unknown activation. */
int EM_API(expert8)(const void *x, int xdt, int64_t M, int64_t H, int64_t I, const int64_t *d13, const int64_t *d2,
                    int act, void *y, int ydt, int nthreads) {
    if (act < EM_ACT_SILU || act > EM_ACT_RELU) return -4;
    float *h = (float *)malloc((size_t)(M * 3 * I + 1) * sizeof(float));
    if (!h) return -1;
    float *a = h + M * 2 * I;
    int rc = EM_API(qmm8)(x, xdt, M, H, (const uint8_t *)(intptr_t)d13[0], (const void *)(intptr_t)d13[1],
                          (int)d13[3], (int)d13[4], (const uint16_t *)(intptr_t)d13[2], 2 * I, d13[5], (int)d13[6],
                          d13[7], h, EM_F32, nthreads);
    if (rc == 0) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < I; i++) a[m * I + i] = em_act(act, h[m * 2 * I + i]) * h[m * 2 * I + I + i];
        rc = EM_API(qmm8)(a, EM_F32, M, I, (const uint8_t *)(intptr_t)d2[0], (const void *)(intptr_t)d2[1], (int)d2[3],
                          (int)d2[4], (const uint16_t *)(intptr_t)d2[2], H, d2[5], (int)d2[6], d2[7], y, ydt, nthreads);
    }
    free(h);
    return rc;
}
