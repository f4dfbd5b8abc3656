/* Fused gated FFNs on fp8 weights: a MoE layer's routed experts (or tiles of them) in one call,
 * out[tok] += weight * down(act(gate x) * (up x)), decode-sized (a few tokens per task).
 *
 * One parallel region, as the bf16 kernel (csrc/ffn.c) does it:
 *   phase 1: each thread takes a range of every task's neurons: gate and up rows (y = xs @ W^T tiles of
 *            fp8.c, x scaled per 128-block into xs), the activation into h (fp32, shared; with bf16_h its
 *            values rounded to bf16, as the bf16 kernel's h: torch_rows.h's rnd), and for a
 *            transposed down ([n, D], down_t = 1) those neurons' down rows at once into its partial sums
 *            (thread 0: out itself; the others: a zeroed [T, D] buffer each);
 *   barrier;
 *   phase 2: checkpoint-layout downs ([D, n]) split by output rows (each row of out is one thread's, every
 *            task in order), h scaled by the routing weight and the down scales into xs;
 *   the partial sums, if any, added into out by rows.
 * Tasks of more than 8 tokens take passes of 8 (the weights are streamed once per pass): prefill-sized tasks
 * are better served by dequantized blocks and a GEMM (the Python side routes them so).
 *
 * Shapes: T tokens, D hidden, n neurons of a task, nt tokens of a pass (<= MAXT).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "ffn_common.h"

#include "fp8.h"
#include "fp8_internal.h"
#include "torch_rows.h"

int64_t tmp_fp8_ffn_task_size(void) { return (int64_t)sizeof(tmp_fp8_ffn_task); }

/* xs[j, c] = x[row j, c] * sr[c / 128] * 256 (* wt[j] where given) for j < nt, c < C; zero for C <= c < Cp.
 * Row j of x is tok[j] (or j without tok). */
static void fill_xs(float *xs, int64_t Cp, const float *x, int64_t ldx, const int32_t *tok, const float *wt, int nt,
                    int64_t C, const float *sr) {
    for (int j = 0; j < nt; j++) {
        const float *xr = x + (tok ? (int64_t)tok[j] : j) * ldx;
        float *o = xs + j * Cp;
        const float w = wt ? wt[j] * 256.0f : 256.0f;
        for (int64_t c0 = 0; c0 < C; c0 += BLOCK) {
            const float s = sr[c0 / BLOCK] * w;
            const int64_t c1 = min64(C, c0 + BLOCK);
            for (int64_t c = c0; c < c1; c++) o[c] = xr[c] * s;
        }
        for (int64_t c = C; c < Cp; c++) o[c] = 0.0f;
    }
}

/* y[tok[j]] += sum_{i in [i0, i1)} h[j, i] * wt[j] * W[i, :] for j < nt, W = dn [n, D] (a transposed down):
 * 4 rows of W at a time, streamed whole, each 16 columns decoded once for all tokens. coef: MAXT * 4 * Db. */
static void down_t_rows(const tmp_fp8_matrix *dn, int64_t D, const float *h, int64_t ldh, const int32_t *tok,
                        const float *wt, int nt, int64_t i0, int64_t i1, float *y, int64_t ldy, float *coef) {
    const int64_t Db = (D + BLOCK - 1) / BLOCK, D16 = D & ~(int64_t)15;
    for (int64_t i = i0; i < i1; i += 4) {
        const int R = (int)min64(4, i1 - i);
        const uint8_t *w[4];
        for (int k = 0; k < 4; k++) w[k] = dn->w + (i + (k < R ? k : 0)) * dn->ldw; /* missing rows: coef 0 */
        for (int j = 0; j < nt; j++)
            for (int k = 0; k < 4; k++) {
                const float hk = k < R ? h[j * ldh + i + k] * wt[j] * 256.0f : 0.0f;
                const float *sr = dn->scale + ((i + (k < R ? k : 0)) / BLOCK) * dn->lds;
                for (int64_t cb = 0; cb < Db; cb++) coef[(j * 4 + k) * Db + cb] = hk * sr[cb];
            }
        for (int64_t c = 0; c < D16; c += 16) {
            const int64_t cb = c / BLOCK;
            __m256 lo[4], hi[4];
            for (int k = 0; k < 4; k++) decode16(w[k] + c, &lo[k], &hi[k]);
            for (int j = 0; j < nt; j++) {
                float *yj = y + (int64_t)tok[j] * ldy + c;
                __m256 a0 = _mm256_loadu_ps(yj), a1 = _mm256_loadu_ps(yj + 8);
                for (int k = 0; k < 4; k++) {
                    const __m256 f = _mm256_broadcast_ss(coef + (j * 4 + k) * Db + cb);
                    a0 = _mm256_fmadd_ps(f, lo[k], a0);
                    a1 = _mm256_fmadd_ps(f, hi[k], a1);
                }
                _mm256_storeu_ps(yj, a0);
                _mm256_storeu_ps(yj + 8, a1);
            }
        }
        for (int64_t c = D16; c < D; c++) /* the last D % 16 columns */
            for (int j = 0; j < nt; j++) {
                float a = 0.0f;
                for (int k = 0; k < 4; k++) a += coef[(j * 4 + k) * Db + c / BLOCK] * (decode1(w[k][c]) / 256.0f);
                y[(int64_t)tok[j] * ldy + c] += a;
            }
    }
}

/* Phase 1 of task tk for thread's neurons [i0, i1): h[j, i] = act(gate x_j) * (up x_j) (rounded to bf16 where
 * bf16_h); with a transposed down, those neurons' down rows into y (row stride ldy). xg, xu: MAXT * pad16(D); gu:
 * 2 * MAXT * BLOCK. */
static void gate_up(const tmp_fp8_ffn_task *tk, const float *x, int64_t ldx, int64_t D, int act, int bf16_h,
                    int64_t i0, int64_t i1, float *h, float *xg, float *xu, float *gu, float *coef, float *y,
                    int64_t ldy) {
    const int64_t Cp = (D + 15) & ~(int64_t)15; /* xs row stride: nt_tile reads exactly pad16(C) columns */
    float *gb = gu, *ub = gu + MAXT * BLOCK; /* [nt][BLOCK] gate and up outputs of one row block */
    for (int64_t n0 = 0; n0 < tk->ntok; n0 += MAXT) {
        const int nt = (int)min64(MAXT, tk->ntok - n0);
        const float *xr[MAXT]; /* bf16-valued x: no xs, taken once for all row blocks (x_direct) */
        for (int j = 0; j < nt; j++) xr[j] = x + (int64_t)tk->tok[n0 + j] * ldx;
        const int direct = i0 < i1 && x_direct(nt, xr, D);
        for (int64_t r = i0; r < i1;) { /* one 128-row block (one scale row) at a time */
            const int64_t blk = r / BLOCK, end = min64(i1, (blk + 1) * BLOCK);
            if (direct) {
                fp8_bf16_rows_prepped(tk->gate.w + r * tk->gate.ldw, tk->gate.ldw, end - r,
                                      tk->gate.scale + blk * tk->gate.lds, NULL, gb, BLOCK);
                fp8_bf16_rows_prepped(tk->up.w + r * tk->up.ldw, tk->up.ldw, end - r, tk->up.scale + blk * tk->up.lds,
                                      NULL, ub, BLOCK);
            } else {
                fill_xs(xg, Cp, x, ldx, tk->tok + n0, NULL, nt, D, tk->gate.scale + blk * tk->gate.lds);
                fill_xs(xu, Cp, x, ldx, tk->tok + n0, NULL, nt, D, tk->up.scale + blk * tk->up.lds);
                nt_rows(nt, tk->gate.w + r * tk->gate.ldw, tk->gate.ldw, end - r, xg, Cp, D, gb, BLOCK);
                nt_rows(nt, tk->up.w + r * tk->up.ldw, tk->up.ldw, end - r, xu, Cp, D, ub, BLOCK);
            }
            for (int j = 0; j < nt; j++)
                for (int64_t k = 0; k < end - r; k++)
                    h[(n0 + j) * tk->n + r + k] = rnd(ffn_act(act, gb[j * BLOCK + k]) * ub[j * BLOCK + k], bf16_h);
            r = end;
        }
        if (tk->down_t)
            down_t_rows(&tk->down, D, h + n0 * tk->n, tk->n, tk->tok + n0, tk->weight + n0, nt, i0, i1, y, ldy,
                        coef);
    }
}

/* Phase 2 of task tk (checkpoint-layout down [D, n]) for output rows [d0, d1): out[tok] += wt * h @ down^T. */
static void down_rows(const tmp_fp8_ffn_task *tk, const float *h, int64_t d0, int64_t d1, float *out, int64_t ldo,
                      float *xs, float *yb) {
    const int64_t n = tk->n, Cp = (n + 15) & ~(int64_t)15;
    for (int64_t n0 = 0; n0 < tk->ntok; n0 += MAXT) {
        const int nt = (int)min64(MAXT, tk->ntok - n0);
        const float *hr[MAXT]; /* bf16-valued h (bf16_h): no xs, the routing weights after the sums */
        for (int j = 0; j < nt; j++) hr[j] = h + (n0 + j) * n;
        const int direct = d0 < d1 && x_direct(nt, hr, n);
        for (int64_t d = d0; d < d1;) {
            const int64_t blk = d / BLOCK, end = min64(d1, (blk + 1) * BLOCK);
            if (direct) {
                fp8_bf16_rows_prepped(tk->down.w + d * tk->down.ldw, tk->down.ldw, end - d,
                                      tk->down.scale + blk * tk->down.lds, tk->weight + n0, yb, BLOCK);
            } else {
                fill_xs(xs, Cp, h + n0 * n, n, NULL, tk->weight + n0, nt, n, tk->down.scale + blk * tk->down.lds);
                nt_rows(nt, tk->down.w + d * tk->down.ldw, tk->down.ldw, end - d, xs, Cp, n, yb, BLOCK);
            }
            for (int j = 0; j < nt; j++) {
                float *o = out + (int64_t)tk->tok[n0 + j] * ldo + d;
                for (int64_t k = 0; k < end - d; k++) o[k] += yb[j * BLOCK + k];
            }
            d = end;
        }
    }
}

int tmp_fp8_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                      const tmp_fp8_ffn_task *tasks, int64_t ntasks, int act, int bf16_h, int nthreads) {
    if (act < TMP_ACT_SILU || act > TMP_ACT_RELU) return TMP_EINVAL;
    int64_t total = 0, nmax = 0;
    int any_t = 0, any_d = 0;
    for (int64_t q = 0; q < ntasks; q++) {
        const tmp_fp8_ffn_task *tk = &tasks[q];
        for (int64_t j = 0; j < tk->ntok; j++)
            if (tk->tok[j] < 0 || tk->tok[j] >= T) return TMP_EINVAL;
        if (tk->n <= 0 || tk->ntok <= 0) continue;
        total += tk->n * tk->ntok;
        nmax = tk->n > nmax ? tk->n : nmax;
        any_t |= tk->down_t != 0;
        any_d |= tk->down_t == 0;
    }
    if (total == 0 || D <= 0) return TMP_OK;
    const int64_t Kp = ((D > nmax ? D : nmax) + 15) & ~(int64_t)15, Db = (D + BLOCK - 1) / BLOCK;
    int64_t *hoff = malloc(sizeof(int64_t) * (size_t)(ntasks + 1)); /* h of task q at h + hoff[q] */
    float *h = malloc(sizeof(float) * (size_t)total);
    float **parts = calloc((size_t)nthreads, sizeof(float *)); /* per-thread partial sums (transposed downs) */
    uint8_t *touched = any_t ? calloc((size_t)T, 1) : NULL; /* rows of out with partial sums to add */
    int failed = !hoff || !h || !parts || (any_t && !touched);
    if (failed) {
        free(hoff);
        free(h);
        free(parts);
        free(touched);
        return TMP_ENOMEM;
    }
    for (int64_t q = 0; q < ntasks && any_t; q++)
        for (int64_t j = 0; tasks[q].down_t && tasks[q].n > 0 && j < tasks[q].ntok; j++) touched[tasks[q].tok[j]] = 1;
    hoff[0] = 0;
    for (int64_t q = 0; q < ntasks; q++)
        hoff[q + 1] = hoff[q] + (tasks[q].n > 0 && tasks[q].ntok > 0 ? tasks[q].n * tasks[q].ntok : 0);
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        /* xg, xu (MAXT * Kp each; Kp = pad16 of D or the widest task), gate/up outputs (2 * MAXT * BLOCK),
         * down_t coefficients (MAXT * 4 * Db) */
        const size_t floats = (size_t)(2 * MAXT * Kp + 2 * MAXT * BLOCK + MAXT * 4 * Db);
        float *buf = aligned_alloc(64, (floats * sizeof(float) + 63) & ~(size_t)63);
        float *xg = buf, *xu = buf + MAXT * Kp, *gu = xu + MAXT * Kp, *coef = gu + 2 * MAXT * BLOCK;
        float *y = out;
        int64_t ldy = ldo;
        if (t > 0 && any_t && buf) {
            y = parts[t] = calloc((size_t)(T * D), sizeof(float));
            ldy = D;
        }
        const int bad = !buf || !y;
        if (bad) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t q = 0; q < ntasks && !bad; q++) { /* phase 1: neurons */
            if (hoff[q + 1] == hoff[q]) continue;
            int64_t i0, i1;
            ffn_split(tasks[q].n, nth, t, 4, &i0, &i1);
            gate_up(&tasks[q], x, ldx, D, act, bf16_h, i0, i1, h + hoff[q], xg, xu, gu, coef, y, ldy);
        }
        if (any_d) {
#pragma omp barrier
            int64_t d0, d1;
            ffn_split(D, nth, t, 4, &d0, &d1);
            for (int64_t q = 0; q < ntasks && !bad; q++) /* phase 2: checkpoint-layout downs by output rows */
                if (!tasks[q].down_t && hoff[q + 1] > hoff[q])
                    down_rows(&tasks[q], h + hoff[q], d0, d1, out, ldo, xg, gu);
        }
        if (any_t && nth > 1) {
#pragma omp barrier
            ffn_add_parts(out, ldo, parts, nth, touched, T, D);
        }
        free(buf);
        if (t > 0 && any_t) free(parts[t]);
    }
    free(hoff);
    free(h);
    free(parts);
    free(touched);
    return failed ? TMP_ENOMEM : TMP_OK;
}
