/* Decode-sized products with bf16 weights on AVX2 (+ FMA): y = x @ W^T and y = x @ W for a few fp32 token rows.
 * torch's own bf16 GEMV on CPUs without AVX512-BF16 converts element by element (a few GB/s per core); here each
 * 8 bf16 weights become 8 floats with one widening and one shift (bf16 is the top half of an fp32), so the
 * product runs at the speed the weights stream from memory. fp32 accumulation, as torch's.
 *
 * Shapes: M token rows (any number; 4 per pass over a row, or all at once by columns), R weight rows, C columns.
 */
#include <immintrin.h>

#include "simd.h"
#include <omp.h>
#include <stdint.h>

#include "fp8.h"

#define INLINE static inline __attribute__((always_inline))
#define PASS 4 /* tokens per pass over a weight row (matmul_nt): 2 accumulators each, 8 in registers */

/* 16 bf16 -> 16 floats (exact: bf16 is the top 16 bits of an fp32). */
INLINE void widen16(const uint16_t *p, __m256 *lo, __m256 *hi) {
    const __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8)));
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
    *hi = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
}

INLINE float widen1(uint16_t v) {
    union {
        uint32_t u;
        float f;
    } c = {.u = (uint32_t)v << 16};
    return c.f;
}

/* y[m, r] = sum_c x[m, c] * w[r, c] for one row r and tokens m0 .. m0 + nt - 1 (nt <= PASS). */
INLINE void row_nt(const uint16_t *w, int64_t C, const float *x, int64_t ldx, int nt, float *y, int64_t ldy) {
    __m256 acc[PASS][2];
    for (int m = 0; m < PASS; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const int64_t C16 = C & ~(int64_t)15;
    for (int64_t c = 0; c < C16; c += 16) {
        __m256 lo, hi;
        widen16(w + c, &lo, &hi);
        for (int m = 0; m < nt; m++) {
            acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + c), lo, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + c + 8), hi, acc[m][1]);
        }
    }
    for (int m = 0; m < nt; m++) {
        float s = hsum8(_mm256_add_ps(acc[m][0], acc[m][1]));
        for (int64_t c = C16; c < C; c++) s += x[m * ldx + c] * widen1(w[c]);
        y[m * ldy] = s;
    }
}

/* One token: 4 rows at a time, 64 bytes of each per step (8 independent FMA chains, 4 weight streams). */
static void rows_nt1(const uint16_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t C, const float *x, float *y) {
    const int64_t C16 = C & ~(int64_t)15;
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        __m256 acc[4][2];
        for (int k = 0; k < 4; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();
        for (int64_t c = 0; c < C16; c += 16) {
            const __m256 xl = _mm256_loadu_ps(x + c), xh = _mm256_loadu_ps(x + c + 8);
            for (int k = 0; k < 4; k++) {
                __m256 lo, hi;
                widen16(w + (r + k) * ldw + c, &lo, &hi);
                acc[k][0] = _mm256_fmadd_ps(xl, lo, acc[k][0]);
                acc[k][1] = _mm256_fmadd_ps(xh, hi, acc[k][1]);
            }
        }
        for (int k = 0; k < 4; k++) {
            float s = hsum8(_mm256_add_ps(acc[k][0], acc[k][1]));
            for (int64_t c = C16; c < C; c++) s += x[c] * widen1(w[(r + k) * ldw + c]);
            y[r + k] = s;
        }
    }
    for (; r < r1; r++) row_nt(w + r * ldw, C, x, 0, 1, y + r, 0);
}

int tmp_bf16_matmul_nt(const uint16_t *w, int64_t ldw, int64_t R, int64_t C, const float *x, int64_t ldx, int64_t M,
                       float *y, int64_t ldy, int nthreads) {
    if (R < 0 || C < 0 || M < 0 || ldw < C || ldx < C || ldy < R) return TMP_EINVAL;
    if (M == 1) {
#pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t chunk = (R + 4 * nt - 1) / (4 * nt) * 4;
            const int64_t r0 = t * chunk < R ? t * chunk : R, r1 = r0 + chunk < R ? r0 + chunk : R;
            rows_nt1(w, ldw, r0, r1, C, x, y);
        }
        return TMP_OK;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; r++)
        for (int64_t m0 = 0; m0 < M; m0 += PASS) /* a second pass finds the row in L1 */
            row_nt(w + r * ldw, C, x + m0 * ldx, ldx, (int)(M - m0 < PASS ? M - m0 : PASS), y + m0 * ldy + r, ldy);
    return TMP_OK;
}

/* y[m, c] = sum_r x[m, r] * w[r, c] for columns [c0, c1) (a multiple of 16 wide but for the last range). */
static void cols_nn(const uint16_t *w, int64_t ldw, int64_t R, int64_t c0, int64_t c1, const float *x, int64_t ldx,
                    int64_t M, float *y, int64_t ldy) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = c0; c < c1; c++) y[m * ldy + c] = 0.0f;
    const int64_t c16 = c0 + ((c1 - c0) & ~(int64_t)15), R4 = R & ~(int64_t)3;
    for (int64_t r = 0; r < R4; r += 4) { /* 4 rows per load and store of y */
        const uint16_t *wr = w + r * ldw;
        for (int64_t c = c0; c < c16; c += 16) {
            __m256 lo[4], hi[4];
            for (int k = 0; k < 4; k++) widen16(wr + k * ldw + c, &lo[k], &hi[k]);
            for (int64_t m = 0; m < M; m++) {
                float *o = y + m * ldy + c;
                __m256 a = _mm256_loadu_ps(o), b = _mm256_loadu_ps(o + 8);
                for (int k = 0; k < 4; k++) {
                    const __m256 xv = _mm256_broadcast_ss(x + m * ldx + r + k);
                    a = _mm256_fmadd_ps(xv, lo[k], a);
                    b = _mm256_fmadd_ps(xv, hi[k], b);
                }
                _mm256_storeu_ps(o, a);
                _mm256_storeu_ps(o + 8, b);
            }
        }
    }
    for (int64_t r = R4; r < R; r++) { /* the last R % 4 rows */
        const uint16_t *wr = w + r * ldw;
        for (int64_t c = c0; c < c16; c += 16) {
            __m256 lo, hi;
            widen16(wr + c, &lo, &hi);
            for (int64_t m = 0; m < M; m++) {
                const __m256 xv = _mm256_broadcast_ss(x + m * ldx + r);
                float *o = y + m * ldy + c;
                _mm256_storeu_ps(o, _mm256_fmadd_ps(xv, lo, _mm256_loadu_ps(o)));
                _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(xv, hi, _mm256_loadu_ps(o + 8)));
            }
        }
    }
    for (int64_t r = 0; r < R; r++) /* the last (c1 - c0) % 16 columns */
        for (int64_t c = c16; c < c1; c++)
            for (int64_t m = 0; m < M; m++) y[m * ldy + c] += x[m * ldx + r] * widen1(w[r * ldw + c]);
}

int tmp_bf16_matmul_nn(const uint16_t *w, int64_t ldw, int64_t R, int64_t C, const float *x, int64_t ldx, int64_t M,
                       float *y, int64_t ldy, int nthreads) {
    if (R < 0 || C < 0 || M < 0 || ldw < C || ldx < R || ldy < C) return TMP_EINVAL;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t chunk = (C + 16 * nt - 1) / (16 * nt) * 16;
        const int64_t c0 = t * chunk < C ? t * chunk : C, c1 = c0 + chunk < C ? c0 + chunk : C;
        if (c1 > c0) cols_nn(w, ldw, R, c0, c1, x, ldx, M, y, ldy);
    }
    return TMP_OK;
}
