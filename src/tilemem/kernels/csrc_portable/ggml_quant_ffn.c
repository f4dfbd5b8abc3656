/* Fused gated FFNs on ggml-block weights: a MoE layer's routed experts in one call,
 * out[tok] += weight * down(act(gate x) * (up x)), decode-sized (a few tokens per task), exact or fast.
 *
 * One parallel region:
 *   phase 1: each thread takes a range of every task's neurons: gate and up rows for the task's tokens
 *            (gathered, and for the fast way quantized, per pass of 8), the activation into h (fp32, shared);
 *   barrier;
 *   phase 2: the downs ([D, n]) split by output rows (each column range of out is one thread's, every task
 *            in order): y = h @ down^T, out[tok] += weight * y.
 * Tasks of more than 8 tokens take passes of 8 (the weights are streamed once per pass): prefill-sized tasks
 * are better served by dequantized blocks and a GEMM (the Python side routes them so).
 *
 * Shapes: T tokens, D hidden, n neurons of a task, nt tokens of a pass (<= GMAXT), K = D or the widest n,
 * rounded up to 256 (the row stride of the per-thread buffers).
 */
#include "ggml_quant.h"
#include "ggml_quant_internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "ffn_common.h"

int64_t tmg_ffn_task_size(void) { return (int64_t)sizeof(tmg_ffn_task); }

/* A thread's buffers: gathered rows xs [GMAXT, K], their int8 forms for blocks of 32 (slot 0) and 256 (slot 1),
 * matmul outputs ya, yb [GMAXT, K]. */
typedef struct {
    float *xs, *ya, *yb;
    int8_t *q[2];
    float *d[2];
    int16_t *s[2];
    int64_t K;
} scratch;

static size_t scratch_bytes(int64_t K) {
    const size_t rows = 3 * K * sizeof(float), slot = (K / 32) * sizeof(float) + (K / 16) * sizeof(int16_t) + K;
    return (size_t)GMAXT * (rows + 2 * slot);
}

static void scratch_init(scratch *S, void *mem, int64_t K) {
    char *p = mem;
    S->K = K;
    S->xs = (float *)p, p += GMAXT * K * sizeof(float);
    S->ya = (float *)p, p += GMAXT * K * sizeof(float);
    S->yb = (float *)p, p += GMAXT * K * sizeof(float);
    for (int i = 0; i < 2; i++) {
        S->d[i] = (float *)p, p += GMAXT * (K / 32) * sizeof(float);
        S->s[i] = (int16_t *)p, p += GMAXT * (K / 16) * sizeof(int16_t);
        S->q[i] = (int8_t *)p, p += GMAXT * K;
    }
}

/* The fast way's int8 rows of xs (nt rows of C values) for a matrix of `type`, where not there yet (*have). */
static void quantize_for(int type, const scratch *S, int nt, int64_t C, int *have) {
    const int slot = tmg_block_weights(type) == 256;
    if (have[slot]) return;
    const int64_t QB = slot ? 256 : 32;
    for (int j = 0; j < nt; j++)
        quantize_x(S->xs + j * S->K, C, QB, S->q[slot] + j * S->K, S->d[slot] + j * (S->K / QB),
                   S->s[slot] + j * (S->K / 16));
    have[slot] = 1;
}

/* y [nt, rows r0..r1 of m] (row stride ldy) = xs [nt, C] @ m[r0:r1]^T, exact or fast (quantized first). */
static void rows(const tmg_matrix *m, int64_t C, int nt, int64_t r0, int64_t r1, const scratch *S, int exact,
                 int *have, float *y, int64_t ldy) {
    tmg_kernels k;
    tmg_lookup((int)m->type, &k);
    const int64_t QB = tmg_block_weights((int)m->type), nb = C / QB;
    const uint8_t *w = m->w + r0 * m->ldw;
    if (exact) {
        k.exact(nt, w, m->ldw, 0, r1 - r0, nb, S->xs, S->K, y, ldy);
        return;
    }
    quantize_for((int)m->type, S, nt, C, have);
    const int slot = QB == 256;
    const tmg_xq X = {S->q[slot], S->d[slot], S->s[slot], S->K, S->K / QB, S->K / 16};
    k.fast(nt, w, m->ldw, 0, r1 - r0, nb, &X, y, ldy);
}

static int valid(const tmg_ffn_task *tk, int64_t T, int64_t D) {
    const int64_t types[3] = {tk->gate.type, tk->up.type, tk->down.type};
    for (int i = 0; i < 3; i++)
        if (tmg_block_weights((int)types[i]) == 0) return 0;
    if (tk->n < 0 || tk->ntok < 0) return 0;
    if (D % tmg_block_weights((int)types[0]) || D % tmg_block_weights((int)types[1])) return 0;
    if (tk->n % tmg_block_weights((int)types[2])) return 0;
    for (int64_t j = 0; j < tk->ntok; j++)
        if (tk->tok[j] < 0 || tk->tok[j] >= T) return 0;
    return 1;
}

/* Phase 1 of task tk for neurons [i0, i1): h[j, i] = act(gate x_j) * (up x_j). */
static void gate_up(const tmg_ffn_task *tk, const float *x, int64_t ldx, int64_t D, int act, int exact, int64_t i0,
                    int64_t i1, float *h, const scratch *S) {
    for (int64_t n0 = 0; n0 < tk->ntok; n0 += GMAXT) {
        const int nt = (int)gmin64(GMAXT, tk->ntok - n0);
        for (int j = 0; j < nt; j++) memcpy(S->xs + j * S->K, x + (int64_t)tk->tok[n0 + j] * ldx, D * sizeof(float));
        int have[2] = {0, 0};
        rows(&tk->gate, D, nt, i0, i1, S, exact, have, S->ya, S->K);
        rows(&tk->up, D, nt, i0, i1, S, exact, have, S->yb, S->K);
        for (int j = 0; j < nt; j++)
            for (int64_t i = 0; i < i1 - i0; i++)
                h[(n0 + j) * tk->n + i0 + i] = ffn_act(act, S->ya[j * S->K + i]) * S->yb[j * S->K + i];
    }
}

/* Phase 2 of task tk for output rows [d0, d1): out[tok] += weight * h @ down[d0:d1]^T. */
static void down(const tmg_ffn_task *tk, const float *h, int exact, int64_t d0, int64_t d1, float *out, int64_t ldo,
                 const scratch *S) {
    for (int64_t n0 = 0; n0 < tk->ntok; n0 += GMAXT) {
        const int nt = (int)gmin64(GMAXT, tk->ntok - n0);
        for (int j = 0; j < nt; j++) memcpy(S->xs + j * S->K, h + (n0 + j) * tk->n, tk->n * sizeof(float));
        int have[2] = {0, 0};
        rows(&tk->down, tk->n, nt, d0, d1, S, exact, have, S->ya, S->K);
        for (int j = 0; j < nt; j++) {
            float *o = out + (int64_t)tk->tok[n0 + j] * ldo + d0;
            const float wt = tk->weight[n0 + j];
            for (int64_t d = 0; d < d1 - d0; d++) o[d] += wt * S->ya[j * S->K + d];
        }
    }
}

int tmg_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                  const tmg_ffn_task *tasks, int64_t ntasks, int act, int exact, int nthreads) {
    if (act < TMG_ACT_SILU || act > TMG_ACT_RELU) return TMG_EINVAL;
    int64_t total = 0, nmax = 0;
    for (int64_t q = 0; q < ntasks; q++) {
        if (!valid(&tasks[q], T, D)) return TMG_EINVAL;
        if (tasks[q].n == 0 || tasks[q].ntok == 0) continue;
        total += tasks[q].n * tasks[q].ntok;
        nmax = tasks[q].n > nmax ? tasks[q].n : nmax;
    }
    if (total == 0 || D <= 0) return TMG_OK;
    const int64_t K = ((D > nmax ? D : nmax) + 255) & ~(int64_t)255;
    int64_t *hoff = malloc(sizeof(int64_t) * (size_t)(ntasks + 1)); /* h of task q at h + hoff[q] */
    float *h = malloc(sizeof(float) * (size_t)total);
    int failed = !hoff || !h;
    if (failed) {
        free(hoff);
        free(h);
        return TMG_ENOMEM;
    }
    hoff[0] = 0;
    for (int64_t q = 0; q < ntasks; q++) hoff[q + 1] = hoff[q] + tasks[q].n * tasks[q].ntok;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        void *mem = aligned_alloc(64, (scratch_bytes(K) + 63) & ~(size_t)63);
        scratch S;
        if (mem == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            scratch_init(&S, mem, K);
        }
        for (int64_t q = 0; q < ntasks && mem; q++) { /* phase 1: neurons */
            if (hoff[q + 1] == hoff[q]) continue;
            int64_t i0, i1;
            ffn_split(tasks[q].n, nth, t, 1, &i0, &i1);
            if (i0 < i1) gate_up(&tasks[q], x, ldx, D, act, exact, i0, i1, h + hoff[q], &S);
        }
#pragma omp barrier
        int64_t d0, d1;
        ffn_split(D, nth, t, 1, &d0, &d1);
        for (int64_t q = 0; q < ntasks && mem && !failed && d0 < d1; q++) /* phase 2: downs by output rows */
            if (hoff[q + 1] > hoff[q]) down(&tasks[q], h + hoff[q], exact, d0, d1, out, ldo, &S);
        free(mem);
    }
    free(hoff);
    free(h);
    return failed ? TMG_ENOMEM : TMG_OK;
}
