/*
 * Small ops of a decode step, each one C call instead of several torch ops: at one token
 * per step torch's per-op cost (5-15 us), not arithmetic, is what these ops spend
 * (edgemoe_lab/results/decode_profile.md). Compiled once with the baseline flags of the
 * target (like dispatch.c): the work is a few thousand values per call.
 *
 * Both functions round where the torch ops they replace round, so their results match
 * those ops' up to the order of fp32 sums (edgemoe/fastops.py has the torch versions).
 * dt: 0 fp32, 1 bf16 (the ids of em_common.h).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float ld(const void *p, int dt, int64_t i) {
    if (dt == 1) {
        const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

/* f rounded to dt (bf16: nearest even, as torch rounds; NaN stays NaN). */
static inline float rnd(float f, int dt) {
    if (dt != 1) return f;
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static inline void st(void *p, int dt, int64_t i, float f) {
    if (dt == 1) {
        uint32_t u;
        memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u)
            u |= 0x400000u;
        else
            u += 0x7fffu + ((u >> 16) & 1u);
        ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    } else {
        ((float *)p)[i] = f;
    }
}

/* n values of p from index i as fp32 into out: one loop per dtype, so that each vectorises. */
static void load_row(const void *p, int dt, int64_t i, int64_t n, float *out) {
    if (dt == 1) {
        const uint16_t *h = (const uint16_t *)p + i;
        for (int64_t j = 0; j < n; j++) {
            const uint32_t u = (uint32_t)h[j] << 16;
            memcpy(&out[j], &u, 4); /* not through a uint32_t pointer: out is read as float */
        }
    } else {
        memcpy(out, (const float *)p + i, (size_t)n * sizeof(float));
    }
}

/* rnd over n values in place, branch-free so that it vectorises. */
static inline void rnd_row(float *f, int dt, int64_t n) {
    if (dt != 1) return;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &f[i], 4);
        const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
        u = (u & 0x7fffffffu) > 0x7f800000u ? u : r; /* NaN stays NaN */
        memcpy(&f[i], &u, 4);
    }
}

/* n fp32 values of f stored to out in dt (bf16: rounded as rnd, in place in f first). */
static inline void store_row(float *f, int dt, int64_t n, void *out) {
    if (dt != 1) {
        memcpy(out, f, (size_t)n * sizeof(float));
        return;
    }
    rnd_row(f, dt, n);
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &f[i], 4);
        ((uint16_t *)out)[i] = (uint16_t)(u >> 16);
    }
}

/* The attention of one K/V group gets AVX2 / AVX-512 copies picked at load time on x86-64
 * (this file is otherwise built for the baseline ISA); the arithmetic is the same in every
 * copy (fixed partial sums, no contraction), so the results are too. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define EM_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#else
#define EM_CLONES
#endif

/* Sum of a[0..n) * b[0..n) in fp32 with 16 independent partial sums (vectorisable without
 * reassociating a single chain). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float t = 0.f;
    for (; i < n; i++) t += a[i] * b[i];
    for (int j = 0; j < 16; j++) t += acc[j];
    return t;
}

/* y[0..n) += p * x[0..n) */
static inline void axpy_f32(float *y, float p, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += p * x[i];
}

/* e^x for x in [-87, 88]: Cody-Waite reduction by ln 2 to the nearest integer k and a
 * degree-6 polynomial (relative error about 2e-7, as expf's). Written without floorf,
 * branches or pointer casts, each of which kept GCC from vectorising its callers' loops for
 * AVX2 and the baseline. */
static inline __attribute__((always_inline)) float exp_in_range(float x) {
    const float k = (x * 1.44269504f + 12582912.f) - 12582912.f; /* nearest integer (|x log2 e| < 2^22) */
    const float r = (x - k * 0.693145752f) - k * 1.42860677e-6f; /* ln 2 in two parts */
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const int32_t e = ((int32_t)k + 127) << 23;
    float two_k;
    memcpy(&two_k, &e, 4);
    return p * two_k;
}

/* x where mask is all ones, else `other` (bit patterns: a select GCC vectorises). */
static inline __attribute__((always_inline)) float pick(float x, uint32_t mask, uint32_t other) {
    uint32_t b;
    memcpy(&b, &x, 4);
    b = (b & mask) | (other & ~mask);
    memcpy(&x, &b, 4);
    return x;
}

/* s[i] = exp(s[i] - mx) for i < n, with mx >= every s[i] (softmax); libm's expf is a call
 * per value and was a third of a long-context attention. Arguments below -87 (and NaN) give 0. */
static inline void exp_shifted(float *s, float mx, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float d = s[i] - mx;
        const uint32_t keep = -(uint32_t)(d >= -87.f); /* all ones, or 0 below -87 and for NaN */
        s[i] = pick(exp_in_range(pick(d, keep, 0xc2ae0000u /* -87 */)), keep, 0u);
    }
}

/* RMSNorm of `rows` rows of H values, as edgemoe.models.norms.RMSNorm computes it:
 * y = rnd(x * (1 / sqrt(mean(x^2) + eps))), out = rnd(w * y); x, w, out in dt. */
int em_rmsnorm(const void *x, int dt, int64_t rows, int64_t H, const void *w, float eps, void *out) {
    if (dt != 0 && dt != 1) return -2;
    float *xf = (float *)malloc((size_t)H * sizeof(float) + 1);
    if (!xf) return -1;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < H; i++) xf[i] = ld(x, dt, r * H + i);
        const float ms = dot_f32(xf, xf, H) / (float)H;
        const float inv = 1.f / sqrtf(ms + eps);
        for (int64_t i = 0; i < H; i++) st(out, dt, r * H + i, ld(w, dt, i) * rnd(xf[i] * inv, dt));
    }
    free(xf);
    return 0;
}

/* ------------------------------------------------------------------ gated activation, large batches */

/* exp(x) with x clamped to [-87, 88] (NaN: -87), vectorisable. */
static inline __attribute__((always_inline)) float exp_clamped(float x) {
    const uint32_t lo = -(uint32_t)(x >= -87.f), hi = -(uint32_t)(x <= 88.f);
    return exp_in_range(pick(pick(x, hi, 0x42b00000u /* 88 */), lo, 0xc2ae0000u /* -87 */));
}

/* One row: out[i] = rnd(act(g[i]) * u[i]); act 0 silu (g / (1 + e^-g)), 1 gelu (erf), 2 gelu
 * (tanh), 3 relu, as em_act in qmm8.c. tmp: I floats. */
EM_CLONES static void glu_row(const float *g, const float *u, int64_t I, int act, float *tmp, void *out, int dt) {
    if (act == 0) {
        for (int64_t i = 0; i < I; i++) tmp[i] = g[i] / (1.f + exp_clamped(-g[i])) * u[i];
    } else if (act == 3) {
        for (int64_t i = 0; i < I; i++) tmp[i] = (g[i] > 0.f ? g[i] : 0.f) * u[i];
    } else if (act == 1) {
        for (int64_t i = 0; i < I; i++) tmp[i] = 0.5f * g[i] * (1.f + erff(g[i] * 0.70710678118654752f)) * u[i];
    } else {
        for (int64_t i = 0; i < I; i++) {
            const float x = g[i];
            tmp[i] = 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x))) * u[i];
        }
    }
    store_row(tmp, dt, I, out);
}

/* The gated activation of M rows of an expert's fp32 gate|up product h (M, 2I): out (M, I)
 * in dt, act(gate) * up rounded once. One pass where torch makes three (the activation,
 * the product, the conversion) with two (M, I) fp32 temporaries. */
int em_glu(const float *h, int64_t M, int64_t I, int act, void *out, int dt, int nthreads) {
    if ((dt != 0 && dt != 1) || act < 0 || act > 3) return -2;
    int rc = 0;
#pragma omp parallel num_threads(nthreads) if (M * I >= (1 << 16))
    {
        float *tmp = (float *)malloc((size_t)(I + 1) * sizeof(float));
        if (!tmp) {
#pragma omp atomic write
            rc = -1;
        } else {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++)
                glu_row(h + m * 2 * I, h + m * 2 * I + I, I, act, tmp, (char *)out + (size_t)m * I * (dt == 1 ? 2 : 4),
                        dt);
            free(tmp);
        }
    }
    return rc;
}

/* ------------------------------------------------------------------ MoE routing and combine */

/* logits[e] = sum_h x[h] * w[e][h] (fp32, fixed partial sums) for E rows of w in dt; row: H floats of scratch. */
EM_CLONES static void gate_logits(const float *x, const void *w, int dt, int64_t E, int64_t H, float *row,
                                  float *logits) {
    for (int64_t e = 0; e < E; e++) {
        load_row(w, dt, e * H, H, row);
        logits[e] = dot_f32(x, row, H);
    }
}

/* Softmax top-k routing (models/routers.py Router without bias, padding or adaptive gating) of
 * `rows` rows x (rows, H) with gate w (E, H), all in dt: logits = rnd(x w^T); p = softmax of
 * the logits in fp32; the k largest p, ties to the lower id, descending; with `norm` divided
 * by their sum; weights rounded to dt. logits (rows, E) and weights (rows, k) in dt, ids
 * (rows, k) int64. The gate products are summed in this file's own fixed order, so a row
 * routes the same whatever the number of rows in the call. */
int em_route_softmax(const void *x, int dt, int64_t rows, int64_t H, const void *w, int64_t E, int64_t k, int norm,
                     void *logits, void *weights, int64_t *ids) {
    if ((dt != 0 && dt != 1) || k < 1 || k > E) return -2;
    float *buf = (float *)malloc((size_t)(2 * H + 2 * E + k + 1) * sizeof(float));
    if (!buf) return -1;
    float *xf = buf, *row = xf + H, *l = row + H, *p = l + E, *top = p + E;
    for (int64_t r = 0; r < rows; r++) {
        load_row(x, dt, r * H, H, xf);
        gate_logits(xf, w, dt, E, H, row, l);
        float mx = -INFINITY, sum = 0.f;
        for (int64_t e = 0; e < E; e++) {
            l[e] = rnd(l[e], dt);
            st(logits, dt, r * E + e, l[e]);
            if (l[e] > mx) mx = l[e];
        }
        for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(l[e] - mx));
        for (int64_t e = 0; e < E; e++) p[e] /= sum;
        float tot = 0.f;
        for (int64_t j = 0; j < k; j++) { /* selection: k is small */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++)
                if (p[e] >= 0.f && (best < 0 || p[e] > p[best])) best = e;
            if (best < 0) best = 0; /* NaN scores: torch would route somewhere too */
            ids[r * k + j] = best;
            top[j] = p[best];
            tot += top[j];
            p[best] = -1.f;
        }
        for (int64_t j = 0; j < k; j++) st(weights, dt, r * k + j, norm ? top[j] / tot : top[j]);
    }
    free(buf);
    return 0;
}

/* out = rnd(rnd(sum_i rnd(slots[i] * w[i])) + res) over H values (res NULL: no residual):
 * the weighted sum of one token's k expert outputs, as MoEBlock computes it in torch (each
 * product rounded to dt, summed in fp32 in slot order, rounded), then the residual add.
 * slots (k, H), w (k), res and out (H), all in dt. */
int em_combine1(const void *slots, const void *w, int dt, int64_t k, int64_t H, const void *res, void *out) {
    if ((dt != 0 && dt != 1) || k < 1) return -2;
    float *buf = (float *)malloc((size_t)(2 * H + 1) * sizeof(float));
    if (!buf) return -1;
    float *acc = buf, *row = buf + H;
    for (int64_t h = 0; h < H; h++) acc[h] = 0.f;
    for (int64_t i = 0; i < k; i++) {
        const float wi = ld(w, dt, i);
        load_row(slots, dt, i * H, H, row);
        for (int64_t h = 0; h < H; h++) row[h] *= wi;
        rnd_row(row, dt, H);
        for (int64_t h = 0; h < H; h++) acc[h] += row[h];
    }
    rnd_row(acc, dt, H);
    if (res) {
        load_row(res, dt, 0, H, row);
        for (int64_t h = 0; h < H; h++) acc[h] += row[h];
    }
    store_row(acc, dt, H, out);
    free(buf);
    return 0;
}

/* Query heads g * grp .. (g + 1) * grp - 1 over K/V head g's S cached positions (em_attend1):
 * each cached row is converted once for the group, not once per query head. */
EM_CLONES static int attend_group(const void *q, int dt, const void *kc, const void *vc, int64_t cap, int64_t S,
                                  int64_t g, int64_t grp, int64_t D, int64_t Dv, float scale, void *out) {
    const int64_t wide = D > Dv ? D : Dv;
    float *buf = (float *)malloc((size_t)(grp * (S + D + Dv) + wide + 1) * sizeof(float));
    if (!buf) return -1;
    /* scores (grp, S), queries (grp, D), outputs (grp, Dv), one cached row */
    float *s = buf, *qf = s + grp * S, *acc = qf + grp * D, *row = acc + grp * Dv;
    for (int64_t j = 0; j < grp; j++)
        for (int64_t d = 0; d < D; d++) qf[j * D + d] = ld(q, dt, (g * grp + j) * D + d);
    for (int64_t t = 0; t < S; t++) {
        load_row(kc, dt, (g * cap + t) * D, D, row);
        for (int64_t j = 0; j < grp; j++) s[j * S + t] = dot_f32(qf + j * D, row, D) * scale;
    }
    for (int64_t j = 0; j < grp; j++) {
        float *sj = s + j * S, mx = -INFINITY, sum = 0.f, part[16] = {0};
        for (int64_t t = 0; t < S; t++)
            if (sj[t] > mx) mx = sj[t];
        exp_shifted(sj, mx, S);
        int64_t t = 0;
        for (; t + 16 <= S; t += 16)
            for (int p = 0; p < 16; p++) part[p] += sj[t + p];
        for (; t < S; t++) sum += sj[t];
        for (int p = 0; p < 16; p++) sum += part[p];
        for (t = 0; t < S; t++) sj[t] /= sum;
    }
    for (int64_t i = 0; i < grp * Dv; i++) acc[i] = 0.f;
    for (int64_t t = 0; t < S; t++) {
        load_row(vc, dt, (g * cap + t) * Dv, Dv, row);
        for (int64_t j = 0; j < grp; j++) axpy_f32(acc + j * Dv, s[j * S + t], row, Dv);
    }
    for (int64_t j = 0; j < grp; j++)
        for (int64_t d = 0; d < Dv; d++) st(out, dt, (g * grp + j) * Dv + d, acc[j * Dv + d]);
    free(buf);
    return 0;
}

/* One query position of attention with grouped K/V heads, after appending this position's
 * keys and values to the cache: kc[g][pos] = k[g], vc[g][pos] = v[g], then for query head
 * h (reading K/V head g = h / (heads / kvh)) over positions 0..pos:
 *     s = (q_h . k_s) * scale, p = softmax(s), out_h = sum_s p_s v_s   (fp32, out rounded).
 * q (heads, D), k (kvh, D), v (kvh, Dv), out (heads, Dv), all in dt; kc (kvh, cap, D) and
 * vc (kvh, cap, Dv) the cache buffers in dt. */
int em_attend1(const void *q, const void *k, const void *v, int dt, void *kc, void *vc, int64_t cap, int64_t pos,
               int64_t heads, int64_t kvh, int64_t D, int64_t Dv, float scale, void *out, int nthreads) {
    if ((dt != 0 && dt != 1) || pos < 0 || pos >= cap || kvh <= 0 || heads % kvh) return -2;
    const size_t el = dt == 1 ? 2 : 4;
    for (int64_t g = 0; g < kvh; g++) {
        memcpy((char *)kc + (size_t)(g * cap + pos) * D * el, (const char *)k + (size_t)g * D * el, (size_t)D * el);
        memcpy((char *)vc + (size_t)(g * cap + pos) * Dv * el, (const char *)v + (size_t)g * Dv * el, (size_t)Dv * el);
    }
    const int64_t S = pos + 1, grp = heads / kvh;
    int rc = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (heads * S * D >= (1 << 17))
    for (int64_t g = 0; g < kvh; g++)
        if (attend_group(q, dt, kc, vc, cap, S, g, grp, D, Dv, scale, out)) rc = -1;
    return rc;
}

/* ------------------------------------------------------------------ the attention half of a layer */

/* The dispatched kernels (dispatch.c). */
int em_qmm(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt, int per_row,
           const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt, int nthreads);
int em_qmm8(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt, int per_row,
            const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt, int nthreads);

/* One matrix as the attention half takes it, 11 int64: {codes, scale, zero (0: none), scale
 * dtype, per_row, N, K, Kp, bits, G, int8 activations (1) or int16 (0)}: the arguments the
 * Python path (quant/kernels.py) passes to em_qmm8 / em_qmm for one row. */
enum { M_CODES, M_SCALE, M_ZERO, M_SDT, M_PERROW, M_N, M_K, M_KP, M_BITS, M_G, M_ACT8, M_LEN };

static int mm1(const int64_t *m, const void *x, int dt, void *y, int nthreads) {
    int (*fn)(const void *, int, int64_t, int64_t, const uint8_t *, const void *, int, int, const uint16_t *, int64_t,
              int64_t, int, int64_t, void *, int, int) = m[M_ACT8] ? em_qmm8 : em_qmm;
    return fn(x, dt, 1, m[M_K], (const uint8_t *)(intptr_t)m[M_CODES], (const void *)(intptr_t)m[M_SCALE],
              (int)m[M_SDT], (int)m[M_PERROW], (const uint16_t *)(intptr_t)m[M_ZERO], m[M_N], m[M_KP], (int)m[M_BITS],
              m[M_G], y, dt, nthreads);
}

/* RoPE on `rows` rows of D values in place, as models/rope.py's _rotate computes it in dt:
 * x * cos + rotate_half(x) * sin, each product and the sum rounded to dt. */
static void rope_rows(void *t, int dt, int64_t rows, int64_t D, const void *cosr, const void *sinr, float *tmp) {
    const int64_t half = D / 2;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < D; i++) tmp[i] = ld(t, dt, r * D + i);
        for (int64_t i = 0; i < D; i++) {
            const float rot = i < half ? -tmp[i + half] : tmp[i - half];
            const float a = rnd(tmp[i] * ld(cosr, dt, i), dt), b = rnd(rot * ld(sinr, dt, i), dt);
            st(t, dt, r * D + i, a + b);
        }
    }
}

/* out = x + o(attention(rope(q(n)), rope(k(n)), v(n))) with n = rmsnorm(x): the attention
 * half of a pre-norm decoder layer for one position of one sequence, as
 * models/base.py DecoderLayer + models/attention.py Attention compute it (the same kernels
 * in the same order, rounding to dt where they round), appending k and v to the cache at
 * `pos`. x, nw, out (H); mats 4 x M_LEN (q, k, v, o); cos/sin rows (D) of position pos;
 * kc (kvh, cap, D), vc (kvh, cap, D). Returns 0, or a kernel's error code. */
int em_attn_half1(const void *x, int dt, int64_t H, const void *nw, float eps, const int64_t *mats, int64_t heads,
                  int64_t kvh, int64_t D, const void *cosr, const void *sinr, void *kc, void *vc, int64_t cap, int64_t pos,
                  float scale, void *out, int nthreads) {
    if (dt != 0 && dt != 1) return -2;
    const size_t el = dt == 1 ? 2 : 4;
    const int64_t nq = heads * D, nkv = kvh * D;
    char *buf = (char *)malloc((size_t)(H + 2 * nq + 2 * nkv + H) * el + (size_t)D * sizeof(float) + 64);
    if (!buf) return -1;
    char *xn = buf, *q = xn + H * el, *k = q + nq * el, *v = k + nkv * el, *att = v + nkv * el, *o = att + nq * el;
    float *tmp = (float *)(o + H * el);
    int rc = em_rmsnorm(x, dt, 1, H, nw, eps, xn);
    if (!rc) rc = mm1(mats, xn, dt, q, nthreads);
    if (!rc) rc = mm1(mats + M_LEN, xn, dt, k, nthreads);
    if (!rc) rc = mm1(mats + 2 * M_LEN, xn, dt, v, nthreads);
    if (!rc) {
        rope_rows(q, dt, heads, D, cosr, sinr, tmp);
        rope_rows(k, dt, kvh, D, cosr, sinr, tmp);
        rc = em_attend1(q, k, v, dt, kc, vc, cap, pos, heads, kvh, D, D, scale, att, nthreads);
    }
    if (!rc) rc = mm1(mats + 3 * M_LEN, att, dt, o, nthreads);
    if (!rc)
        for (int64_t i = 0; i < H; i++) st(out, dt, i, ld(x, dt, i) + ld(o, dt, i));
    free(buf);
    return rc;
}
