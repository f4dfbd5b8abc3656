/* Internals shared by the fp8 kernels (fp8.c, fp8_ffn.c): e4m3 decoding and the register-blocked tiles
 * of y = xs @ W^T. Not part of the library's interface. */
#ifndef TILEMEM_FP8_INTERNAL_H
#define TILEMEM_FP8_INTERNAL_H

#include <immintrin.h>

#include "simd.h"
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define MAXT 8   /* tokens per pass over the weights */
#define BLOCK 128 /* rows and columns per scale */

/* 16 bytes -> 16 floats (each e4m3 / 256) in natural order: lo = bytes 0..7, hi = bytes 8..15.
 * 128-bit integer ops: on Zen 1 a 256-bit op is two of them anyway, and this form needs no lane crossing.
 * Each byte goes to the high half of a 16-bit lane (b << 8); an arithmetic shift by 1 puts eeeemmm at bits
 * 7..13 and copies the sign into bits 15 and 14; clearing bit 14 leaves the fp16 s|0eeee|mmm0000000.
 * On Zen 1 the F16C conversions bound a 1-token tile (1 thread, rows in L2: 6.1 G weights/s, 9.8 without them);
 * the alternatives measured slower: fp32 bits by integer ops (sign-extend to 32 bits, shift, mask: 4.9, before any
 * care for subnormals) and 128-bit conversions (4.0). */
INLINE void decode16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p), zero = _mm_setzero_si128();
    const __m128i keep = _mm_set1_epi16((short)0xBFFF);
    *lo = _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(_mm_unpacklo_epi8(zero, raw), 1), keep));
    *hi = _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(_mm_unpackhi_epi8(zero, raw), 1), keep));
}

/* One byte -> e4m3 value (exact), for row tails. */
INLINE float decode1(uint8_t b) {
    return _cvtsh_ss((unsigned short)((b + (b & 0x80)) << 7)) * 256.0f;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* y[n, i] = sum_c xs[n, c] * w[i, c] for RB rows and NT tokens. A2: two accumulators per (row, token),
 * for short FMA chains where there are few (row, token) pairs. */
INLINE void nt_tile(const int RB, const int NT, const int A2, const uint8_t *w, int64_t ldw, const float *xs,
                    int64_t Cp, int64_t C, float *y, int64_t ldy) {
    __m256 acc[4][MAXT][2];
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) acc[i][n][0] = acc[i][n][1] = _mm256_setzero_ps();
    const int64_t C16 = C & ~(int64_t)15;
    for (int64_t c = 0; c < Cp; c += 16) {
        __m256 wl[4], wh[4];
        if (c < C16) {
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++) {
                /* up to 4 tokens, the next tile's rows, a line per line read: the hardware prefetcher starts over
                 * at every row (2 KB apart at D = 2048); on Zen 1, 1 token: 25% faster than none (2 tiles or 256 B
                 * ahead: no faster); 8 tokens: 1-2% slower with it */
                if (NT <= 4 && !(c & 63)) _mm_prefetch((const char *)(w + (i + RB) * ldw + c), _MM_HINT_T0);
                decode16(w + i * ldw + c, &wl[i], &wh[i]);
            }
        } else { /* the row's last C % 16 bytes: never read past them (xs is zero there) */
            uint8_t buf[16] = {0};
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++) {
                memcpy(buf, w + i * ldw + c, (size_t)(C - c));
                decode16(buf, &wl[i], &wh[i]);
            }
        }
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) {
            __m256 xl = _mm256_load_ps(xs + n * Cp + c), xh = _mm256_load_ps(xs + n * Cp + c + 8);
#pragma GCC unroll 4
            for (int i = 0; i < RB; i++) {
                acc[i][n][0] = _mm256_fmadd_ps(xl, wl[i], acc[i][n][0]);
                acc[i][n][A2] = _mm256_fmadd_ps(xh, wh[i], acc[i][n][A2]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RB; i++)
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) y[n * ldy + i] = hsum8(A2 ? _mm256_add_ps(acc[i][n][0], acc[i][n][1]) : acc[i][n][0]);
}

/* Rows [0, nrows) of w (all in one 128-row block) for NT tokens: RB rows at a time, then single rows. */
#define NT_ROWS(NT, RB, A2, A2_1)                                                                                  \
    case NT: {                                                                                                     \
        int64_t i = 0;                                                                                             \
        for (; i + RB <= nrows; i += RB) nt_tile(RB, NT, A2, w + i * ldw, ldw, xs, Cp, C, y + i, ldy);             \
        for (; i < nrows; i++) nt_tile(1, NT, A2_1, w + i * ldw, ldw, xs, Cp, C, y + i, ldy);                      \
        break;                                                                                                     \
    }

static inline void nt_rows(int nt, const uint8_t *w, int64_t ldw, int64_t nrows, const float *xs, int64_t Cp, int64_t C,
                    float *y, int64_t ldy) {
    /* register budget: RB * 2 decoded + RB * NT * (1 + A2) accumulators <= ~14 of 16. Measured on Zen 1 (1 thread,
     * 8 experts of 1024 x 2048 from DRAM): 3 rows at 1 token (6% faster than 4) and 2 tokens (4% faster than 2 rows
     * with A2); 2 rows at 4 tokens (11% faster than 3) */
    switch (nt) {
        NT_ROWS(1, 3, 1, 1)
        NT_ROWS(2, 3, 0, 1)
        NT_ROWS(3, 2, 0, 1)
        NT_ROWS(4, 2, 0, 1)
        NT_ROWS(5, 1, 0, 0)
        NT_ROWS(6, 1, 0, 0)
        NT_ROWS(7, 1, 0, 0)
        NT_ROWS(8, 1, 0, 0)
    }
}

#endif
