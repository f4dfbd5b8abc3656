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

/* 8 bytes -> 8 floats (each e4m3 / 256) by integer ops and one exact multiply: the byte sign-extended to 32
 * bits and shifted left by 20 puts eeeemmm at bits 20..26 and the sign at 27..31; the mask keeps
 * s|0000eeee|mmm0..0, the fp32 e4m3 * 2^-120 (e = 0: the fp32 denormal of the same mantissa, so subnormals are
 * exact too), and * 2^112 makes it e4m3 / 256, bit for bit decode16's value. Needs MXCSR's DAZ clear (with
 * DAZ, denormal operands read as zero): see fp8_int_ok. Zen 4, 1 thread, a row at a time (row1): 19.5 G
 * weights/s from L2, 18.2 from DRAM, against 14.9 and 14.1 by decode16. */
INLINE __m256 decode8_int(const uint8_t *p) {
    const __m256i v = _mm256_slli_epi32(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)), 20);
    const __m256i bits = _mm256_and_si256(v, _mm256_set1_epi32((int)0x87F00000u));
    return _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p112f));
}

/* decode16's 16 floats; INT (a constant): by decode8_int. */
INLINE void decode16_as(const int INT, const uint8_t *p, __m256 *lo, __m256 *hi) {
    if (INT) {
        *lo = decode8_int(p);
        *hi = decode8_int(p + 8);
    } else {
        decode16(p, lo, hi);
    }
}

/* Whether decode8_int is exact in this thread: MXCSR's DAZ (denormals are zero, bit 6) clear, as by default
 * (MXCSR is per thread: check it in the thread that decodes). */
static inline int fp8_int_ok(void) { return !(_mm_getcsr() & 0x0040); }

/* One byte -> e4m3 value (exact), for row tails. */
INLINE float decode1(uint8_t b) {
    return _cvtsh_ss((unsigned short)((b + (b & 0x80)) << 7)) * 256.0f;
}

/* fp8_avx512.c: whether the AVX512-BF16 1-token path runs (CPU and TILEMEM_FP8_BF16), and that path for
 * nrows rows of one 128-row block (y[i], i < nrows; xs as nt_tile's); 0 if it could not allocate. */
int fp8_bf16_on(void);
int fp8_bf16_rows1(const uint8_t *w, int64_t ldw, int64_t nrows, const float *xs, int64_t Cp, int64_t C, float *y);
/* The rows of bf16-valued x (fp8_bf16.h's bf16_valued) without xs, in two steps: fp8_bf16_xprep takes nt <= MAXT
 * rows of x (row n at xr[n], C columns) into this thread's scratch once (0: some row is not bf16-valued, or no
 * memory: take xs's path); then each fp8_bf16_rows_prepped call computes rows [0, nrows) of one 128-row block of W:
 * y[n * ldy + i] = mul[n] * sum over column blocks cb of sr[cb] * (sum_{c in cb} x_n[c] * W[i, c]) (mul NULL: 1),
 * a chunk of weights decoded once for all tokens, a VDPBF16PS per token (xs's three bf16 parts: three). The thread
 * must not call the 1-token xs path (fp8_bf16_rows1) in between: it shares the scratch. */
int fp8_bf16_xprep(int nt, const float *const *xr, int64_t C);
void fp8_bf16_rows_prepped(const uint8_t *w, int64_t ldw, int64_t nrows, const float *sr, const float *mul, float *y,
                           int64_t ldy);

/* fp8_bf16_xprep where the CPU has avx512bf16 (and TILEMEM_FP8_BF16 is not 0). */
static inline int x_direct(int nt, const float *const *xr, int64_t C) {
    return fp8_bf16_on() && fp8_bf16_xprep(nt, xr, C);
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

/* y[0] = sum_c xs[c] * w[c] for one row and one token: 32 columns a step into 4 accumulators (4 FMA chains).
 * A row at a time streams the bytes in order, which the hardware prefetcher follows: on Zen 4 (1 thread, from
 * DRAM) 14.1 GB/s against 11-12 for 3-row tiles with software prefetch, and with decode8_int (INT) 18.2, where
 * the 3-row tile gained nothing from it. Not measured on Zen 1 (nt_rows keeps the 3-row tiles there). */
INLINE void nt_row1(const int INT, const uint8_t *w, const float *xs, int64_t Cp, int64_t C, float *y) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t C32 = C & ~(int64_t)31, C16 = C & ~(int64_t)15;
    int64_t c = 0;
    for (; c < C32; c += 32) {
        __m256 l0, h0, l1, h1;
        decode16_as(INT, w + c, &l0, &h0);
        decode16_as(INT, w + c + 16, &l1, &h1);
        a0 = _mm256_fmadd_ps(_mm256_load_ps(xs + c), l0, a0);
        a1 = _mm256_fmadd_ps(_mm256_load_ps(xs + c + 8), h0, a1);
        a2 = _mm256_fmadd_ps(_mm256_load_ps(xs + c + 16), l1, a2);
        a3 = _mm256_fmadd_ps(_mm256_load_ps(xs + c + 24), h1, a3);
    }
    for (; c < Cp; c += 16) { /* the last 16 columns, then the row's last C % 16 bytes (xs is zero past C) */
        uint8_t buf[16] = {0};
        const uint8_t *p = w + c;
        if (c >= C16) {
            memcpy(buf, p, (size_t)(C - c));
            p = buf;
        }
        __m256 l0, h0;
        decode16_as(INT, p, &l0, &h0);
        a0 = _mm256_fmadd_ps(_mm256_load_ps(xs + c), l0, a0);
        a1 = _mm256_fmadd_ps(_mm256_load_ps(xs + c + 8), h0, a1);
    }
    y[0] = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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
    /* 1 token on CPUs with AVX512 (measured: Zen 4) a row at a time; elsewhere (Zen 1, where the 3-row tiles and
     * F16C were measured best) the tiles below */
    if (nt == 1 && fp8_bf16_on() && fp8_bf16_rows1(w, ldw, nrows, xs, Cp, C, y)) return;
    if (nt == 1 && __builtin_cpu_supports("avx512f")) {
        if (fp8_int_ok())
            for (int64_t i = 0; i < nrows; i++) nt_row1(1, w + i * ldw, xs, Cp, C, y + i);
        else
            for (int64_t i = 0; i < nrows; i++) nt_row1(0, w + i * ldw, xs, Cp, C, y + i);
        return;
    }
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
