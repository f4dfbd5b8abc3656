/* FP8 (e4m3, 128x128 block scales) dequantization and matmuls for decode, on AVX2 + FMA + F16C.
 *
 * Decoding: an e4m3 byte b = s|eeee|mmm becomes the fp16 s|0eeee|mmm0000000, whose value is exactly
 * e4m3(b) / 2^8 for normals and subnormals alike (F16C widens it to fp32 without depending on MXCSR, and
 * no fp32 denormal ever enters an FMA, which costs a microcode assist on AMD Zen).
 * The 2^8 and the block scale are folded into the other operand once per 128-block: the matmuls
 * multiply x by scale * 256 into a per-thread buffer `xs` and then run plain FMAs on decoded weights.
 *
 * Shapes: N tokens, W [R, C] (R rows, C columns), x [N, C] (nt) or [N, R] (nn).
 */
#include "fp8.h"
#include "fp8_internal.h"

#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define NN_ROWS 512 /* rows of W per pass of matmul_nn's column chunks */
#define NN_PREFETCH 16 /* rows ahead matmul_nn prefetches its column chunk */

int tmp_fp8_dequantize(const uint8_t *w, int64_t ldw, const float *scale, int64_t lds, int64_t r0, int64_t nrows,
                       int64_t C, float *out, int64_t ldo, int nthreads) {
    const int64_t C16 = C & ~(int64_t)15;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < nrows; i++) {
        const uint8_t *wr = w + (r0 + i) * ldw;
        const float *sr = scale + ((r0 + i) / BLOCK) * lds;
        float *o = out + i * ldo;
        for (int64_t c = 0; c < C16; c += 16) {
            __m256 lo, hi, s = _mm256_set1_ps(sr[c / BLOCK] * 256.0f);
            decode16(wr + c, &lo, &hi);
            _mm256_storeu_ps(o + c, _mm256_mul_ps(lo, s));
            _mm256_storeu_ps(o + c + 8, _mm256_mul_ps(hi, s));
        }
        for (int64_t c = C16; c < C; c++) o[c] = decode1(wr[c]) * sr[c / BLOCK];
    }
    return TMP_OK;
}

/* ---- y = x @ W^T: each thread owns a range of rows of W (outputs), streamed once per MAXT tokens ---- */

/* xs[n, c] = x[n, c] * scale_row[c / 128] * 256 for n < nt, c < C; zero for C <= c < Cp. */
static void fill_xs_nt(float *xs, int64_t Cp, const float *x, int64_t ldx, int nt, int64_t C, const float *sr) {
    for (int n = 0; n < nt; n++) {
        for (int64_t c = 0; c < C; c++) xs[n * Cp + c] = x[n * ldx + c] * (sr[c / BLOCK] * 256.0f);
        for (int64_t c = C; c < Cp; c++) xs[n * Cp + c] = 0.0f;
    }
}

int tmp_fp8_matmul_nt(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R, int64_t C,
                      const float *scale, int64_t lds, float *y, int64_t ldy, int nthreads) {
    if (N <= 0 || R <= 0 || C <= 0) return TMP_OK;
    const int64_t Cp = (C + 15) & ~(int64_t)15;
    /* at least 32 rows a thread, so that filling xs (N * C) stays small next to the rows' work */
    int64_t most = (R + 31) / 32;
    int threads = nthreads < most ? nthreads : (int)most;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t chunk = (R + 4 * (int64_t)T - 1) / (4 * (int64_t)T) * 4; /* rows, a multiple of 4 */
        const int64_t ra = min64(R, t * chunk), rb = min64(R, ra + chunk);
        float *xs = ra < rb ? aligned_alloc(64, (size_t)(MAXT * Cp) * sizeof(float)) : NULL;
        if (ra < rb && xs == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t n0 = 0; xs != NULL && n0 < N; n0 += MAXT) {
            const int nt = (int)min64(MAXT, N - n0);
            const float *xr[MAXT];
            for (int n = 0; n < nt; n++) xr[n] = x + (n0 + n) * ldx;
            const int direct = ra < rb && x_direct(nt, xr, C); /* bf16-valued x, taken once for all row blocks */
            for (int64_t r = ra; r < rb;) { /* one 128-row block (one scale row) at a time */
                const int64_t blk = r / BLOCK, end = min64(rb, (blk + 1) * BLOCK);
                if (direct) {
                    fp8_bf16_rows_prepped(w + r * ldw, ldw, end - r, scale + blk * lds, NULL, y + n0 * ldy + r, ldy);
                } else {
                    fill_xs_nt(xs, Cp, x + n0 * ldx, ldx, nt, C, scale + blk * lds);
                    nt_rows(nt, w + r * ldw, ldw, end - r, xs, Cp, C, y + n0 * ldy + r, ldy);
                }
                r = end;
            }
        }
        free(xs);
    }
    return failed ? TMP_ENOMEM : TMP_OK;
}

/* ---- y = x @ W: each thread owns a range of columns of W (outputs) and runs over all rows ---- */

/* xs[r, n] = x[n, r] * scale[r / 128, cb] * 256 for r < R, n < nt (row stride MAXT). */
static void fill_xs_nn(float *xs, const float *x, int64_t ldx, int nt, int64_t R, const float *scale, int64_t lds,
                       int64_t cb) {
    for (int64_t r = 0; r < R; r++) {
        const float s = scale[(r / BLOCK) * lds + cb] * 256.0f;
        for (int n = 0; n < nt; n++) xs[r * MAXT + n] = x[n * ldx + r] * s;
    }
}

/* y[n, 0:NV*8] (+)= sum_r xs[r, n] * w[r, 0:NV*8] for NT tokens, adding to y unless `first`. TAIL: only
 * `width` (< 16) columns are there (the end of W's rows); NV is then 2. R_left >= R: rows of W from w on. */
INLINE void nn_tile(const int NV, const int NT, const int TAIL, const uint8_t *w, int64_t ldw, int64_t R,
                    int64_t R_left, const float *xs, float *y, int64_t ldy, int64_t width, int first) {
    __m256 acc[MAXT][8];
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) {
        if (first) {
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) acc[n][v] = _mm256_setzero_ps();
        } else if (TAIL) {
            float in[16] = {0};
            memcpy(in, y + n * ldy, (size_t)width * sizeof(float));
            acc[n][0] = _mm256_loadu_ps(in);
            acc[n][1] = _mm256_loadu_ps(in + 8);
        } else {
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) acc[n][v] = _mm256_loadu_ps(y + n * ldy + 8 * v);
        }
    }
    uint8_t buf[16] = {0};
    for (int64_t r = 0; r < R; r++) {
        const uint8_t *wr = w + r * ldw;
        /* rows are a page apart or more: the hardware prefetcher stops at page boundaries, so ask ahead */
        if (!TAIL && r + NN_PREFETCH < R_left) _mm_prefetch((const char *)(wr + NN_PREFETCH * ldw), _MM_HINT_T0);
        if (TAIL) {
            memcpy(buf, wr, (size_t)width);
            wr = buf;
        }
        __m256 wv[8];
#pragma GCC unroll 4
        for (int u = 0; u < NV / 2; u++) decode16(wr + 16 * u, &wv[2 * u], &wv[2 * u + 1]);
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) {
            const __m256 b = _mm256_broadcast_ss(xs + r * MAXT + n);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) acc[n][v] = _mm256_fmadd_ps(b, wv[v], acc[n][v]);
        }
    }
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) {
        if (TAIL) {
            float out[16];
            _mm256_storeu_ps(out, acc[n][0]);
            _mm256_storeu_ps(out + 8, acc[n][1]);
            memcpy(y + n * ldy, out, (size_t)width * sizeof(float));
        } else {
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) _mm256_storeu_ps(y + n * ldy + 8 * v, acc[n][v]);
        }
    }
}

/* Columns [a, b) (within one 128-column block) of R rows for NT tokens: NV * 8 columns at a time, then
 * 16, then the last C % 16. */
#define NN_COLS(NT, NV)                                                                                            \
    case NT: {                                                                                                     \
        int64_t c = a;                                                                                             \
        for (; c + NV * 8 <= b; c += NV * 8) nn_tile(NV, NT, 0, w + c, ldw, R, R_left, xs, y + c, ldy, NV * 8, first);            \
        for (; c + 16 <= b; c += 16) nn_tile(2, NT, 0, w + c, ldw, R, R_left, xs, y + c, ldy, 16, first);                         \
        if (c < b) nn_tile(2, NT, 1, w + c, ldw, R, R_left, xs, y + c, ldy, b - c, first);                                        \
        break;                                                                                                     \
    }

static void nn_cols(int nt, const uint8_t *w, int64_t ldw, int64_t R, int64_t R_left, const float *xs, int64_t a,
                    int64_t b, float *y, int64_t ldy, int first) {
    switch (nt) { /* register budget: NV decoded + NT * NV accumulators */
        NN_COLS(1, 8)
        NN_COLS(2, 4)
        NN_COLS(3, 4)
        NN_COLS(4, 2)
        NN_COLS(5, 2)
        NN_COLS(6, 2)
        NN_COLS(7, 2)
        NN_COLS(8, 2)
    }
}

int tmp_fp8_matmul_nn(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R, int64_t C,
                      const float *scale, int64_t lds, float *y, int64_t ldy, int nthreads) {
    if (N <= 0 || R <= 0 || C <= 0) return TMP_OK;
    const int64_t units = (C + 15) / 16; /* 16-column units */
    int threads = nthreads < units ? nthreads : (int)units;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        /* whole 128-column blocks a thread where there are enough, so that each fills xs fewer times */
        const int64_t align = units >= 8 * (int64_t)T ? 8 : 1;
        const int64_t chunk = (units + align * T - 1) / (align * T) * align * 16; /* columns */
        const int64_t ca = min64(C, t * chunk), cb_end = min64(C, ca + chunk);
        float *xs = ca < cb_end ? aligned_alloc(64, ((size_t)(MAXT * R) * sizeof(float) + 63) & ~(size_t)63) : NULL;
        if (ca < cb_end && xs == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t n0 = 0; xs != NULL && n0 < N; n0 += MAXT) {
            const int nt = (int)min64(MAXT, N - n0);
            for (int64_t cb = ca / BLOCK; cb * BLOCK < cb_end; cb++) { /* one scale column at a time */
                const int64_t a = ca > cb * BLOCK ? ca : cb * BLOCK, b = min64(cb_end, (cb + 1) * BLOCK);
                fill_xs_nn(xs, x + n0 * ldx, ldx, nt, R, scale, lds, cb);
                /* NN_ROWS rows at a time where column chunks are under 64 bytes (nt > 1): chunks of a
                 * 128-column block share cache lines, which then stay in cache from one chunk to the next
                 * instead of leaving L2 over a tall W (measured: 1.5x at 7168 rows, nt = 4) */
                const int64_t rows = nt > 1 ? NN_ROWS : R;
                for (int64_t r0 = 0; r0 < R; r0 += rows)
                    nn_cols(nt, w + r0 * ldw, ldw, min64(rows, R - r0), R - r0, xs + r0 * MAXT, a, b, y + n0 * ldy,
                            ldy, r0 == 0);
            }
        }
        free(xs);
    }
    return failed ? TMP_ENOMEM : TMP_OK;
}
