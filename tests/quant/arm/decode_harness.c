/*
 * Test harness for csrc/decode.c (the decode-step ops of edgemoe/fastops.py) on AArch64 under
 * qemu-user: linked statically with decode.c, it runs the records test_decode_qemu.py wrote and
 * writes each one's outputs back, for Python to compare with the same calls on this machine.
 *
 *   decode_harness IN OUT
 *
 * IN: records, each 8 int64 (op, a, b, c, d, e, f, g) then its inputs; OUT: per record an
 * int32 return code, then its outputs. dt 0 is fp32, 1 bf16 (2-byte values).
 *   op 0 em_route_softmax: a dt, b rows, c H, d E, e k, f norm; in x (rows*H), w (E*H);
 *        out logits (rows*E), weights (rows*k) in dt, ids (rows*k int64)
 *   op 1 em_combine1: a dt, b k, c H, d has_res; in slots (k*H), w (k), res (H if has_res); out (H)
 *   op 2 em_glu: a M, b I, c act, d dt; in h (M*2I fp32); out (M*I in dt)
 *   op 3 em_rmsnorm: a dt, b rows, c H, d eps (float bits); in x (rows*H), w (H); out (rows*H)
 *   op 4 em_attend1: a dt, b heads, c kvh, d D, e S, f scale (float bits); in q (heads*D), k, v
 *        (kvh*D each), kc, vc (kvh*S*D each, position S-1 written by the call); out (heads*D)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int em_route_softmax(const void *x, int dt, int64_t rows, int64_t H, const void *w, int64_t E, int64_t k, int norm,
                     void *logits, void *weights, int64_t *ids);
int em_combine1(const void *slots, const void *w, int dt, int64_t k, int64_t H, const void *res, void *out);
int em_glu(const float *h, int64_t M, int64_t I, int act, void *out, int dt, int nthreads);
int em_rmsnorm(const void *x, int dt, int64_t rows, int64_t H, const void *w, float eps, void *out);
int em_attend1(const void *q, const void *k, const void *v, int dt, void *kc, void *vc, int64_t cap, int64_t pos,
               int64_t heads, int64_t kvh, int64_t D, int64_t Dv, float scale, void *out, int nthreads);

/* The kernels em_attn_half1 calls (not exercised here): decode.c links against them. */
int em_qmm(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt, int per_row,
           const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt, int nthreads) {
    (void)x, (void)xdt, (void)M, (void)K, (void)w, (void)scale, (void)sdt, (void)per_row, (void)zero, (void)N;
    (void)Kp, (void)bits, (void)G, (void)y, (void)ydt, (void)nthreads;
    return -9;
}
int em_qmm8(const void *x, int xdt, int64_t M, int64_t K, const uint8_t *w, const void *scale, int sdt, int per_row,
            const uint16_t *zero, int64_t N, int64_t Kp, int bits, int64_t G, void *y, int ydt, int nthreads) {
    return em_qmm(x, xdt, M, K, w, scale, sdt, per_row, zero, N, Kp, bits, G, y, ydt, nthreads);
}

static FILE *in, *out;

static void *take(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, in) != n) {
        fprintf(stderr, "short read\n");
        exit(2);
    }
    return p;
}

static void put(const void *p, size_t n) {
    if (fwrite(p, 1, n, out) != n) exit(3);
}

static float bits_float(int64_t b) {
    const uint32_t u = (uint32_t)b;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        return 2;
    }
    in = fopen(argv[1], "rb");
    out = fopen(argv[2], "wb");
    if (!in || !out) return 2;
    int64_t r[8];
    while (fread(r, 8, 8, in) == 8) {
        const int64_t op = r[0];
        int rc;
        if (op == 0) {
            const int dt = (int)r[1];
            const int64_t rows = r[2], H = r[3], E = r[4], k = r[5], el = dt ? 2 : 4;
            void *x = take((size_t)(rows * H * el)), *w = take((size_t)(E * H * el));
            void *logits = malloc((size_t)(rows * E * el)), *weights = malloc((size_t)(rows * k * el));
            int64_t *ids = malloc((size_t)(rows * k) * 8);
            rc = em_route_softmax(x, dt, rows, H, w, E, k, (int)r[6], logits, weights, ids);
            put(&rc, 4), put(logits, (size_t)(rows * E * el)), put(weights, (size_t)(rows * k * el));
            put(ids, (size_t)(rows * k) * 8);
            free(x), free(w), free(logits), free(weights), free(ids);
        } else if (op == 1) {
            const int dt = (int)r[1];
            const int64_t k = r[2], H = r[3], el = dt ? 2 : 4;
            void *slots = take((size_t)(k * H * el)), *w = take((size_t)(k * el));
            void *res = r[4] ? take((size_t)(H * el)) : NULL, *y = malloc((size_t)(H * el));
            rc = em_combine1(slots, w, dt, k, H, res, y);
            put(&rc, 4), put(y, (size_t)(H * el));
            free(slots), free(w), free(res), free(y);
        } else if (op == 2) {
            const int64_t M = r[1], I = r[2];
            const int dt = (int)r[4];
            float *h = take((size_t)(M * 2 * I) * 4);
            void *y = malloc((size_t)(M * I * (dt ? 2 : 4)));
            rc = em_glu(h, M, I, (int)r[3], y, dt, 1);
            put(&rc, 4), put(y, (size_t)(M * I * (dt ? 2 : 4)));
            free(h), free(y);
        } else if (op == 3) {
            const int dt = (int)r[1];
            const int64_t rows = r[2], H = r[3], el = dt ? 2 : 4;
            void *x = take((size_t)(rows * H * el)), *w = take((size_t)(H * el)), *y = malloc((size_t)(rows * H * el));
            rc = em_rmsnorm(x, dt, rows, H, w, bits_float(r[4]), y);
            put(&rc, 4), put(y, (size_t)(rows * H * el));
            free(x), free(w), free(y);
        } else if (op == 4) {
            const int dt = (int)r[1];
            const int64_t heads = r[2], kvh = r[3], D = r[4], S = r[5], el = dt ? 2 : 4;
            void *q = take((size_t)(heads * D * el)), *k = take((size_t)(kvh * D * el)), *v = take((size_t)(kvh * D * el));
            void *kc = take((size_t)(kvh * S * D * el)), *vc = take((size_t)(kvh * S * D * el));
            void *y = malloc((size_t)(heads * D * el));
            rc = em_attend1(q, k, v, dt, kc, vc, S, S - 1, heads, kvh, D, D, bits_float(r[6]), y, 1);
            put(&rc, 4), put(y, (size_t)(heads * D * el));
            free(q), free(k), free(v), free(kc), free(vc), free(y);
        } else {
            fprintf(stderr, "unknown op %lld\n", (long long)op);
            return 2;
        }
    }
    fclose(out);
    return 0;
}
