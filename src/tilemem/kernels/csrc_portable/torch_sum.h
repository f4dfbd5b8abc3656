/* The sum of squares of an fp32 row in the order torch's CPU kernels add it on AVX2 (`x.pow(2).sum(-1)` over a
 * contiguous row: aten/src/ATen/native/cpu/SumKernel.cpp's vectorized_inner_sum), so that a kernel reproduces
 * `layers.norm.RMSNorm`'s torch math bit for bit: the squares rounded to fp32 (pow(2) is x * x, no FMA), 8-lane
 * vectors summed into 4 interleaved vector accumulators (vector i into accumulator i % 4) through a 4-level
 * cascade of 2^max(4, ceil(log2(n / 32)) / 4) vectors a level, the accumulators added in order, the leftover
 * vectors into the first, then the scalar tail summed from 0 and the 8 lanes added to it one by one.
 * (On an AVX512 build torch adds 16 lanes: there the sums differ in the last bits.) Not part of the interface. */
#ifndef TILEMEM_PORTABLE_TORCH_SUM_H
#define TILEMEM_PORTABLE_TORCH_SUM_H

#include <immintrin.h>
#include <stdint.h>

static inline __attribute__((always_inline)) __m256 torch_sq8(const float *x) {
    const __m256 v = _mm256_loadu_ps(x);
    return _mm256_mul_ps(v, v);
}

/* sum_i x[i]^2 for i < n, in torch's order (see above). */
static inline float torch_sumsq(const float *x, int64_t n) {
    const int64_t nv = n / 8, size = nv / 4; /* vectors; rows of 4 vectors */
    int lp = 4;                               /* log2 of the vectors' rows a cascade level adds */
    if (size > 2) {
        const int c = 64 - __builtin_clzll((unsigned long long)(size - 1)); /* ceil(log2(size)) */
        lp = c / 4 > 4 ? c / 4 : 4;
    }
    const int64_t step = (int64_t)1 << lp, mask = step - 1;
    __m256 acc[4][4];
    for (int j = 0; j < 4; j++)
        for (int k = 0; k < 4; k++) acc[j][k] = _mm256_setzero_ps();
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], torch_sq8(x + (i * 4 + k) * 8));
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++) {
                acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = _mm256_setzero_ps();
            }
            if ((i & (mask << (j * lp))) != 0) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], torch_sq8(x + (i * 4 + k) * 8));
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
    for (int64_t m = size * 4; m < nv; m++) acc[0][0] = _mm256_add_ps(acc[0][0], torch_sq8(x + m * 8));
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0][0], acc[0][1]), acc[0][2]), acc[0][3]);
    float lanes[8], f = 0.f;
    _mm256_storeu_ps(lanes, s);
    for (int64_t e = nv * 8; e < n; e++) {
        const float sq = x[e] * x[e];
        f += sq;
    }
    for (int k = 0; k < 8; k++) f += lanes[k];
    return f;
}

#endif
