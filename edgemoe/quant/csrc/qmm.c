/*
 * edgemoe: matmul on quantized weights, and the group-wise quantizer, for CPUs.
 *
 * y (M, N) = x (M, K) @ W^T with W (N, K) either
 *   - 2/3/4-bit codes packed with no wasted bits, one fp16 scale (and, asymmetric, one fp16
 *     zero) per group of G weights along K; layout in edgemoe/quant/quantize.py, every row
 *     Kp = ceil(K / G) * G codes long; or
 *   - int8 codes (N, K) with one scale per row: the layout torch's _weight_int8pack_mm reads;
 * and the MXFP4 (FP4 codes, one power of two per 32 weights) matmul of gpt-oss experts,
 * which keeps the activations in fp32 (see em_mxfp4_mm).
 *
 * How it computes: x is quantized per call to int16 with one fp32 scale per group of G
 * (relative error ~1e-5, far below the bf16 rounding of the activations themselves), so
 * the inner loop is integer: widen 16 packed bytes to 16 int16 lanes, shift and mask out
 * 16 codes, multiply-add pairs against the int16 activations into int32 (vpmaddwd), and
 * once per group fold the int32 sums into fp32 with scale_w * scale_x. The zero point is
 * applied once per group through the sum of that group's activations:
 *     sum_k (s q_k + z) x_k = s * sum_k q_k x_k + z * sum_k x_k.
 * Codes are never expanded to floats, so 2- and 3-bit rows cost about as much compute per
 * weight as 4-bit rows while reading 2/4 and 3/4 of the bytes.
 *
 * This is the int16-activation path ("int16"); qmm8.c has the int8-activation one.
 *
 * Built at first use by edgemoe/quant/native.py, once per instruction-set variant
 * (em_common.h), and called through ctypes via dispatch.c; no Python or torch headers.
 * OpenMP resolves to the libgomp torch already loaded (same soname), so the threads are
 * torch's own pool. Without AVX2 the same algorithm runs as plain C.
 */
#include "em_common.h"

/* ------------------------------------------------------------------ activations */


/* x (M, K) -> xq (M, Kp) int16 (zero padded), xs (M, ng) group scales, xsum (M, ng) sums of
 * the dequantized activations of each group (for the zero-point term). */
static void quantize_x(const void *x, int dt, int64_t M, int64_t K, int64_t Kp, int64_t G, int16_t *xq,
                       float *xs, float *xsum, int nthreads) {
    (void)nthreads; /* unused without OpenMP */
    const int64_t ng = Kp / G;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * K > 65536)
    for (int64_t mg = 0; mg < M * ng; mg++) {
        const int64_t m = mg / ng, g = mg % ng, k0 = g * G;
        const int64_t k1 = k0 + G < K ? k0 + G : K;
#ifdef EM_AVX2
        if (k1 - k0 == G && dt != EM_F16) { /* whole group: vectorised (G is a multiple of 64) */
            float tmp[8];
            __m256 vmax = _mm256_setzero_ps();
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            for (int64_t k = k0; k < k1; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8(x, dt, m * K + k), absmask));
            _mm256_storeu_ps(tmp, vmax);
            float amax = 0.f;
            for (int i = 0; i < 8; i++) amax = tmp[i] > amax ? tmp[i] : amax;
            const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
            __m256i isum = _mm256_setzero_si256();
            int16_t *q = xq + m * Kp;
            for (int64_t k = k0; k < k1; k += 16) {
                /* cvtps rounds to nearest even, like lrintf below */
                __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, dt, m * K + k), inv));
                __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, dt, m * K + k + 8), inv));
                isum = _mm256_add_epi32(isum, _mm256_add_epi32(a, b));
                /* packs works per 128-bit half; permute restores k order */
                __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
                _mm256_storeu_si256((__m256i *)(q + k), p);
            }
            int32_t is[8];
            _mm256_storeu_si256((__m256i *)is, isum);
            int64_t s = 0;
            for (int i = 0; i < 8; i++) s += is[i];
            xs[mg] = amax / 32767.f;
            xsum[mg] = (float)s * (amax / 32767.f);
            continue;
        }
#endif
        float amax = 0.f;
        for (int64_t k = k0; k < k1; k++) {
            float v = fabsf(load_act(x, dt, m * K + k));
            amax = v > amax ? v : amax;
        }
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        int16_t *q = xq + m * Kp;
        int64_t isum = 0;
        for (int64_t k = k0; k < k1; k++) {
            int v = (int)lrintf(load_act(x, dt, m * K + k) * inv);
            q[k] = (int16_t)v;
            isum += v;
        }
        for (int64_t k = k1 > k0 ? k1 : k0; k < k0 + G; k++) q[k] = 0;
        xs[mg] = amax / 32767.f;
        xsum[mg] = (float)isum * (amax / 32767.f);
    }
}

/* ------------------------------------------------------------------ unpacking */

/* One block of 64 codes as int16, in order (portable reference, also used by dequant). */
static inline void unpack64_scalar(int bits, const uint8_t *b, int16_t w[EM_BLOCK]) {
    if (bits == 8) {
        for (int j = 0; j < EM_BLOCK; j++) w[j] = (int8_t)b[j];
    } else if (bits == 4) {
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 16; j++) {
                w[32 * h + j] = b[16 * h + j] & 15;
                w[32 * h + 16 + j] = b[16 * h + j] >> 4;
            }
    } else if (bits == 3) {
        for (int i = 0; i < 8; i++) {
            const uint32_t v = b[3 * i] | (uint32_t)b[3 * i + 1] << 8 | (uint32_t)b[3 * i + 2] << 16;
            for (int t = 0; t < 4; t++) {
                w[16 * t + 2 * i] = (v >> (3 * t)) & 7;
                w[16 * t + 2 * i + 1] = (v >> (12 + 3 * t)) & 7;
            }
        }
    } else {
        for (int j = 0; j < 16; j++)
            for (int t = 0; t < 4; t++) w[16 * t + j] = (b[j] >> (2 * t)) & 3;
    }
}

#ifdef EM_AVX2
/* Eight floats to bf16, lane for lane what f32_to_bf16 gives: round to nearest even on
 * the integer bits, NaN made quiet. */
static inline __m128i bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v), one = _mm256_set1_epi32(1);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i o = _mm256_blendv_epi8(r, q, nan); /* (8,) int32 in [0, 0xffff] */
    /* packus works per 128-bit half: (o0-3, o0-3 | o4-7, o4-7); keep quadwords 0 and 2 */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(o, o), 0x08));
}

/* One block of 64 codes as four vectors of 16 int16 lanes: w[t] lane j = code 16t + j. */
static inline __attribute__((always_inline)) void unpack64(const int bits, const uint8_t *b, __m256i w[4]) {
    if (bits == 8) { /* signed bytes, in order */
        for (int t = 0; t < 4; t++) w[t] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 16 * t)));
        return;
    }
    if (bits == 4) {
        const __m256i m15 = _mm256_set1_epi16(15);
        __m256i v0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)b));
        __m256i v1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(b + 16)));
        w[0] = _mm256_and_si256(v0, m15);
        w[1] = _mm256_srli_epi16(v0, 4);
        w[2] = _mm256_and_si256(v1, m15);
        w[3] = _mm256_srli_epi16(v1, 4);
        return;
    }
    if (bits == 3) {
        /* 24 bytes = 16 little-endian 12-bit fields, two per 3 bytes; field j holds the
         * codes 16t + j at bits 3t. Bytes 0-11 feed lanes 0-7 and bytes 12-23 lanes 8-15:
         * load both halves (the upper from b + 8, so field 8 starts at its byte 4), pick
         * the two bytes of each field with a shuffle, then mask even lanes and shift odd. */
        const __m256i pick = _mm256_setr_epi8(0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 7, 8, 9, 10, 10, 11,
                                              4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13, 14, 14, 15);
        const __m256i m7 = _mm256_set1_epi16(7);
        __m256i v = _mm256_loadu2_m128i((const __m128i *)(b + 8), (const __m128i *)b);
        v = _mm256_shuffle_epi8(v, pick);
        __m256i u = _mm256_blend_epi16(_mm256_and_si256(v, _mm256_set1_epi16(0x0fff)), _mm256_srli_epi16(v, 4), 0xaa);
        w[0] = _mm256_and_si256(u, m7);
        w[1] = _mm256_and_si256(_mm256_srli_epi16(u, 3), m7);
        w[2] = _mm256_and_si256(_mm256_srli_epi16(u, 6), m7);
        w[3] = _mm256_srli_epi16(u, 9);
        return;
    }
    const __m256i m3 = _mm256_set1_epi16(3);
    __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)b));
    w[0] = _mm256_and_si256(v, m3);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3);
    w[3] = _mm256_srli_epi16(v, 6);
}

/* A block of 64 codes (unpack64's int16 lanes, codes < 16) dequantized to bf16: the at
 * most 16 values s * c + z of the block are computed once, as the float path computes
 * each weight (one fused multiply-add, then bf16x8), and every code looks its value up:
 * the bits of the per-weight path, 3x faster (edgemoe_lab/results/prefill_profile.md). */
static inline __attribute__((always_inline)) void dequant_block_bf16(const __m256i wv[4], float s, float z,
                                                                     uint16_t *o) {
#if defined(__AVX512BW__)
    /* the 16 values in one vector (codes < 16: its undefined upper half is never read);
     * vpermw: one 16-bit lookup per code, 32 codes a vector */
    const __m512 c = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i u = _mm512_castps_si512(_mm512_fmadd_ps(_mm512_set1_ps(s), c, _mm512_set1_ps(z)));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i q = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __m512i tab = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, q)));
    for (int t = 0; t < 4; t += 2) {
        const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(wv[t]), wv[t + 1], 1); /* (32,) codes */
        _mm512_storeu_si512((void *)(o + 16 * t), _mm512_permutexvar_epi16(idx, tab));
    }
#else
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    const __m256 c0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), c8 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
    /* the values of codes 0-7 and 8-15 */
    const __m128i t0 = bf16x8(_mm256_fmadd_ps(vs, c0, vz)), t1 = bf16x8(_mm256_fmadd_ps(vs, c8, vz));
    /* vpshufb looks bytes up: the low and the high bytes of the values, one table each */
    const __m128i m8 = _mm_set1_epi16(0xff);
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_packus_epi16(_mm_and_si128(t0, m8), _mm_and_si128(t1, m8)));
    const __m256i hi = _mm256_broadcastsi128_si256(_mm_packus_epi16(_mm_srli_epi16(t0, 8), _mm_srli_epi16(t1, 8)));
    const __m256i m8w = _mm256_set1_epi16(0xff);
    for (int t = 0; t < 4; t++) { /* an int16 lane c reads byte c of each table (its high byte, 0, is masked) */
        const __m256i l = _mm256_and_si256(_mm256_shuffle_epi8(lo, wv[t]), m8w);
        const __m256i h = _mm256_slli_epi16(_mm256_shuffle_epi8(hi, wv[t]), 8);
        _mm256_storeu_si256((__m256i *)(o + 16 * t), _mm256_or_si256(l, h));
    }
#endif
}
#endif

/* ------------------------------------------------------------------ one weight row */

typedef void (*row_fn)(const uint8_t *wrow, const void *srow, int sdt, int64_t sstep, const uint16_t *zrow,
                       int64_t ng, int64_t bpg, const int16_t *xq, int64_t ldq, const float *xs, const float *xsum,
                       float off, float *res);

/* res[m] = sum_k W[n, k] x[m, k] for MR activation rows, one weight row n. The weight
 * scale of group g is srow[g * sstep] (sstep 0: one scale for the row). */
static inline __attribute__((always_inline)) void row_dot(const int bits, const int MR, const uint8_t *wrow,
                                                          const void *srow, int sdt, int64_t sstep,
                                                          const uint16_t *zrow, int64_t ng, int64_t bpg,
                                                          const int16_t *xq, int64_t ldq, const float *xs,
                                                          const float *xsum, float off, float *res) {
    const int64_t bb = 8 * bits; /* bytes per block */
    float corr[EM_MR];
    for (int m = 0; m < MR; m++) corr[m] = 0.f;
#ifdef EM_AVX2
    __m256 facc[EM_MR];
    for (int m = 0; m < MR; m++) facc[m] = _mm256_setzero_ps();
    const uint8_t *b = wrow;
    const int16_t *xk = xq;
    for (int64_t g = 0; g < ng; g++) {
        /* Two int32 chains for a single row so the adds are not one serial chain. */
        __m256i acc0[EM_MR], acc1[EM_MR];
        for (int m = 0; m < MR; m++) acc0[m] = acc1[m] = _mm256_setzero_si256();
        for (int64_t i = 0; i < bpg; i++, b += bb, xk += EM_BLOCK) {
            __m256i w[4];
            unpack64(bits, b, w);
            for (int m = 0; m < MR; m++) {
                const int16_t *xm = xk + m * ldq;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xm);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xm + 16));
                const __m256i x2 = _mm256_loadu_si256((const __m256i *)(xm + 32));
                const __m256i x3 = _mm256_loadu_si256((const __m256i *)(xm + 48));
#ifdef EM_VNNI
                /* fused multiply-add-accumulate; two chains per row hide its latency */
                acc0[m] = EM_DPWSSD(acc0[m], w[0], x0);
                acc1[m] = EM_DPWSSD(acc1[m], w[1], x1);
                acc0[m] = EM_DPWSSD(acc0[m], w[2], x2);
                acc1[m] = EM_DPWSSD(acc1[m], w[3], x3);
#else
                __m256i p0 = _mm256_madd_epi16(w[0], x0), p1 = _mm256_madd_epi16(w[1], x1);
                __m256i p2 = _mm256_madd_epi16(w[2], x2), p3 = _mm256_madd_epi16(w[3], x3);
                if (MR == 1) {
                    acc0[m] = _mm256_add_epi32(acc0[m], _mm256_add_epi32(p0, p2));
                    acc1[m] = _mm256_add_epi32(acc1[m], _mm256_add_epi32(p1, p3));
                } else { /* one chain per row: 16 registers hold 4 rows' state on AVX2 */
                    acc0[m] = _mm256_add_epi32(acc0[m], _mm256_add_epi32(_mm256_add_epi32(p0, p1),
                                                                         _mm256_add_epi32(p2, p3)));
                }
#endif
            }
        }
        const float s = load_act(srow, sdt, g * sstep);
        const float zt = zrow ? f16_to_f32(zrow[g]) : -off * s;
        for (int m = 0; m < MR; m++) {
#ifdef EM_VNNI
            __m256i a = _mm256_add_epi32(acc0[m], acc1[m]);
#else
            __m256i a = MR == 1 ? _mm256_add_epi32(acc0[m], acc1[m]) : acc0[m];
#endif
            facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(s * xs[m * ng + g]), facc[m]);
            corr[m] += zt * xsum[m * ng + g];
        }
    }
    for (int m = 0; m < MR; m++) res[m] = hsum8(facc[m]) + corr[m];
#else
    float acc[EM_MR];
    int16_t w[EM_BLOCK];
    for (int m = 0; m < MR; m++) acc[m] = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        int32_t ia[EM_MR];
        for (int m = 0; m < MR; m++) ia[m] = 0;
        for (int64_t i = 0; i < bpg; i++) {
            const int64_t blk = g * bpg + i;
            unpack64_scalar(bits, wrow + blk * bb, w);
            for (int m = 0; m < MR; m++) {
                const int16_t *xm = xq + m * ldq + blk * EM_BLOCK;
                int32_t t = 0;
                for (int j = 0; j < EM_BLOCK; j++) t += (int32_t)w[j] * xm[j];
                ia[m] += t;
            }
        }
        const float s = load_act(srow, sdt, g * sstep);
        const float zt = zrow ? f16_to_f32(zrow[g]) : -off * s;
        for (int m = 0; m < MR; m++) {
            acc[m] += (float)ia[m] * (s * xs[m * ng + g]);
            corr[m] += zt * xsum[m * ng + g];
        }
    }
    for (int m = 0; m < MR; m++) res[m] = acc[m] + corr[m];
#endif
}

/* One specialised function per (bits, rows): the compiler unrolls the constant loops. */
#define EM_ROW(B, R)                                                                                        \
    static void row_b##B##_m##R(const uint8_t *wrow, const void *srow, int sdt, int64_t sstep,                \
                                const uint16_t *zrow, int64_t ng, int64_t bpg, const int16_t *xq, int64_t ldq, \
                                const float *xs, const float *xsum, float off, float *res) {                 \
        row_dot(B, R, wrow, srow, sdt, sstep, zrow, ng, bpg, xq, ldq, xs, xsum, off, res);                   \
    }
EM_ROW(2, 1) EM_ROW(2, 2) EM_ROW(2, 3) EM_ROW(2, 4)
EM_ROW(3, 1) EM_ROW(3, 2) EM_ROW(3, 3) EM_ROW(3, 4)
EM_ROW(4, 1) EM_ROW(4, 2) EM_ROW(4, 3) EM_ROW(4, 4)
EM_ROW(8, 1) EM_ROW(8, 2) EM_ROW(8, 3) EM_ROW(8, 4)

static const row_fn ROWS[4][EM_MR] = {
    {row_b2_m1, row_b2_m2, row_b2_m3, row_b2_m4},
    {row_b3_m1, row_b3_m2, row_b3_m3, row_b3_m4},
    {row_b4_m1, row_b4_m2, row_b4_m3, row_b4_m4},
    {row_b8_m1, row_b8_m2, row_b8_m3, row_b8_m4},
};

/* ------------------------------------------------------------------ entry points */

static int check(int bits, int64_t K, int64_t Kp, int64_t G) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return -2;
    if (G <= 0 || G % EM_BLOCK || G > 8192 || Kp % G || K > Kp) return -3;
    return 0;
}

/* y (M, N) = x (M, K) @ dequant(W)^T. Returns 0, or a negative code on bad arguments (-2, -3)
 * or when out of memory (-1).
 *
 * bits 2/3/4: unsigned codes, fp16 scale (sdt EM_F16) and zero per group of G (per_row 0).
 * bits 8: signed int8 codes (N, K), one scale per row of dtype sdt (per_row 1), no zero:
 * torch's _weight_int8pack_mm layout; G is then only the activation group (64). */
int EM_API(qmm)(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt, int per_row,
           const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt, int nthreads) {
    int rc = check(bits, K, Kp, G);
    if (rc) return rc;
    if (bits == 8 && (!per_row || zero)) return -3;
    const int64_t ng = Kp / G, bpg = G / EM_BLOCK, row_bytes = Kp * bits / 8;
    const float off = bits == 8 ? 0.f : (float)((1 << bits) - 1) / 2.f;
    const int64_t srow_len = per_row ? 1 : ng, sstep = per_row ? 0 : 1;
    const size_t ssize = sdt == EM_F32 ? 4 : 2;
    int16_t *xq = (int16_t *)aligned_alloc(64, (size_t)((M * Kp * 2 + 63) / 64 * 64));
    float *xs = (float *)malloc((size_t)(M * ng) * sizeof(float));
    float *xsum = (float *)malloc((size_t)(M * ng) * sizeof(float));
    if (!xq || !xs || !xsum) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    quantize_x(x, xdt, M, K, Kp, G, xq, xs, xsum, nthreads);
    const int64_t nblk = (N + EM_NB - 1) / EM_NB;
    /* Dynamic: a thread the OS preempts (cores shared with other work) does not hold the
     * others up at the barrier; work items are small enough that the cost is noise. */
#pragma omp parallel for schedule(guided) num_threads(nthreads) if (N * Kp * M >= EM_PAR_MIN)
    for (int64_t ib = 0; ib < nblk; ib++) {
        const int64_t n0 = ib * EM_NB, n1 = n0 + EM_NB < N ? n0 + EM_NB : N;
        /* Activation rows outer, weight rows inner: the 4 activation rows stay in L1/L2 while
         * the block's weight rows (a few KiB each) stream past them. */
        for (int64_t m0 = 0; m0 < M; m0 += EM_MR) {
            const int mr = M - m0 < EM_MR ? (int)(M - m0) : EM_MR;
            const row_fn fn = ROWS[bits == 8 ? 3 : bits - 2][mr - 1];
            for (int64_t n = n0; n < n1; n++) {
                float r[EM_MR];
                fn(w + n * row_bytes, (const char *)scale + n * srow_len * ssize, sdt, sstep,
                   zero ? zero + n * ng : NULL, ng, bpg, xq + m0 * Kp, Kp, xs + m0 * ng, xsum + m0 * ng, off, r);
                for (int i = 0; i < mr; i++) store_out(y, ydt, (m0 + i) * N + n, r[i]);
            }
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

/* Rows [n0, n1) of dequant(W) into out (n1 - n0, K), fp32 or bf16. */
int EM_API(dequant)(const uint8_t *w, const uint16_t *scale, const uint16_t *zero, int64_t n0, int64_t n1, int64_t K,
               int64_t Kp, int bits, int64_t G, void *out, int odt, int nthreads) {
    int rc = check(bits, K, Kp, G);
    if (rc) return rc;
    if (bits == 8) return -2; /* int8 dequantizes in torch (one multiply) */
    (void)nthreads;
    const int64_t ng = Kp / G, row_bytes = Kp * bits / 8, nblocks = Kp / EM_BLOCK;
    const float off = (float)((1 << bits) - 1) / 2.f;
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads) if ((n1 - n0) * Kp >= EM_PAR_MIN)
    for (int64_t n = n0; n < n1; n++) {
#ifndef EM_AVX2
        int16_t q[EM_BLOCK];
#endif
        float v[EM_BLOCK];
        for (int64_t blk = 0; blk < nblocks; blk++) {
            const int64_t g = blk * EM_BLOCK / G, k0 = blk * EM_BLOCK;
            const float s = f16_to_f32(scale[n * ng + g]);
            const float zt = zero ? f16_to_f32(zero[n * ng + g]) : -off * s;
#ifdef EM_AVX2
            {
                __m256i wv[4];
                unpack64(bits, w + n * row_bytes + blk * 8 * bits, wv);
                const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(zt);
                if (odt == EM_BF16 && K - k0 >= EM_BLOCK) { /* a whole bf16 block: table lookups */
                    dequant_block_bf16(wv, s, zt, (uint16_t *)out + (n - n0) * K + k0);
                    continue;
                }
                for (int t = 0; t < 4; t++) {
                    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(wv[t])));
                    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(wv[t], 1)));
                    _mm256_storeu_ps(v + 16 * t, _mm256_fmadd_ps(vs, lo, vz));
                    _mm256_storeu_ps(v + 16 * t + 8, _mm256_fmadd_ps(vs, hi, vz));
                }
            }
#else
            unpack64_scalar(bits, w + n * row_bytes + blk * 8 * bits, q);
            for (int j = 0; j < EM_BLOCK; j++) v[j] = s * (float)q[j] + zt;
#endif
            const int64_t kn = K - k0 < EM_BLOCK ? K - k0 : EM_BLOCK;
            if (kn <= 0) break;
            if (odt == EM_BF16) {
                uint16_t *o = (uint16_t *)out + (n - n0) * K + k0;
                for (int j = 0; j < kn; j++) o[j] = f32_to_bf16(v[j]);
            } else {
                float *o = (float *)out + (n - n0) * K + k0;
                memcpy(o, v, (size_t)kn * sizeof(float));
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ MXFP4 */

/* MXFP4 (OCP MX, gpt-oss experts): each row is G blocks of 32 FP4 (E2M1) codes packed two
 * per byte (even element in the low nibble, 16 bytes a block) and one E8M0 exponent e per
 * block: w = FP4[code] * 2^(e - 127). Twice an E2M1 value is a small integer, so a code
 * decodes with one byte shuffle to 2 * FP4 (an int8) and the block's factor is 2^(e - 128).
 * Unlike the integer formats the activations stay fp32 (they are not quantized): the
 * products are those of a float matmul on the dequantized weights, only summed in
 * another order. The activations are reordered once per call so that each block's even
 * elements come first and its odd ones after, matching the low and high nibbles. */
static const int8_t EM_FP4X2[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
#define EM_MX_BLOCK 32

/* res[m] = sum_k W[n, k] x[m, k] for mr activation rows (xr: reordered, ldx apart). */
static inline __attribute__((always_inline)) void mx_row_dot(const int MR, const uint8_t *wrow, const uint8_t *erow,
                                                             int64_t ng, const float *xr, int64_t ldx,
                                                             const float *pw, float *res) {
#ifdef EM_AVX2
    const __m128i lut = _mm_loadu_si128((const __m128i *)EM_FP4X2), m15 = _mm_set1_epi8(15);
    __m256 acc[EM_MR];
    for (int m = 0; m < MR; m++) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(wrow + 16 * g));
        const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, m15));
        const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), m15));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        const __m256 s = _mm256_set1_ps(pw[erow[g]]);
        for (int m = 0; m < MR; m++) {
            const float *xm = xr + m * ldx + EM_MX_BLOCK * g;
            __m256 t = _mm256_mul_ps(w0, _mm256_loadu_ps(xm));
            t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), t);
            t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), t);
            t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), t);
            acc[m] = _mm256_fmadd_ps(t, s, acc[m]);
        }
    }
    for (int m = 0; m < MR; m++) res[m] = hsum8(acc[m]);
#else
    for (int m = 0; m < MR; m++) res[m] = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        const uint8_t *b = wrow + 16 * g;
        const float s = pw[erow[g]];
        for (int m = 0; m < MR; m++) {
            const float *xm = xr + m * ldx + EM_MX_BLOCK * g;
            float t = 0.f;
            for (int j = 0; j < 16; j++)
                t += (float)EM_FP4X2[b[j] & 15] * xm[j] + (float)EM_FP4X2[b[j] >> 4] * xm[16 + j];
            res[m] += t * s;
        }
    }
#endif
}

typedef void (*mx_row_fn)(const uint8_t *, const uint8_t *, int64_t, const float *, int64_t, const float *, float *);
#define EM_MX_ROW(R)                                                                                            \
    static void mx_row_m##R(const uint8_t *wrow, const uint8_t *erow, int64_t ng, const float *xr, int64_t ldx, \
                            const float *pw, float *res) {                                                      \
        mx_row_dot(R, wrow, erow, ng, xr, ldx, pw, res);                                                        \
    }
EM_MX_ROW(1) EM_MX_ROW(2) EM_MX_ROW(3) EM_MX_ROW(4)
static const mx_row_fn MX_ROWS[EM_MR] = {mx_row_m1, mx_row_m2, mx_row_m3, mx_row_m4};

/* 2^(e - 128) for every E8M0 code (the factor of 2 * FP4 values); 255 is NaN. */
static void mx_pow2(float pw[256], float half) {
    for (int e = 0; e < 255; e++) pw[e] = ldexpf(half, e - 127);
    pw[255] = NAN;
}

/* y (M, N) = x (M, K) @ dequant(W)^T for MXFP4 W: blocks (N, G * 16) and exponents (N, G),
 * G = ceil(K / 32). Returns 0, -1 when out of memory, -3 on bad sizes. */
int EM_API(mxfp4_mm)(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *blocks, const uint8_t *scales,
                int64_t N, int64_t G, void *y, int ydt, int nthreads) {
    if (G != (K + EM_MX_BLOCK - 1) / EM_MX_BLOCK || M < 0 || N < 0) return -3;
    const int64_t Kp = G * EM_MX_BLOCK;
    float pw[256];
    mx_pow2(pw, 0.5f);
    float *xr = (float *)aligned_alloc(64, (size_t)((M * Kp * 4 + 63) / 64 * 64));
    if (!xr) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < Kp; k++) { /* block-local: evens then odds, zero padded */
            const int64_t g = k / EM_MX_BLOCK, j = k % EM_MX_BLOCK;
            const int64_t src = g * EM_MX_BLOCK + (j < 16 ? 2 * j : 2 * (j - 16) + 1);
            xr[m * Kp + k] = src < K ? load_act(x, xdt, m * K + src) : 0.f;
        }
    const int64_t nblk = (N + EM_NB - 1) / EM_NB;
#pragma omp parallel for schedule(guided) num_threads(nthreads) if (N * Kp * M >= EM_PAR_MIN)
    for (int64_t ib = 0; ib < nblk; ib++) {
        const int64_t n0 = ib * EM_NB, n1 = n0 + EM_NB < N ? n0 + EM_NB : N;
        for (int64_t m0 = 0; m0 < M; m0 += EM_MR) {
            const int mr = M - m0 < EM_MR ? (int)(M - m0) : EM_MR;
            for (int64_t n = n0; n < n1; n++) {
                float r[EM_MR];
                MX_ROWS[mr - 1](blocks + n * G * 16, scales + n * G, G, xr + m0 * Kp, Kp, pw, r);
                for (int i = 0; i < mr; i++) store_out(y, ydt, (m0 + i) * N + n, r[i]);
            }
        }
    }
    free(xr);
    return 0;
}

/* Rows [n0, n1) of an MXFP4 weight dequantized into out (n1 - n0, K), fp32 or bf16 (exact
 * in both). */
int EM_API(mxfp4_dequant)(const uint8_t *blocks, const uint8_t *scales, int64_t n0, int64_t n1, int64_t K, int64_t G,
                     void *out, int odt, int nthreads) {
    if (G != (K + EM_MX_BLOCK - 1) / EM_MX_BLOCK) return -3;
    (void)nthreads;
    float pw[256];
    mx_pow2(pw, 1.0f);
    static const float FP4[16] = {0.f,  .5f,  1.f,  1.5f,  2.f,  3.f,  4.f,  6.f,
                                  -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
#pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads) if ((n1 - n0) * K >= EM_PAR_MIN)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *b = blocks + n * G * 16, *e = scales + n * G;
        for (int64_t k = 0; k < K; k++) {
            const uint8_t byte = b[k / 2];
            const float v = FP4[k % 2 ? byte >> 4 : byte & 15] * pw[e[k / EM_MX_BLOCK]];
            store_out(out, odt, (n - n0) * K + k, v);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ quantization */

/* Codes of one group against fp16-rounded scale s and zero z (z unused when symmetric);
 * returns the squared error and the stored fp16 values. Mirrors quantize.py's _fit. */
static float fit_group(const float *x, int64_t G, int lv, int asym, float s, float z, uint8_t *q,
                        uint16_t *s16, uint16_t *z16) {
    uint16_t hs = f32_to_f16(s);
    if ((hs & 0x7fffu) == 0) hs = 1; /* fp16 underflow: keep the step positive */
    const float sf = f16_to_f32(hs), off = (float)lv / 2.f;
    float zf = 0.f;
    uint16_t hz = 0;
    if (asym) {
        hz = f32_to_f16(z);
        zf = f16_to_f32(hz);
    }
    /* Two branch-free loops so the compiler vectorises them (division kept, not a
     * reciprocal: the codes must match quantize.py's x / s exactly). */
    float sse = 0.f;
#ifdef EM_AVX2
    {
        const __m256 vs = _mm256_set1_ps(sf), vz = _mm256_set1_ps(zf), voff = _mm256_set1_ps(off);
        const __m256 vlv = _mm256_set1_ps((float)lv), vzero = _mm256_setzero_ps();
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < G; k += 8) { /* G is a multiple of 64 */
            const __m256 xv = _mm256_loadu_ps(x + k);
            __m256 c = asym ? _mm256_div_ps(_mm256_sub_ps(xv, vz), vs) : _mm256_add_ps(_mm256_div_ps(xv, vs), voff);
            c = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            c = _mm256_min_ps(_mm256_max_ps(c, vzero), vlv);
            const __m256i ci = _mm256_cvtps_epi32(c);
            const __m128i c16 = _mm_packus_epi32(_mm256_castsi256_si128(ci), _mm256_extracti128_si256(ci, 1));
            _mm_storel_epi64((__m128i *)(q + k), _mm_packus_epi16(c16, c16));
            const __m256 e = asym ? _mm256_sub_ps(xv, _mm256_fmadd_ps(vs, c, vz))
                                  : _mm256_sub_ps(xv, _mm256_mul_ps(vs, _mm256_sub_ps(c, voff)));
            acc = _mm256_fmadd_ps(e, e, acc);
        }
        sse = hsum8(acc);
    }
#else
    if (asym) {
        for (int64_t k = 0; k < G; k++) {
            float c = rintf((x[k] - zf) / sf);
            c = fminf(fmaxf(c, 0.f), (float)lv);
            q[k] = (uint8_t)c;
            const float e = x[k] - (sf * c + zf);
            sse += e * e;
        }
    } else {
        for (int64_t k = 0; k < G; k++) {
            float c = rintf(x[k] / sf + off);
            c = fminf(fmaxf(c, 0.f), (float)lv);
            q[k] = (uint8_t)c;
            const float e = x[k] - sf * (c - off);
            sse += e * e;
        }
    }
#endif
    *s16 = hs, *z16 = hz;
    return sse;
}

static const float SHRINK[] = {1.0f, 0.95f, 0.9f, 0.85f, 0.8f, 0.75f, 0.7f, 0.65f, 0.6f};

/* Group-wise quantization of w (N, K) fp32: codes (N, Kp), scales and zeros (N, Kp/G) fp16.
 * Same algorithm as quantize.py (range candidates, then one least-squares refit). */
int EM_API(quantize)(const float *w, int64_t N, int64_t K, int64_t Kp, int bits, int64_t G, int asym, int search,
                uint8_t *q, uint16_t *scale, uint16_t *zero, int nthreads) {
    if (bits < 2 || bits > 8 || G <= 0 || Kp % G || K > Kp) return -3;
    (void)nthreads;
    const int64_t ng = Kp / G;
    const int lv = (1 << bits) - 1;
    const float off = (float)lv / 2.f;
    int rc = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *x = (float *)malloc((size_t)G * sizeof(float));
        uint8_t *cand = (uint8_t *)malloc((size_t)G);
        const int ok = x && cand;
        if (!ok) {
#pragma omp atomic write
            rc = -1;
        }
        { /* every thread must reach the worksharing loop, even one whose malloc failed */
#pragma omp for schedule(dynamic, 64)
            for (int64_t i = 0; i < N * ng; i++) {
                if (!ok) continue;
                const int64_t n = i / ng, g = i % ng, k0 = g * G;
                for (int64_t k = 0; k < G; k++) x[k] = k0 + k < K ? w[n * K + k0 + k] : 0.f;
                float lo = x[0], hi = x[0], amax = 0.f;
                for (int64_t k = 0; k < G; k++) {
                    lo = x[k] < lo ? x[k] : lo;
                    hi = x[k] > hi ? x[k] : hi;
                    amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
                }
                const float mid = (lo + hi) / 2.f;
                uint8_t *qb = q + n * Kp + k0;
                uint16_t bs = 0, bz = 0, cs, cz;
                float best = INFINITY;
                const int ncand = search ? (int)(sizeof(SHRINK) / sizeof(SHRINK[0])) : 1;
                for (int c = 0; c < ncand; c++) {
                    float s, z = 0.f;
                    if (asym) {
                        s = (hi - lo) * SHRINK[c] / (float)lv;
                        s = s < 1e-12f ? 1e-12f : s;
                        z = mid - s * ((float)lv / 2.f);
                    } else {
                        s = amax * SHRINK[c] / off;
                        s = s < 1e-12f ? 1e-12f : s;
                    }
                    const float e = fit_group(x, G, lv, asym, s, z, cand, &cs, &cz);
                    if (e < best) best = e, bs = cs, bz = cz, memcpy(qb, cand, (size_t)G);
                }
                if (search) { /* least-squares scale (and zero) for the best codes so far */
                    double sq = 0, sx = 0, sqq = 0, sqx = 0;
                    for (int64_t k = 0; k < G; k++) {
                        const double c = asym ? (double)qb[k] : (double)qb[k] - off;
                        sq += c, sx += x[k], sqq += c * c, sqx += c * x[k];
                    }
                    float s, z = 0.f;
                    if (asym) {
                        const double det = (double)G * sqq - sq * sq;
                        s = det > 0 ? (float)(((double)G * sqx - sq * sx) / det) : 0.f;
                        z = det > 0 ? (float)((sx - s * sq) / (double)G) : (float)(sx / (double)G);
                        s = s <= 0.f ? 1e-12f : s;
                    } else {
                        s = (float)(sqx / (sqq > 1e-12 ? sqq : 1e-12));
                        s = s < 1e-12f ? 1e-12f : s;
                    }
                    const float e = fit_group(x, G, lv, asym, s, z, cand, &cs, &cz);
                    if (e < best) best = e, bs = cs, bz = cz, memcpy(qb, cand, (size_t)G);
                }
                scale[n * ng + g] = bs;
                if (asym) zero[n * ng + g] = bz;
            }
        }
        free(x), free(cand);
    }
    return rc;
}
