/* Token rows as torch's CPU ops compute them, for the portable kernels that reproduce a torch module's values
 * bit for bit (norm.c, paged_decode.c): rows loaded as fp32 and stored back to the dtype (bf16 when bf, else
 * fp32), the rounding to bf16 (to nearest even, NaN to the quiet NaN), and RMSNorm's math (the sum of squares
 * in torch's order, torch_sum.h). Not part of the interface. */
#ifndef TILEMEM_PORTABLE_TORCH_ROWS_H
#define TILEMEM_PORTABLE_TORCH_ROWS_H

#include <math.h>
#include <stdint.h>

#include "paged.h"
#include "torch_sum.h"

/* fp32 -> bf16, round to nearest even (NaN stays NaN), as torch rounds. */
INLINE uint16_t bf16_bits(float f) {
    bits c = {.f = f};
    if (f != f) return 0x7fc0;
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* f rounded to the dtype (bf16 when bf, else fp32: unchanged). */
INLINE float rnd(float f, const int bf) {
    if (!bf) return f;
    bits c = {.u = (uint32_t)bf16_bits(f) << 16};
    return c.f;
}

INLINE void store1(void *p, int64_t i, float f, const int bf) {
    if (bf)
        ((uint16_t *)p)[i] = bf16_bits(f);
    else
        ((float *)p)[i] = f;
}

/* x[0..n) = p[o..o + n) as fp32 (p bf16 when bf, else fp32). */
static void load_row(float *x, const void *p, int64_t o, int64_t n, const int bf) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, load8(p, o + i, bf));
    for (; i < n; i++) x[i] = load1(p, o + i, bf);
}

/* p[o..o + n) = x[0..n), values of the dtype already (bf16: their top halves, exact). */
static void store_row(void *p, int64_t o, const float *x, int64_t n, const int bf) {
    int64_t i = 0;
    for (; bf && i + 8 <= n; i += 8) {
        const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(_mm256_loadu_ps(x + i)), 16);
        const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + o + i), h);
    }
    for (; !bf && i + 8 <= n; i += 8) _mm256_storeu_ps((float *)p + o + i, _mm256_loadu_ps(x + i));
    for (; i < n; i++) store1(p, o + i, x[i], bf);
}

/* 8 lanes rounded to the dtype (bf16: to nearest even, NaN to the quiet NaN, as bf16_bits). */
INLINE __m256 rnd8(__m256 f, const int bf) {
    if (!bf) return f;
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256 y = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_blendv_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), _mm256_cmp_ps(f, f, _CMP_UNORD_Q));
}

/* x[0..n) = w * to_dtype(x * rsqrt(mean(x^2) + eps)), rounded to the dtype: RMSNorm's torch math. */
static void rms_norm(float *x, int64_t n, const void *w, float eps, const int bf) {
    const float mean = torch_sumsq(x, n) / (float)n;
    const float r = 1.f / sqrtf(mean + eps);
    const __m256 rv = _mm256_set1_ps(r);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 y = rnd8(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), bf);
        _mm256_storeu_ps(x + i, rnd8(_mm256_mul_ps(load8(w, i, bf), y), bf));
    }
    for (; i < n; i++) x[i] = rnd(load1(w, i, bf) * rnd(x[i] * r, bf), bf);
}

#endif
