/* Internals shared by the x12 tile kernels (x12.c, x12_ffn.c): the payload's parts and a chunk of 64 weights
 * decoded in registers. Not part of the library's interface.
 *
 * AVX2's vpshufb and vpunpck{l,h}bw work per 128-bit lane, which is what the chunk order is made for: with the
 * chunk's low bytes as two 32-byte halves l0 (bytes 0-31), l1 (32-63) and its high bytes h0 = tab[code nibbles
 * 0-31] (the low nibbles of the 32 code bytes), h1 = tab[nibbles 32-63] (their high nibbles),
 *     unpacklo(l0, h0) = weights 0-15, unpacklo(l1, h1) = 16-31, unpackhi(l0, h0) = 32-47, unpackhi(l1, h1) = 48-63
 * in order, each a 256-bit vector of 16 bf16: no lane crossing. Widening such a vector to fp32 by interleaving
 * zero words gives weights {0-3, 8-11} and {4-7, 12-15} of its 16: the FFN multiplies them with x permuted the
 * same way within each 16 columns (X12_PERM) and keeps its down sums in that order until they are added to out.
 */
#ifndef TILEMEM_X12_INTERNAL_H
#define TILEMEM_X12_INTERNAL_H

#include <immintrin.h>
#include <stdint.h>

#include "x12.h"

#define X12_INLINE static inline __attribute__((always_inline))
#define X12_CHUNK 64

/* The parts of a payload of a [R, D] matrix. */
typedef struct {
    const uint8_t *lo;     /* [R, KP] */
    const uint8_t *hc;     /* [R, KP / 2] */
    const uint8_t *tab;    /* [64]: the 16 high bytes, 4 copies */
    const int32_t *xrow;   /* [R + 1] */
    const uint32_t *xval;  /* [cap]: column << 16 | bf16 bits */
    int64_t R, D, KP, cap;
} x12_view;

static inline int x12_shape_ok(int64_t R, int64_t D) { return R >= 0 && D > 0 && D < 65536 && D % 32 == 0; }
static inline int64_t x12_kp(int64_t D) { return (D + X12_CHUNK - 1) / X12_CHUNK * X12_CHUNK; }
static inline int64_t x12_cap(int64_t R, int64_t D) { return R * D / 512 > 64 ? R * D / 512 : 64; }
static inline int64_t x12_tab_offset(int64_t R, int64_t D) { return (R * x12_kp(D) * 3 / 2 + 15) / 16 * 16; }

static inline x12_view x12_view_of(const uint8_t *p, int64_t R, int64_t D) {
    const int64_t KP = x12_kp(D), a = x12_tab_offset(R, D);
    x12_view v = {p, p + R * KP, p + a, (const int32_t *)(p + a + 64), (const uint32_t *)(p + a + 64 + 4 * (R + 1)),
                  R, D, KP, x12_cap(R, D)};
    return v;
}

/* Whether the exception entries of rows [r0, r1) are in place: xrow ascending within [0, cap], columns below D
 * and ascending within a row. The kernels write exceptions where their columns say: a corrupt payload must not
 * make them write elsewhere. */
static inline int x12_valid(const x12_view *v, int64_t r0, int64_t r1) {
    if (v->xrow[r0] < 0) return 0;
    for (int64_t r = r0; r < r1; r++) {
        const int32_t a = v->xrow[r], b = v->xrow[r + 1];
        if (b < a || b > v->cap) return 0;
        for (int32_t i = a; i < b; i++)
            if ((int64_t)(v->xval[i] >> 16) >= v->D || (i > a && v->xval[i] >> 16 <= v->xval[i - 1] >> 16)) return 0;
    }
    return 1;
}

/* The chunk of 64 weights at lo / hc (exceptions not yet written), as 4 vectors of 16 bf16 in order. */
X12_INLINE void x12_chunk(const uint8_t *lo, const uint8_t *hc, __m256i tab, __m256i w[4]) {
    const __m256i m = _mm256_set1_epi8(0x0F), c = _mm256_loadu_si256((const __m256i *)hc);
    const __m256i l0 = _mm256_loadu_si256((const __m256i *)lo), l1 = _mm256_loadu_si256((const __m256i *)(lo + 32));
    const __m256i h0 = _mm256_shuffle_epi8(tab, _mm256_and_si256(c, m));
    const __m256i h1 = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(c, 4), m));
    w[0] = _mm256_unpacklo_epi8(l0, h0);
    w[1] = _mm256_unpacklo_epi8(l1, h1);
    w[2] = _mm256_unpackhi_epi8(l0, h0);
    w[3] = _mm256_unpackhi_epi8(l1, h1);
}

/* The exceptions of the chunk at column k written into w: *xp, the row's next exception (none before k), xe
 * the row's end. In registers (a compare and a blend each), so that w can stay in registers. */
X12_INLINE void x12_patch(__m256i w[4], int64_t k, const uint32_t **xp, const uint32_t *xe) {
    for (; *xp < xe && (int64_t)(**xp >> 16) < k + X12_CHUNK; (*xp)++) {
        const int j = (int)((**xp >> 16) - k);
        const __m256i at = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m256i m = _mm256_cmpeq_epi16(at, _mm256_set1_epi16((short)(j & 15)));
        const __m256i v = _mm256_set1_epi16((short)**xp);
        switch (j >> 4) { /* constant indices: no address of w taken */
        case 0: w[0] = _mm256_blendv_epi8(w[0], v, m); break;
        case 1: w[1] = _mm256_blendv_epi8(w[1], v, m); break;
        case 2: w[2] = _mm256_blendv_epi8(w[2], v, m); break;
        default: w[3] = _mm256_blendv_epi8(w[3], v, m); break;
        }
    }
}

/* 16 bf16 -> fp32 (exact): a = weights {0-3, 8-11}, b = {4-7, 12-15}. */
X12_INLINE void x12_widen(__m256i w, __m256 *a, __m256 *b) {
    const __m256i z = _mm256_setzero_si256();
    *a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, w));
    *b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, w));
}

/* Position m of a permuted 16 columns holds column X12_PERM[m] (its own inverse). */
static const int X12_PERM[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

#endif
