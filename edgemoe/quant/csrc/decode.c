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
