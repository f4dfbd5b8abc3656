/* RMSNorm of token rows on AVX2 (+ FMA), as torch computes the `layers.norm.RMSNorm` module: in fp32,
 * y = w * to_dtype(x * rsqrt(mean(x^2) + eps)), the product in fp32 and rounded once to the dtype (bf16: round
 * to nearest even). A decode step calls it on one row of a few thousand values, four or more times a layer: one
 * call instead of six torch ops. Only the sum of squares' order differs from torch's (fp32 sums of 8 lanes):
 * the normalized rows agree within a few fp32 ulps before the rounding to bf16.
 *
 * Shapes: rows of D values (x row stride ldx, y row stride ldy, in elements); w [D]; bf16 (bf = 1) or fp32.
 */
#include <immintrin.h>

#include "simd.h"
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float bf2f(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16, round to nearest even (NaN stays NaN), as torch's conversion. */
INLINE uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* 8 lanes of fp32 -> 8 bf16 (round to nearest even; NaN inputs are not expected in a normalized row, and
 * take the scalar path's quiet NaN via the caller's check). */
INLINE __m128i f2bf8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

INLINE __m256 load8(const void *p, int64_t i, const int bf) {
    if (!bf) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float load1(const void *p, int64_t i, const int bf) {
    return bf ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static void norm_row(const void *x, const void *w, int64_t D, float eps, void *y, const int bf) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        const __m256 v = load8(x, d, bf);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = hsum8(acc);
    for (int64_t e = d; e < D; e++) ss += load1(x, e, bf) * load1(x, e, bf);
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    const __m256 rv = _mm256_set1_ps(r);
    int nan = 0;
    for (d = 0; d + 8 <= D; d += 8) {
        __m256 n = _mm256_mul_ps(load8(x, d, bf), rv);
        if (!bf) {
            _mm256_storeu_ps((float *)y + d, _mm256_mul_ps(_mm256_loadu_ps((const float *)w + d), n));
            continue;
        }
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(n, n, _CMP_UNORD_Q));
        n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(f2bf8(n)), 16)); /* rounded to bf16 */
        _mm_storeu_si128((__m128i *)((uint16_t *)y + d), f2bf8(_mm256_mul_ps(load8(w, d, 1), n)));
    }
    for (int64_t e = bf && nan ? 0 : d; e < D; e++) { /* the tail, or a row with a NaN in scalar form */
        const float n = load1(x, e, bf) * r;
        if (bf)
            ((uint16_t *)y)[e] = f2bf(load1(w, e, 1) * bf2f(f2bf(n)));
        else
            ((float *)y)[e] = ((const float *)w)[e] * n;
    }
}

/* y[i] = RMSNorm(x[i]) for rows i < rows; bf: bf16 x, w and y, else fp32. Returns 0. */
__attribute__((visibility("default"))) int tmp_rms_norm(const void *x, int64_t ldx, int64_t rows, int64_t D,
                                                        const void *w, int bf, float eps, void *y, int64_t ldy,
                                                        int nthreads) {
    const int64_t es = bf ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * D >= (1 << 16))
    for (int64_t i = 0; i < rows; i++) norm_row((const char *)x + i * ldx * es, w, D, eps, (char *)y + i * ldy * es, bf);
    return 0;
}
