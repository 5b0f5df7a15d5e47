/*
 * Test harness for the kernels on another architecture (AArch64 under qemu-user): linked
 * statically with the kernel objects (every variant) and dispatch.c, it runs the cases
 * test_neon_qemu.py wrote with every requested instruction-set variant and writes the
 * outputs back for Python to compare with its references.
 *
 *   harness CASES OUT ISA...
 *
 * stdout: "best <id> mask <cpu mask>", then per ISA "isa <id> ok" or "isa <id> unsupported".
 * CASES: records of 12 int64 (kind, xdt, M, K, N, Kp, bits, G, per_row, sdt, has_zero,
 * sbytes) then x (M*K of xdt), w bytes, scales (sbytes), zeros (2 * N * Kp / G bytes when
 * has_zero). kind: 0 em_qmm, 1 em_qmm8, 2 em_mxfp4_mm, 3 em_mxfp4_mm8 (w: blocks N*G*16,
 * scales: N*G exponents; Kp, bits, per_row, sdt unused).
 * OUT: per supported ISA, per case: int32 return code, then M*N float32 outputs.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int em_set_isa(int id);
int em_isa_best(void);
int em_cpu_mask(void);
int em_qmm(const void *, int, int64_t, int64_t, const uint8_t *, const void *, int, int, const uint16_t *, int64_t,
           int64_t, int, int64_t, void *, int, int);
int em_qmm8(const void *, int, int64_t, int64_t, const uint8_t *, const void *, int, int, const uint16_t *, int64_t,
            int64_t, int, int64_t, void *, int, int);
int em_mxfp4_mm(const void *, int, int64_t, int64_t, const uint8_t *, const uint8_t *, int64_t, int64_t, void *, int,
                int);
int em_mxfp4_mm8(const void *, int, int64_t, int64_t, const uint8_t *, const uint8_t *, int64_t, int64_t, void *, int,
                 int);

typedef struct {
    int64_t h[12];
    void *x, *w, *s, *z;
} case_t;

static void *read_n(FILE *f, size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p || fread(p, 1, n, f) != n) {
        fprintf(stderr, "short read\n");
        exit(2);
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CASES OUT ISA...\n", argv[0]);
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    case_t cases[512];
    int nc = 0;
    while (nc < 512 && fread(cases[nc].h, 8, 12, f) == 12) {
        case_t *c = &cases[nc];
        const int64_t kind = c->h[0], xdt = c->h[1], M = c->h[2], K = c->h[3], N = c->h[4], Kp = c->h[5];
        const int64_t bits = c->h[6], G = c->h[7], has_zero = c->h[10], sbytes = c->h[11];
        c->x = read_n(f, (size_t)(M * K * (xdt == 0 ? 4 : 2)));
        const int64_t wbytes = kind >= 2 ? N * G * 16 : N * Kp * bits / 8;
        c->w = read_n(f, (size_t)wbytes);
        c->s = read_n(f, (size_t)sbytes);
        c->z = has_zero ? read_n(f, (size_t)(2 * N * (Kp / G))) : NULL;
        nc++;
    }
    fclose(f);
    FILE *out = fopen(argv[2], "wb");
    if (!out) return 2;
    printf("best %d mask %d\n", em_isa_best(), em_cpu_mask());
    for (int a = 3; a < argc; a++) {
        const int id = atoi(argv[a]);
        if (em_set_isa(id) != id) {
            printf("isa %d unsupported\n", id);
            continue;
        }
        for (int i = 0; i < nc; i++) {
            const int64_t *h = cases[i].h;
            const int64_t kind = h[0], xdt = h[1], M = h[2], K = h[3], N = h[4], Kp = h[5], bits = h[6], G = h[7];
            float *y = (float *)calloc((size_t)(M * N + 1), 4);
            int32_t rc;
            if (kind <= 1)
                rc = (kind ? em_qmm8 : em_qmm)(cases[i].x, (int)xdt, M, K, cases[i].w, cases[i].s, (int)h[9], (int)h[8],
                                               cases[i].z, N, Kp, (int)bits, G, y, 0, 1);
            else
                rc = (kind == 3 ? em_mxfp4_mm8 : em_mxfp4_mm)(cases[i].x, (int)xdt, M, K, cases[i].w, cases[i].s, N, G,
                                                              y, 0, 1);
            fwrite(&rc, 4, 1, out);
            fwrite(y, 4, (size_t)(M * N), out);
            free(y);
        }
        printf("isa %d ok\n", id);
    }
    fclose(out);
    return 0;
}
