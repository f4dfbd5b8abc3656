/* Prefill-sized matmuls on ggml-block weights: y = x @ W^T in fp32 with the weights dequantized a few rows at a
 * time into a per-thread buffer (exactly ggml's values, see tmg_dequantize) and multiplied by register-blocked FMAs,
 * the activations transposed once so that a vector holds 8 tokens.
 *
 * Where it pays: a few dozen tokens (a prefill's experts see ~N * top_k / E each). There the int8 kernels run at the
 * maddubs + madd ceiling, and torch's GEMM on dequantized rows loses to its own packing (measured on a 2-thread
 * Zen 1, Q4_K 1024 x 2048: 32 tokens int8 2.7 ms, dequantize + torch 4.1 ms). The weights are decoded once per
 * call, so the cost is that of fp32 FMAs plus 1 / N of a decode.
 *
 * Shapes: N tokens, W [R, C], x [N, C], y [N, R]; xt [C / 1, NB, 16]: x transposed by blocks of 16 tokens
 * (zeros past N); RP rows of W a panel, dequantized into wbuf [RP, C].
 */
#include "ggml_quant.h"
#include "ggml_quant_internal.h"

#include <omp.h>
#include <stdlib.h>

#define RP 6  /* rows of W a panel (6 x 2 accumulators + 2 activations + 1 weight: 15 of 16 registers) */
#define TBW 16 /* tokens a block of xt */
#define TMG_DQ_TOKENS 256 /* tokens a pass (xt: 2 MiB at C = 2048, in L2 + L3): longer prompts take several */

/* y[n * ldy + r] for rows r0 + (0..rp), tokens t0 + (0..nt) of the token block at xb ([C, TBW]), V vectors of 8. */
INLINE void panel(const int NR, const int V, const float *wbuf, int64_t C, const float *xb, float *y, int64_t ldy,
                  int64_t r0, int64_t t0, int nt) {
    __m256 acc[RP][2];
#pragma GCC unroll 6
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 2
        for (int v = 0; v < V; v++) acc[r][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < C; k++) {
        __m256 xv[2];
#pragma GCC unroll 2
        for (int v = 0; v < V; v++) xv[v] = _mm256_loadu_ps(xb + k * TBW + 8 * v);
#pragma GCC unroll 6
        for (int r = 0; r < NR; r++) {
            const __m256 wv = _mm256_broadcast_ss(wbuf + r * C + k);
#pragma GCC unroll 2
            for (int v = 0; v < V; v++) acc[r][v] = _mm256_fmadd_ps(wv, xv[v], acc[r][v]);
        }
    }
    float out[RP][TBW] = {{0}}; /* (zeroed: the compiler cannot tell that nt <= 8 V) */
#pragma GCC unroll 6
    for (int r = 0; r < NR; r++)
#pragma GCC unroll 2
        for (int v = 0; v < V; v++) _mm256_storeu_ps(out[r] + 8 * v, acc[r][v]);
    for (int n = 0; n < nt; n++)
        for (int r = 0; r < NR; r++) y[(t0 + n) * ldy + r0 + r] = out[r][n];
}

#define PANEL_CASE(NR)                                                                                             \
    case NR:                                                                                                       \
        if (V == 2)                                                                                                \
            panel(NR, 2, wbuf, C, xb, y, ldy, r0, t0, nt);                                                         \
        else                                                                                                       \
            panel(NR, 1, wbuf, C, xb, y, ldy, r0, t0, nt);                                                         \
        break;

static void panel_any(int nr, int V, const float *wbuf, int64_t C, const float *xb, float *y, int64_t ldy, int64_t r0,
                      int64_t t0, int nt) {
    switch (nr) {
        PANEL_CASE(1)
        PANEL_CASE(2)
        PANEL_CASE(3)
        PANEL_CASE(4)
        PANEL_CASE(5)
        PANEL_CASE(6)
    }
}

/* Tokens [0, N) of x, y (rows at x, y) in one pass: x transposed into xt, then each thread's panels of RP rows
 * dequantized into its wbuf and multiplied by every token block. */
static int pass(const tmg_kernels *k, int64_t nb, const float *x, int64_t ldx, int64_t N, const uint8_t *w,
                int64_t ldw, int64_t R, int64_t C, float *y, int64_t ldy, int threads, float *xt) {
    const int64_t NB = (N + TBW - 1) / TBW;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < NB; b++) { /* xt [NB, C, TBW]: block b's tokens in lanes, zeros past N */
            float *xb = xt + b * C * TBW;
            const int64_t nt = gmin64(TBW, N - b * TBW);
            for (int64_t c = 0; c < C; c++) {
                for (int64_t n = 0; n < nt; n++) xb[c * TBW + n] = x[(b * TBW + n) * ldx + c];
                for (int64_t n = nt; n < TBW; n++) xb[c * TBW + n] = 0.0f;
            }
        }
        float *wbuf = aligned_alloc(64, (size_t)(RP * C) * sizeof(float)); /* [RP, C] */
        if (wbuf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t panels = (R + RP - 1) / RP, per = (panels + T - 1) / T;
        const int64_t p0 = gmin64(panels, t * per), p1 = gmin64(panels, p0 + per);
        for (int64_t p = p0; p < p1 && wbuf; p++) {
            const int64_t r0 = p * RP;
            const int nr = (int)gmin64(RP, R - r0);
            for (int r = 0; r < nr; r++) k->dequant(w + (r0 + r) * ldw, nb, wbuf + r * C);
            for (int64_t b = 0; b < NB; b++) {
                const int nt = (int)gmin64(TBW, N - b * TBW);
                panel_any(nr, nt > 8 ? 2 : 1, wbuf, C, xt + b * C * TBW, y, ldy, r0, b * TBW, nt);
            }
        }
        free(wbuf);
    }
    return failed ? TMG_ENOMEM : TMG_OK;
}

int tmg_matmul_dq(int type, const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                  int64_t C, float *y, int64_t ldy, int nthreads) {
    tmg_kernels k;
    if (!tmg_lookup(type, &k) || C % tmg_block_weights(type)) return TMG_EINVAL;
    if (N <= 0 || R <= 0 || C <= 0) return TMG_OK;
    const int64_t nb = C / tmg_block_weights(type), chunk = gmin64(N, TMG_DQ_TOKENS);
    float *xt = aligned_alloc(64, (size_t)(((chunk + TBW - 1) / TBW) * C * TBW) * sizeof(float));
    if (xt == NULL) return TMG_ENOMEM;
    const int64_t most = (R + 4 * RP - 1) / (4 * RP); /* at least 4 panels a thread */
    const int threads = nthreads < most ? nthreads : (int)most;
    int status = TMG_OK;
    for (int64_t n0 = 0; n0 < N && status == TMG_OK; n0 += chunk)
        status = pass(&k, nb, x + n0 * ldx, ldx, gmin64(chunk, N - n0), w, ldw, R, C, y + n0 * ldy, ldy, threads, xt);
    free(xt);
    return status;
}
