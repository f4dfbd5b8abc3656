/* Fused gated FFNs on x12 tiles (portable, AVX2 + FMA): out[tok] += weight * down(act(gate x) * (up x)) for tiles
 * whose payload holds W [3n, D] (gate rows, up rows, down^T rows), decode-sized (a few tokens per task).
 *
 * As fp8_ffn.c with a transposed down: each thread takes a range of every task's neurons; per pass of up to 8
 * tokens it permutes their rows of x (X12_PERM within each 16 columns: the order a chunk widens to fp32 in, see
 * x12_internal.h), takes its gate and up rows' dot products, the activation, and its down rows times the
 * activations into a permuted [nt, D] sum, added (in column order) into its partial sums: out itself for
 * thread 0, a zeroed [T, D] buffer for the others, added into out by rows at the end. Every weight is decoded
 * in registers, exceptions patched into the chunk before it is widened: the products are those of the decoded
 * bf16 weights upcast to fp32, summed in fp32 (in another order than a GEMM).
 *
 * Shapes: T tokens, D hidden, n neurons of a task, nt tokens of a pass (<= MAXT).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "simd.h"
#include "ffn_common.h"
#include <string.h>

#include "x12_internal.h"

#define MAXT 8 /* tokens per pass over the weights */

int64_t tmp_x12_ffn_task_size(void) { return (int64_t)sizeof(tmp_x12_ffn_task); }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Chunk k (64 weights) of rows rows[i], i < RB, decoded with their exceptions patched in: w[i][0..3]. xn[i]: row
 * i's next exception, advanced past the chunk; xe[i]: the end of its exceptions. */
X12_INLINE void load_chunks(const int RB, const x12_view *v, const int64_t *rows, int64_t k, __m256i tab,
                            const uint32_t **xn, const uint32_t **xe, __m256i w[2][4]) {
#pragma GCC unroll 2
    for (int i = 0; i < RB; i++) {
        x12_chunk(v->lo + rows[i] * v->KP + k, v->hc + rows[i] * (v->KP / 2) + k / 2, tab, w[i]);
        x12_patch(w[i], k, &xn[i], xe[i]);
    }
}

/* y[i * MAXT + j] = row rows[i] of v . xp[j] for i < RB, j < NT (xp: permuted x rows, stride D). A2: two
 * accumulators per (row, token). */
X12_INLINE void dot_rows(const int RB, const int NT, const int A2, const x12_view *v, const int64_t *rows,
                         __m256i tab, const float *xp, float *y) {
    const int64_t D = v->D;
    __m256 acc[2][MAXT][2];
    const uint32_t *xn[2], *xe[2];
    for (int i = 0; i < RB; i++) {
        xn[i] = v->xval + v->xrow[rows[i]];
        xe[i] = v->xval + v->xrow[rows[i] + 1];
        for (int j = 0; j < NT; j++) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < D; k += X12_CHUNK) {
        const int nq = k + X12_CHUNK <= D ? 4 : 2; /* D % 64 == 32: the last chunk's weights 32-63 are padding */
        __m256i w[2][4];
        load_chunks(RB, v, rows, k, tab, xn, xe, w);
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) { /* unrolled: w stays in registers */
            if (q == nq) break;
            __m256 a[2], b[2];
            for (int i = 0; i < RB; i++) x12_widen(w[i][q], &a[i], &b[i]);
            for (int j = 0; j < NT; j++) {
                const float *x = xp + j * D + k + 16 * q;
                const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
                for (int i = 0; i < RB; i++) {
                    acc[i][j][0] = _mm256_fmadd_ps(a[i], x0, acc[i][j][0]);
                    acc[i][j][A2] = _mm256_fmadd_ps(b[i], x1, acc[i][j][A2]);
                }
            }
        }
    }
    for (int i = 0; i < RB; i++)
        for (int j = 0; j < NT; j++)
            y[i * MAXT + j] = hsum8(A2 ? _mm256_add_ps(acc[i][j][0], acc[i][j][1]) : acc[i][j][0]);
}

/* yp[j] += sum_i coef[i * MAXT + j] * row rows[i] of v (permuted columns) for i < RB, j < NT. */
X12_INLINE void axpy_rows(const int RB, const int NT, const x12_view *v, const int64_t *rows, __m256i tab,
                          const float *coef, float *yp) {
    const int64_t D = v->D;
    const uint32_t *xn[2], *xe[2];
    for (int i = 0; i < RB; i++) {
        xn[i] = v->xval + v->xrow[rows[i]];
        xe[i] = v->xval + v->xrow[rows[i] + 1];
    }
    for (int64_t k = 0; k < D; k += X12_CHUNK) {
        const int nq = k + X12_CHUNK <= D ? 4 : 2;
        __m256i w[2][4];
        load_chunks(RB, v, rows, k, tab, xn, xe, w);
#pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            if (q == nq) break;
            __m256 a[2], b[2];
            for (int i = 0; i < RB; i++) x12_widen(w[i][q], &a[i], &b[i]);
            for (int j = 0; j < NT; j++) {
                float *y = yp + j * D + k + 16 * q;
                __m256 y0 = _mm256_loadu_ps(y), y1 = _mm256_loadu_ps(y + 8);
                for (int i = 0; i < RB; i++) {
                    const __m256 c = _mm256_broadcast_ss(coef + i * MAXT + j);
                    y0 = _mm256_fmadd_ps(c, a[i], y0);
                    y1 = _mm256_fmadd_ps(c, b[i], y1);
                }
                _mm256_storeu_ps(y, y0);
                _mm256_storeu_ps(y + 8, y1);
            }
        }
    }
}

/* One pass of nt tokens over neurons [i0, i1) of a tile of n: h = act(gate xp) * (up xp), then the down rows
 * into yp (permuted, [nt, D]) with coefficients h * wt. */
#define PASS(NT, RB, A2)                                                                                         \
    case NT: {                                                                                                   \
        for (int64_t i = i0; i < i1; i++) {                                                                      \
            float g[2 * MAXT], u[2 * MAXT];                                                                      \
            const int64_t gu[2] = {i, n + i};                                                                    \
            if (RB == 2) {                                                                                       \
                dot_rows(2, NT, A2, v, gu, tab, xp, g);                                                          \
                for (int j = 0; j < NT; j++) u[j] = g[MAXT + j];                                                 \
            } else {                                                                                             \
                dot_rows(1, NT, A2, v, gu, tab, xp, g);                                                          \
                dot_rows(1, NT, A2, v, gu + 1, tab, xp, u);                                                      \
            }                                                                                                    \
            for (int j = 0; j < NT; j++) coef[(i - i0) % 2 * MAXT + j] = ffn_act(act, g[j]) * u[j] * wt[j];       \
            if ((i - i0) % 2 == 1) {                                                                             \
                const int64_t dn[2] = {2 * n + i - 1, 2 * n + i};                                                \
                axpy_rows(2, NT, v, dn, tab, coef, yp);                                                          \
            } else if (i + 1 == i1) {                                                                            \
                const int64_t dn[1] = {2 * n + i};                                                               \
                axpy_rows(1, NT, v, dn, tab, coef, yp);                                                          \
            }                                                                                                    \
        }                                                                                                        \
        break;                                                                                                   \
    }

static void pass(const x12_view *v, int64_t n, int nt, int act, int64_t i0, int64_t i1, const float *wt,
                 const float *xp, float *yp) {
    const __m256i tab = _mm256_loadu_si256((const __m256i *)v->tab);
    float coef[2 * MAXT];
    switch (nt) { /* registers: RB * NT * (1 + A2) accumulators, RB * 4 chunk vectors, a few more */
        PASS(1, 2, 1)
        PASS(2, 2, 1)
        PASS(3, 1, 1)
        PASS(4, 1, 1)
        PASS(5, 1, 0)
        PASS(6, 1, 0)
        PASS(7, 1, 0)
        PASS(8, 1, 0)
    }
}

/* Task tk's neurons [i0, i1) for every pass of its tokens into y (row stride ldy). xp, yp: MAXT * D each. */
static void task_rows(const tmp_x12_ffn_task *tk, int64_t D, const float *x, int64_t ldx, int act, int64_t i0,
                      int64_t i1, float *xp, float *yp, float *y, int64_t ldy) {
    const x12_view v = x12_view_of(tk->payload, 3 * tk->n, D);
    for (int64_t n0 = 0; n0 < tk->ntok; n0 += MAXT) {
        const int nt = (int)min64(MAXT, tk->ntok - n0);
        for (int j = 0; j < nt; j++) {
            const float *xr = x + (int64_t)tk->tok[n0 + j] * ldx;
            for (int64_t c = 0; c < D; c++) xp[j * D + c] = xr[(c & ~(int64_t)15) + X12_PERM[c & 15]];
        }
        memset(yp, 0, sizeof(float) * (size_t)(nt * D));
        pass(&v, tk->n, nt, act, i0, i1, tk->weight + n0, xp, yp);
        for (int j = 0; j < nt; j++) {
            float *o = y + (int64_t)tk->tok[n0 + j] * ldy;
            for (int64_t c = 0; c < D; c++) o[(c & ~(int64_t)15) + X12_PERM[c & 15]] += yp[j * D + c];
        }
    }
}

int tmp_x12_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                      const tmp_x12_ffn_task *tasks, int64_t ntasks, int act, int nthreads) {
    if (act < TMP_ACT_SILU || act > TMP_ACT_RELU || !x12_shape_ok(0, D)) return TMP_EINVAL;
    int64_t total = 0;
    for (int64_t q = 0; q < ntasks; q++) {
        const tmp_x12_ffn_task *tk = &tasks[q];
        if (tk->n <= 0 || tk->ntok <= 0) continue;
        for (int64_t j = 0; j < tk->ntok; j++)
            if (tk->tok[j] < 0 || tk->tok[j] >= T) return TMP_EINVAL;
        const x12_view v = x12_view_of(tk->payload, 3 * tk->n, D);
        if (!x12_valid(&v, 0, 3 * tk->n)) return TMP_EINVAL;
        total += tk->n * tk->ntok;
    }
    if (total == 0) return TMP_OK;
    float **parts = calloc((size_t)nthreads, sizeof(float *)); /* per-thread partial sums */
    uint8_t *touched = calloc((size_t)T, 1);                  /* rows of out with partial sums to add */
    if (!parts || !touched) {
        free(parts);
        free(touched);
        return TMP_ENOMEM;
    }
    for (int64_t q = 0; q < ntasks; q++)
        for (int64_t j = 0; tasks[q].n > 0 && j < tasks[q].ntok; j++) touched[tasks[q].tok[j]] = 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        float *buf = aligned_alloc(64, (sizeof(float) * (size_t)(2 * MAXT * D) + 63) & ~(size_t)63);
        float *y = out;
        int64_t ldy = ldo;
        if (t > 0 && buf) {
            y = parts[t] = calloc((size_t)(T * D), sizeof(float));
            ldy = D;
        }
        const int bad = !buf || !y;
        if (bad) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t q = 0; q < ntasks && !bad; q++) {
            if (tasks[q].n <= 0 || tasks[q].ntok <= 0) continue;
            int64_t i0, i1;
            ffn_split(tasks[q].n, nth, t, 2, &i0, &i1);
            if (i1 > i0) task_rows(&tasks[q], D, x, ldx, act, i0, i1, buf, buf + MAXT * D, y, ldy);
        }
        if (nth > 1) {
#pragma omp barrier
            ffn_add_parts(out, ldo, parts, nth, touched, T, D);
        }
        free(buf);
        if (t > 0) free(parts[t]);
    }
    free(parts);
    free(touched);
    return failed ? TMP_ENOMEM : TMP_OK;
}
