/* AVX2 helpers every portable kernel shares. Not part of the interface. */
#ifndef TILEMEM_PORTABLE_SIMD_H
#define TILEMEM_PORTABLE_SIMD_H

#include <immintrin.h>

/* The sum of v's 8 floats (always the same order: halves, then pairs, then the last two). */
static inline __attribute__((always_inline)) float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
