/* Fused gated FFNs on bf16 weights (AVX2 + FMA): a MoE layer's routed experts in one call,
 * out[tok] += weight * down(act(gate x) * (up x)), decode-sized (a few tokens per task), the weights in the
 * checkpoint's layout (gate, up [n, D]; down [D, n]) read where they lie.
 *
 * One parallel region, as fp8_ffn.c with checkpoint-layout downs:
 *   the token rows of x the tasks read, permuted (below) into xp (shared);
 *   phase 1: each thread takes a range of every task's neurons: gate and up rows (register tiles of rows x
 *            tokens), the activation into h (fp32, shared);
 *   barrier;
 *   phase 2: the downs split by output rows (each column d of out is one thread's, every task in order), h times
 *            the routing weight, permuted, as the tile's x.
 * Decoding is exact: 16 bf16 (one 32-byte load) are 8 fp32 of the even columns (each 32-bit lane shifted left
 * by 16) and 8 of the odd ones (the lane's high half masked), so the x a tile multiplies them with is stored
 * with each 16 columns permuted to (0, 2, .., 14, 1, 3, .., 15). fp32 FMA accumulation; the sums run in another
 * order than a GEMM's. Tasks of more than 8 tokens take passes of 8 over each block of 64 rows (from the cache).
 *
 * Shapes: T tokens, D hidden, n neurons of a task, nt tokens of a pass (<= MAXT).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "ffn_common.h"
#include "simd.h"

#include "bf16_ffn.h"

#define INLINE static inline __attribute__((always_inline))
#define MAXT 8  /* tokens per pass over the weights */
#define NBLK 64 /* rows per block of gate / up / down outputs */

int64_t tmp_bf16_ffn_task_size(void) { return (int64_t)sizeof(tmp_bf16_ffn_task); }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t pad16(int64_t c) { return (c + 15) & ~(int64_t)15; }

/* 16 bf16 at p -> fp32 of columns 0, 2, .., 14 (ev) and 1, 3, .., 15 (od): exact. */
INLINE void widen_eo(const uint16_t *p, __m256 *ev, __m256 *od) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)p);
    *ev = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    *od = _mm256_and_ps(_mm256_castsi256_ps(w), _mm256_castsi256_ps(_mm256_set1_epi32((int)0xFFFF0000u)));
}

/* p [Cp] = v [C] * s with each 16 columns permuted as widen_eo decodes them; zero past C. */
static void permute_row(float *p, const float *v, int64_t C, int64_t Cp, float s) {
    for (int64_t c = 0; c < Cp; c += 16)
        for (int k = 0; k < 8; k++) {
            p[c + k] = c + 2 * k < C ? v[c + 2 * k] * s : 0.0f;
            p[c + 8 + k] = c + 2 * k + 1 < C ? v[c + 2 * k + 1] * s : 0.0f;
        }
}

/* y[n * ldy + i] = sum_c x[n][c] * w[i, c] for RB rows and NT tokens (xr[n]: a permuted row of pad16(C) floats).
 * A2: two accumulators per (row, token), for short FMA chains where there are few (row, token) pairs. */
INLINE void nt_tile(const int RB, const int NT, const int A2, const uint16_t *w, int64_t ldw, const float *const *xr,
                    int64_t C, float *y, int64_t ldy) {
    __m256 acc[4][MAXT][2];
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) acc[i][n][0] = acc[i][n][1] = _mm256_setzero_ps();
    const int64_t C16 = C & ~(int64_t)15;
    for (int64_t c = 0; c < pad16(C); c += 16) {
        __m256 we[4], wo[4];
        if (c < C16) {
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++) {
                /* the next tile's rows, a line per line read: the hardware prefetcher starts over at every row
                 * (4 KB at D = 2048, a page of its own); 5-20% faster at 1-2 tokens than none or in-row ahead */
                if (!(c & 31)) _mm_prefetch((const char *)(w + (i + RB) * ldw + c), _MM_HINT_T0);
                widen_eo(w + i * ldw + c, &we[i], &wo[i]);
            }
        } else { /* the row's last C % 16 weights: never read past them (x is zero there) */
            uint16_t buf[16] = {0};
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++) {
                memcpy(buf, w + i * ldw + c, sizeof(uint16_t) * (size_t)(C - c));
                widen_eo(buf, &we[i], &wo[i]);
            }
        }
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) {
            const __m256 xe = _mm256_loadu_ps(xr[n] + c), xo = _mm256_loadu_ps(xr[n] + c + 8);
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++) {
                acc[i][n][0] = _mm256_fmadd_ps(xe, we[i], acc[i][n][0]);
                acc[i][n][A2] = _mm256_fmadd_ps(xo, wo[i], acc[i][n][A2]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++)
            y[n * ldy + i] = hsum8(A2 ? _mm256_add_ps(acc[i][n][0], acc[i][n][1]) : acc[i][n][0]);
}

/* Rows [0, nrows) of w for NT tokens: RB rows at a time, then single rows. */
#define NT_ROWS(NT, RB, A2, A2_1)                                                                                  \
    case NT: {                                                                                                     \
        int64_t i = 0;                                                                                             \
        for (; i + RB <= nrows; i += RB) nt_tile(RB, NT, A2, w + i * ldw, ldw, xr, C, y + i, ldy);                 \
        for (; i < nrows; i++) nt_tile(1, NT, A2_1, w + i * ldw, ldw, xr, C, y + i, ldy);                          \
        break;                                                                                                     \
    }

static void nt_rows(int nt, const uint16_t *w, int64_t ldw, int64_t nrows, const float *const *xr, int64_t C, float *y,
                    int64_t ldy) {
    /* RB and A2 measured on Zen 1 (2 threads, 1024 x 2048 experts streamed from DRAM): 3 rows up to 4 tokens, 1 row
     * for more (1 token: 21 GB/s against 18 with 4 rows; 2 tokens: 22 against 16 with 2 rows and A2) */
    switch (nt) {
        NT_ROWS(1, 3, 1, 1)
        NT_ROWS(2, 3, 0, 1)
        NT_ROWS(3, 3, 0, 1)
        NT_ROWS(4, 3, 0, 1)
        NT_ROWS(5, 1, 0, 0)
        NT_ROWS(6, 1, 0, 0)
        NT_ROWS(7, 1, 0, 0)
        NT_ROWS(8, 1, 0, 0)
    }
}

/* Phase 1 of task tk for neurons [i0, i1): h[j, i] = act(gate x_j) * (up x_j), x_j the permuted row of xp
 * (stride Dp) of token tok[j]. A block of rows takes every pass of tokens before the next (a second pass finds it
 * in the cache). gb, ub: MAXT * NBLK each. */
static void gate_up(const tmp_bf16_ffn_task *tk, const float *xp, int64_t Dp, int64_t D, int act, int64_t i0,
                    int64_t i1, float *h, float *gb, float *ub) {
    for (int64_t r = i0; r < i1; r += NBLK) {
        const int64_t m = min64(NBLK, i1 - r);
        for (int64_t n0 = 0; n0 < tk->ntok; n0 += MAXT) {
            const int nt = (int)min64(MAXT, tk->ntok - n0);
            const float *xr[MAXT];
            for (int j = 0; j < nt; j++) xr[j] = xp + (int64_t)tk->tok[n0 + j] * Dp;
            nt_rows(nt, tk->gate + r * tk->ldg, tk->ldg, m, xr, D, gb, NBLK);
            nt_rows(nt, tk->up + r * tk->ldu, tk->ldu, m, xr, D, ub, NBLK);
            for (int j = 0; j < nt; j++)
                for (int64_t k = 0; k < m; k++)
                    h[(n0 + j) * tk->n + r + k] = ffn_act(act, gb[j * NBLK + k]) * ub[j * NBLK + k];
        }
    }
}

/* Phase 2 of task tk for output columns [d0, d1): out[tok[j], d] += weight[j] * h[j] . down[d]. xs: ntok * pad16(n)
 * (h times the weights, permuted); yb: MAXT * NBLK. */
static void down_rows(const tmp_bf16_ffn_task *tk, const float *h, int64_t d0, int64_t d1, float *out, int64_t ldo,
                      float *xs, float *yb) {
    const int64_t n = tk->n, Cp = pad16(n);
    for (int64_t j = 0; j < tk->ntok; j++) permute_row(xs + j * Cp, h + j * n, n, Cp, tk->weight[j]);
    for (int64_t d = d0; d < d1; d += NBLK) {
        const int64_t m = min64(NBLK, d1 - d);
        for (int64_t n0 = 0; n0 < tk->ntok; n0 += MAXT) {
            const int nt = (int)min64(MAXT, tk->ntok - n0);
            const float *xr[MAXT];
            for (int j = 0; j < nt; j++) xr[j] = xs + (n0 + j) * Cp;
            nt_rows(nt, tk->down + d * tk->ldd, tk->ldd, m, xr, n, yb, NBLK);
            for (int j = 0; j < nt; j++) {
                float *o = out + (int64_t)tk->tok[n0 + j] * ldo + d;
                for (int64_t k = 0; k < m; k++) o[k] += yb[j * NBLK + k];
            }
        }
    }
}

int tmp_bf16_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                       const tmp_bf16_ffn_task *tasks, int64_t ntasks, int act, int nthreads) {
    if (act < TMP_ACT_SILU || act > TMP_ACT_RELU || T < 0 || D < 0 || ldx < D || ldo < D || ntasks < 0)
        return TMP_EINVAL;
    int64_t total = 0, xsmax = 0; /* xsmax: the most ntok * pad16(n) of a task */
    for (int64_t q = 0; q < ntasks; q++) {
        const tmp_bf16_ffn_task *tk = &tasks[q];
        if (tk->n < 0 || tk->ntok < 0 || tk->ldg < D || tk->ldu < D || tk->ldd < tk->n) return TMP_EINVAL;
        for (int64_t j = 0; j < tk->ntok; j++)
            if (tk->tok[j] < 0 || tk->tok[j] >= T) return TMP_EINVAL;
        total += tk->n * tk->ntok;
        xsmax = tk->ntok * pad16(tk->n) > xsmax ? tk->ntok * pad16(tk->n) : xsmax;
    }
    if (total == 0 || D == 0) return TMP_OK;
    const int64_t Dp = pad16(D);
    int64_t *hoff = malloc(sizeof(int64_t) * (size_t)(ntasks + 1)); /* h of task q at h + hoff[q] */
    float *h = malloc(sizeof(float) * (size_t)total);
    uint8_t *touched = calloc((size_t)T, 1);                        /* rows of x the tasks read */
    float *xp = aligned_alloc(64, (sizeof(float) * (size_t)(T * Dp) + 63) & ~(size_t)63); /* [T, Dp] permuted */
    int failed = !hoff || !h || !touched || !xp;
    if (failed) {
        free(hoff);
        free(h);
        free(touched);
        free(xp);
        return TMP_ENOMEM;
    }
    hoff[0] = 0;
    for (int64_t q = 0; q < ntasks; q++) {
        hoff[q + 1] = hoff[q] + tasks[q].n * tasks[q].ntok;
        for (int64_t j = 0; tasks[q].n > 0 && j < tasks[q].ntok; j++) touched[tasks[q].tok[j]] = 1;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        /* gate and up outputs, down outputs (MAXT * NBLK each), the down's x (ntok * pad16(n) of the largest) */
        const size_t floats = (size_t)(3 * MAXT * NBLK + xsmax);
        float *buf = aligned_alloc(64, (floats * sizeof(float) + 63) & ~(size_t)63);
        float *gb = buf, *ub = gb + MAXT * NBLK, *yb = ub + MAXT * NBLK, *xs = yb + MAXT * NBLK;
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < T; r++)
            if (touched[r]) permute_row(xp + r * Dp, x + r * ldx, D, Dp, 1.0f);
        for (int64_t q = 0; q < ntasks && buf; q++) { /* phase 1: neurons */
            if (hoff[q + 1] == hoff[q]) continue;
            int64_t i0, i1;
            ffn_split(tasks[q].n, nth, t, 4, &i0, &i1);
            gate_up(&tasks[q], xp, Dp, D, act, i0, i1, h + hoff[q], gb, ub);
        }
#pragma omp barrier
        int64_t d0, d1;
        ffn_split(D, nth, t, 4, &d0, &d1);
        for (int64_t q = 0; q < ntasks && buf && !failed; q++) /* phase 2: downs by output rows */
            if (hoff[q + 1] > hoff[q]) down_rows(&tasks[q], h + hoff[q], d0, d1, out, ldo, xs, yb);
        free(buf);
    }
    free(hoff);
    free(h);
    free(touched);
    free(xp);
    return failed ? TMP_ENOMEM : TMP_OK;
}
