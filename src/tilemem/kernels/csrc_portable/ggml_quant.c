/* ggml-block dequantization and matmuls (y = x @ W^T) on AVX2 + FMA + F16C: see ggml_quant.h.
 *
 * Shapes: N tokens, W [R, C] (R rows of nb = C / block_weights blocks), x [N, C], y [N, R].
 */
#include "ggml_quant.h"
#include "ggml_quant_internal.h"

#include <omp.h>
#include <stdlib.h>

int64_t tmg_block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return bb_of(T_Q4_0);
    case T_Q4_1: return bb_of(T_Q4_1);
    case T_Q5_0: return bb_of(T_Q5_0);
    case T_Q5_1: return bb_of(T_Q5_1);
    case T_Q8_0: return bb_of(T_Q8_0);
    case T_Q4_K: return bb_of(T_Q4_K);
    case T_Q5_K: return bb_of(T_Q5_K);
    case T_Q6_K: return bb_of(T_Q6_K);
    }
    return 0;
}

int64_t tmg_block_weights(int type) {
    if (tmg_block_bytes(type) == 0) return 0;
    return type == T_Q4_K || type == T_Q5_K || type == T_Q6_K ? 256 : 32;
}

/* ---- per-type instances: rows [r0, r1) of W for nt tokens, dequantized rows ---- */

#define ROWS_CASE(KIND, TY, NT, ...)                                                                               \
    case NT:                                                                                                       \
        for (int64_t r = r0; r < r1; r++) row_##KIND(TY, NT, w + r * ldw, nb, __VA_ARGS__, y + r, ldy);            \
        break;

#define INSTANCES(NAME, TY)                                                                                        \
    static void exact_##NAME(int nt, const uint8_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t nb,           \
                             const float *x, int64_t ldx, float *y, int64_t ldy) {                               \
        switch (nt) {                                                                                              \
            ROWS_CASE(exact, TY, 1, x, ldx)                                                                        \
            ROWS_CASE(exact, TY, 2, x, ldx)                                                                        \
            ROWS_CASE(exact, TY, 3, x, ldx)                                                                        \
            ROWS_CASE(exact, TY, 4, x, ldx)                                                                        \
            ROWS_CASE(exact, TY, 5, x, ldx)                                                                        \
            ROWS_CASE(exact, TY, 6, x, ldx)                                                                        \
            ROWS_CASE(exact, TY, 7, x, ldx)                                                                        \
            ROWS_CASE(exact, TY, 8, x, ldx)                                                                        \
        }                                                                                                          \
    }                                                                                                              \
    static void fast_##NAME(int nt, const uint8_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t nb,            \
                            const tmg_xq *X, float *y, int64_t ldy) {                                              \
        switch (nt) {                                                                                              \
            case 1: rows_fast(TY, 1, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
            case 2: rows_fast(TY, 2, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
            case 3: rows_fast(TY, 3, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
            case 4: rows_fast(TY, 4, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
            case 5: rows_fast(TY, 5, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
            case 6: rows_fast(TY, 6, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
            case 7: rows_fast(TY, 7, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
            case 8: rows_fast(TY, 8, w, ldw, r0, r1, nb, X, y, ldy); break;                                        \
        }                                                                                                          \
    }                                                                                                              \
    static void dequant_##NAME(const uint8_t *wr, int64_t nb, float *o) {                                          \
        for (int64_t i = 0; i < nb; i++) {                                                                         \
            const uint8_t *blk = wr + i * bb_of(TY);                                                               \
            tmg_scales s;                                                                                          \
            block_scales(TY, blk, &s);                                                                             \
            for (int g = 0; g < bw_of(TY) / 32; g++) {                                                             \
                __m256 v[4];                                                                                       \
                group_f(TY, blk, g, &s, v);                                                                        \
                for (int k = 0; k < 4; k++) _mm256_storeu_ps(o + (i * (bw_of(TY) / 32) + g) * 32 + 8 * k, v[k]);   \
            }                                                                                                      \
        }                                                                                                          \
    }

INSTANCES(q4_0, T_Q4_0)
INSTANCES(q4_1, T_Q4_1)
INSTANCES(q5_0, T_Q5_0)
INSTANCES(q5_1, T_Q5_1)
INSTANCES(q8_0, T_Q8_0)
INSTANCES(q4_k, T_Q4_K)
INSTANCES(q5_k, T_Q5_K)
INSTANCES(q6_k, T_Q6_K)

int tmg_lookup(int type, tmg_kernels *k) {
    const tmg_fast_fn f512 = tmg_fast_avx512(type); /* NULL: the AVX2 fast kernel */
#define K(TY, NAME)                                                                                                \
    case TY: *k = (tmg_kernels){exact_##NAME, f512 ? f512 : fast_##NAME, dequant_##NAME}; return 1;
    switch (type) {
        K(T_Q4_0, q4_0)
        K(T_Q4_1, q4_1)
        K(T_Q5_0, q5_0)
        K(T_Q5_1, q5_1)
        K(T_Q8_0, q8_0)
        K(T_Q4_K, q4_k)
        K(T_Q5_K, q5_k)
        K(T_Q6_K, q6_k)
    }
#undef K
    return 0;
}

int tmg_dequantize(int type, const uint8_t *w, int64_t ldw, int64_t r0, int64_t nrows, int64_t C, float *out,
                   int64_t ldo, int nthreads) {
    tmg_kernels k;
    if (!tmg_lookup(type, &k) || C % tmg_block_weights(type)) return TMG_EINVAL;
    const int64_t nb = C / tmg_block_weights(type);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < nrows; i++) k.dequant(w + (r0 + i) * ldw, nb, out + i * ldo);
    return TMG_OK;
}

int tmg_quantize_rows(int type, const float *x, int64_t ldx, int64_t N, int64_t C, tmg_xq *X, int nthreads) {
    const int64_t QB = tmg_block_weights(type);
    int8_t *q = malloc((size_t)(N * C) + (size_t)(N * (C / QB)) * sizeof(float) + (size_t)(N * (C / 16)) * 2 + 64);
    if (q == NULL) return TMG_ENOMEM;
    float *d = (float *)(((uintptr_t)(q + N * C) + 15) & ~(uintptr_t)15);
    int16_t *s = (int16_t *)(d + N * (C / QB));
    *X = (tmg_xq){q, d, s, C, C / QB, C / 16};
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N * C >= 65536)
    for (int64_t n = 0; n < N; n++) quantize_x(x + n * ldx, C, QB, q + n * C, d + n * (C / QB), s + n * (C / 16));
    return TMG_OK;
}

int tmg_matmul_nt(int type, int exact, const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw,
                  int64_t R, int64_t C, float *y, int64_t ldy, int nthreads) {
    tmg_kernels k;
    if (!tmg_lookup(type, &k) || C % tmg_block_weights(type)) return TMG_EINVAL;
    if (N <= 0 || R <= 0 || C <= 0) return TMG_OK;
    const int64_t nb = C / tmg_block_weights(type);
    tmg_xq X = {0};
    if (!exact) {
        const int status = tmg_quantize_rows(type, x, ldx, N, C, &X, nthreads);
        if (status != TMG_OK) return status;
    }
    const int64_t most = (R + 15) / 16; /* at least 16 rows a thread */
    const int threads = nthreads < most ? nthreads : (int)most;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t chunk = (R + T - 1) / T;
        const int64_t ra = gmin64(R, t * chunk), rb = gmin64(R, ra + chunk);
        for (int64_t n0 = 0; n0 < N && ra < rb; n0 += GMAXT) {
            const int nt = (int)gmin64(GMAXT, N - n0);
            if (exact) {
                k.exact(nt, w, ldw, ra, rb, nb, x + n0 * ldx, ldx, y + n0 * ldy, ldy);
            } else {
                const tmg_xq Xn = {X.q + n0 * X.ldq, X.d + n0 * X.ldd, X.s + n0 * X.lds, X.ldq, X.ldd, X.lds};
                k.fast(nt, w, ldw, ra, rb, nb, &Xn, y + n0 * ldy, ldy);
            }
        }
    }
    free((void *)X.q);
    return TMG_OK;
}
