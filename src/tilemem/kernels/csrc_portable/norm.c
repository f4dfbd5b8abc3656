/* RMSNorm of token rows on AVX2 (+ FMA), as torch computes the `layers.norm.RMSNorm` module: in fp32,
 * y = w * to_dtype(x * rsqrt(mean(x^2) + eps)), the product rounded to the dtype (torch_rows.h: the sum of squares
 * in torch's order), so the values are torch's bit for bit (on torch builds whose CPU kernels add 8 lanes: AVX2
 * ones). A decode step calls it on one row of a few thousand values, four or more times a layer: one call instead
 * of six torch ops.
 *
 * Shapes: rows of D values (x row stride ldx, y row stride ldy, in elements); w [D]; bf16 (bf = 1) or fp32.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp8.h"
#include "torch_rows.h"

/* y[i] = RMSNorm(x[i]) for rows i < rows; bf: bf16 x, w and y, else fp32. Returns 0, or 1 (TMP_ENOMEM) without
 * memory for a row's fp32 copy. */
TMP_API int tmp_rms_norm(const void *x, int64_t ldx, int64_t rows, int64_t D, const void *w, int bf, float eps, void *y,
                         int64_t ldy, int nthreads) {
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (rows * D >= (1 << 16))
    {
        float *f = malloc(sizeof(float) * (size_t)(D > 0 ? D : 1)); /* the row as fp32, as torch's x.float() */
        if (!f) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            if (!f) continue;
            load_row(f, x, i * ldx, D, bf);
            rms_norm(f, D, w, eps, bf);
            store_row(y, i * ldy, f, D, bf);
        }
        free(f);
    }
    return failed;
}
