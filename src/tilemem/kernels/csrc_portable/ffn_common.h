/* What the portable fused FFN kernels (fp8_ffn.c, ggml_quant_ffn.c, x12_ffn.c) share: the activation, a thread's
 * share of rows, and the sum of the per-thread partial outputs. Not part of the interface. */
#ifndef TILEMEM_FFN_COMMON_H
#define TILEMEM_FFN_COMMON_H

#include <math.h>
#include <stdint.h>

/* act: 0 silu, 1 gelu (erf), 2 relu (tmp_act / tmg_act): torch's F.silu, F.gelu, F.relu. */
static inline float ffn_act(int act, float g) {
    if (act == 0) return g / (1.0f + expf(-g));
    if (act == 1) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    return g > 0.0f ? g : 0.0f;
}

/* Thread t's share [a, b) of n rows among nt threads, in chunks of a multiple of `align`. */
static inline void ffn_split(int64_t n, int nt, int t, int64_t align, int64_t *a, int64_t *b) {
    const int64_t chunk = (n + align * nt - 1) / (align * nt) * align;
    *a = chunk * t < n ? chunk * t : n;
    *b = *a + chunk < n ? *a + chunk : n;
}

/* out[r] += parts[k][r] for the touched rows r < T and threads 1 <= k < nth (thread 0 wrote out itself); an
 * orphaned `omp for`: call it from every thread of the parallel region, after a barrier. */
static inline void ffn_add_parts(float *out, int64_t ldo, float *const *parts, int nth, const uint8_t *touched,
                                 int64_t T, int64_t D) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < T; r++) /* only touched rows: calloc leaves the others' pages unmapped */
        for (int k = 1; k < nth && touched[r]; k++)
            if (parts[k])
                for (int64_t d = 0; d < D; d++) out[r * ldo + d] += parts[k][r * D + d];
}

#endif
