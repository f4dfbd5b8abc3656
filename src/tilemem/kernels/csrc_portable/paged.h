/* What the paged kernels (paged_attention.c, paged_index.c) share: loads of bf16 or fp32 rows as fp32, a
 * horizontal sum, the q . k score tile, and the prefetch of rows ahead in a block table's walk. */
#ifndef TILEMEM_PAGED_H
#define TILEMEM_PAGED_H

#include <immintrin.h>

#include "fp8.h" /* TMP_API */
#include "simd.h"
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

typedef union {
    uint32_t u;
    float f;
} bits;

/* 8 elements at p + i (bf16 when bf, else fp32) as fp32 (bf16 is the top half of an fp32: exact). */
INLINE __m256 load8(const void *p, int64_t i, const int bf) {
    if (!bf) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float load1(const void *p, int64_t i, const int bf) {
    if (!bf) return ((const float *)p)[i];
    bits c = {.u = (uint32_t)((const uint16_t *)p)[i] << 16};
    return c.f;
}

/* s[h * lds + i] = q_h . k_i for NK key rows at k + ko[i] and NH query rows q + h * Dk (fp32): NK x NH <= 8
 * independent FMA chains in registers (fixed-size arrays, fully unrolled: NK, NH are constants where inlined),
 * each key vector loaded once for all NH heads. */
INLINE void score_tile(const void *k, const int64_t *ko, const float *q, int64_t Dk, float *s, int64_t lds,
                       const int NK, const int NH, const int bf) {
    __m256 acc[4][8];
#pragma GCC unroll 4
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int i = 0; i < NK; i++) acc[h][i] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= Dk; d += 8) {
        __m256 qv[4];
#pragma GCC unroll 4
        for (int h = 0; h < NH; h++) qv[h] = _mm256_loadu_ps(q + h * Dk + d);
#pragma GCC unroll 8
        for (int i = 0; i < NK; i++) {
            __m256 kv = load8(k, ko[i] + d, bf);
#pragma GCC unroll 4
            for (int h = 0; h < NH; h++) acc[h][i] = _mm256_fmadd_ps(qv[h], kv, acc[h][i]);
        }
    }
#pragma GCC unroll 4
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int i = 0; i < NK; i++) {
            float r = hsum8(acc[h][i]);
            for (int64_t e = d; e < Dk; e++) r += q[h * Dk + e] * load1(k, ko[i] + e, bf);
            s[h * lds + i] = r;
        }
}

#define AHEAD 16 /* rows fetched ahead: a block's rows are contiguous, but the next block is anywhere (the hardware
                  * prefetchers stop at the 4 KB pages, which a block of 16 bf16 rows of 128 fills) */
#define FAR 32   /* and FAR rows further on, into L2: a decode token's cache comes from DRAM (the weights evict it),
                  * and one stream of L1 prefetches keeps too few misses in flight (Zen 4, OLMoE's 16 layers x 16
                  * heads at 400 positions: 11-12 -> 14-18 GB/s; batch-1 decode at 256 positions +5-10%) */

/* Asks for row ko[i + AHEAD] of k (n rows, D elements each) to be cached, and row ko[i + AHEAD + FAR] into L2. */
INLINE void fetch_ahead(const void *k, const int64_t *ko, int64_t i, int64_t n, int64_t D, const int bf) {
    if (i + AHEAD >= n) return;
    const char *row = (const char *)k + ko[i + AHEAD] * (bf ? 2 : 4);
    for (int64_t b = 0; b < D * (bf ? 2 : 4); b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    if (i + AHEAD + FAR >= n) return;
    row = (const char *)k + ko[i + AHEAD + FAR] * (bf ? 2 : 4);
    for (int64_t b = 0; b < D * (bf ? 2 : 4); b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
}

/* The paged attention of B rows (paged_attention.c) and the decode attention block after the projections
 * (paged_decode.c), for the other kernels that call them (the one-call decode layers). */
TMP_API int tmp_paged_attention(const void *q, int q_bf16, int64_t sqb, int64_t sqh, const void *k, const void *v,
                                int kv_bf16, int64_t skn, int64_t skh, int64_t skt, int64_t svn, int64_t svh,
                                int64_t svt, int64_t N, int64_t bs, const int64_t *table, int64_t M,
                                const int64_t *len, const int64_t *sel, int64_t K, int64_t B, int64_t H, int64_t Hkv,
                                int64_t Dk, int64_t Dv, float scale, void *out, int nthreads);

TMP_API int tmp_paged_decode_block(const void *q, int64_t sq, const void *k, int64_t sk, const void *v, int64_t sv,
                                   int bf, int64_t B, int64_t H, int64_t Hkv, int64_t hd, int norm, const void *qw,
                                   const void *kw, float eps, int clip_on, float clip, const void *cos,
                                   const void *sin, int64_t scs, int rot32, void *kc, int64_t skn, int64_t skh,
                                   int64_t skt, void *vc, int64_t svn, int64_t svh, int64_t svt, int64_t N,
                                   int64_t bs, const int64_t *table, int64_t M, const int64_t *pos, float scale,
                                   void *out, int nthreads);

#endif
