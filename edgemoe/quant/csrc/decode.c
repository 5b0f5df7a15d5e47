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

/* Sum of a[0..n) * b[0..n) in fp32 with 16 independent partial sums (vectorisable without
 * reassociating a single chain). */
static float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float t = 0.f;
    for (; i < n; i++) t += a[i] * b[i];
    for (int j = 0; j < 16; j++) t += acc[j];
    return t;
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
    for (int64_t h = 0; h < heads; h++) {
        const int64_t g = h / grp;
        const int64_t wide = D > Dv ? D : Dv;
        float *buf = (float *)malloc((size_t)(S + D + Dv + wide + 1) * sizeof(float));
        if (!buf) {
            rc = -1;
            continue;
        }
        float *s = buf, *qf = buf + S, *acc = qf + D, *row = acc + Dv; /* scores, query, output, one cached row */
        for (int64_t d = 0; d < D; d++) qf[d] = ld(q, dt, h * D + d);
        float mx = -INFINITY;
        for (int64_t t = 0; t < S; t++) {
            const int64_t base = (g * cap + t) * D;
            for (int64_t d = 0; d < D; d++) row[d] = ld(kc, dt, base + d);
            s[t] = dot_f32(qf, row, D) * scale;
            if (s[t] > mx) mx = s[t];
        }
        float sum = 0.f;
        for (int64_t t = 0; t < S; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        for (int64_t d = 0; d < Dv; d++) acc[d] = 0.f;
        for (int64_t t = 0; t < S; t++) {
            const float p = s[t] / sum;
            const int64_t base = (g * cap + t) * Dv;
            for (int64_t d = 0; d < Dv; d++) acc[d] += p * ld(vc, dt, base + d);
        }
        for (int64_t d = 0; d < Dv; d++) st(out, dt, h * Dv + d, acc[d]);
        free(buf);
    }
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
