/* Internals shared by the ggml-block kernels (ggml_quant.c, ggml_quant_ffn.c): block decoding, activation
 * quantization and the per-row dot products of the exact and the fast way. Not part of the interface.
 *
 * Every type is handled as groups of 32 weights: group_q gives a group's 32 integer quants (u8, or s8 for
 * Q8_0) without their offset, and each weight is A * (q - off) (+ B or - B), A per 16 or 32 weights.
 * Compiled with -ffp-contract=off: a decoded weight is the same fp32 products and sums as gguf's numpy
 * reference, never an FMA of them.
 */
#ifndef TILEMEM_GGML_QUANT_INTERNAL_H
#define TILEMEM_GGML_QUANT_INTERNAL_H

#include <immintrin.h>

#include "simd.h"
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define GMAXT 8 /* tokens per pass over the weights */

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

static inline int64_t gmin64(int64_t a, int64_t b) { return a < b ? a : b; }

INLINE int is_k(const int TY) { return TY == T_Q4_K || TY == T_Q5_K || TY == T_Q6_K; }

/* Weights and bytes of a block. */
INLINE int64_t bw_of(const int TY) { return is_k(TY) ? 256 : 32; }
INLINE int64_t bb_of(const int TY) {
    switch (TY) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    }
    return 0;
}

INLINE float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 nibbles of 16 bytes: bytes 0..15 = low nibbles, 16..31 = high nibbles. */
INLINE __m256i nibbles16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* Byte j = 0x10 where bit j of the little-endian uint32 at p is set, else 0. */
INLINE __m256i bits32(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(0x10));
}

/* Group g's 32 quants of block b, before their offset (Q4_0: 0..15 for -8..7; Q6_K: 0..63 for -32..31). */
INLINE __m256i group_q(const int TY, const uint8_t *b, int g) {
    switch (TY) {
    case T_Q8_0: return _mm256_loadu_si256((const __m256i *)(b + 2));
    case T_Q4_0: return nibbles16(b + 2);
    case T_Q4_1: return nibbles16(b + 4);
    case T_Q5_0: return _mm256_or_si256(nibbles16(b + 6), bits32(b + 2));
    case T_Q5_1: return _mm256_or_si256(nibbles16(b + 8), bits32(b + 4));
    case T_Q4_K:
    case T_Q5_K: {
        const int64_t qs = TY == T_Q4_K ? 16 : 48;
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + qs + 32 * (g >> 1))), m = _mm256_set1_epi8(0x0F);
        __m256i q = _mm256_and_si256(g & 1 ? _mm256_srli_epi16(v, 4) : v, m);
        if (TY == T_Q5_K) { /* bit g of qh[i] is bit 4 of weight i of group g */
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
            const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(g)), _mm256_set1_epi8(1));
            q = _mm256_or_si256(q, _mm256_slli_epi16(hb, 4));
        }
        return q;
    }
    case T_Q6_K: { /* group g = 4h + k: low 4 bits in ql[64h + 32 (k & 1) + i] (nibble k >> 1), high 2 in qh */
        const int h = g >> 2, k = g & 3;
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (k & 1)));
        const __m256i lo = _mm256_and_si256(k >> 1 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)), m = _mm256_set1_epi8(0x30);
        /* bits 2k, 2k + 1 of each qh byte to bits 4, 5 (bits shifted in from the next byte are masked off) */
        const __m256i hi = _mm256_and_si256(k == 0   ? _mm256_slli_epi16(qh, 4)
                                            : k == 1 ? _mm256_slli_epi16(qh, 2)
                                            : k == 2 ? qh
                                                     : _mm256_srli_epi16(qh, 2),
                                            m);
        return _mm256_or_si256(lo, hi);
    }
    }
    return _mm256_setzero_si256();
}

/* ggml's unpacking of a Q4_K / Q5_K block's 12 scale bytes: u as 16 bytes = 8 scales, then 8 mins. */
INLINE void unpack_k4(const uint8_t *scales, uint32_t u[4]) {
    memcpy(u, scales, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t m03 = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = m03;
    u[0] &= k1;
}

/* A block's scales for the exact decode: weight i of group g = (i < 16 ? a : a2)[g] * (q - off) + b[g]. */
typedef struct {
    float a[8], a2[8], b[8];
} tmg_scales;

INLINE void block_scales(const int TY, const uint8_t *blk, tmg_scales *s) {
    switch (TY) {
    case T_Q8_0:
    case T_Q4_0:
    case T_Q5_0: s->a[0] = s->a2[0] = f16(blk), s->b[0] = 0.0f; break;
    case T_Q4_1:
    case T_Q5_1: s->a[0] = s->a2[0] = f16(blk), s->b[0] = f16(blk + 2); break;
    case T_Q4_K:
    case T_Q5_K: { /* a = d * scale, b = dmin * min: fp32 products as numpy's */
        uint32_t u[4];
        unpack_k4(blk + 4, u);
        const __m128i sm = _mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]);
        const __m256 a = _mm256_mul_ps(_mm256_set1_ps(f16(blk)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
        const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)));
        _mm256_storeu_ps(s->a, a);
        _mm256_storeu_ps(s->a2, a);
        _mm256_storeu_ps(s->b, _mm256_mul_ps(_mm256_set1_ps(f16(blk + 2)), mn));
        break;
    }
    case T_Q6_K: {
        const float d = f16(blk + 208);
        for (int j = 0; j < 8; j++) {
            s->a[j] = d * (float)(int8_t)blk[192 + 2 * j];
            s->a2[j] = d * (float)(int8_t)blk[192 + 2 * j + 1];
        }
        break;
    }
    }
}

/* 32 integer bytes (u8, or s8 where SIGNED) -> 4 x 8 floats, in order. */
INLINE void bytes_to_f(const int SIGNED, __m256i q, __m256 f[4]) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i p[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; k++)
        f[k] = _mm256_cvtepi32_ps(SIGNED ? _mm256_cvtepi8_epi32(p[k]) : _mm256_cvtepu8_epi32(p[k]));
}

/* Group g of block blk as 4 x 8 exact fp32 weights (the numpy reference's operations, in its order). */
INLINE void group_f(const int TY, const uint8_t *blk, int g, const tmg_scales *s, __m256 w[4]) {
    __m256 f[4];
    bytes_to_f(TY == T_Q8_0, group_q(TY, blk, g), f);
    const int gi = is_k(TY) ? g : 0;
    const __m256 a0 = _mm256_set1_ps(s->a[gi]), a1 = _mm256_set1_ps(s->a2[gi]);
    const __m256 b = _mm256_set1_ps(s->b[gi]);
    const float off = TY == T_Q4_0 ? 8.0f : TY == T_Q5_0 ? 16.0f : TY == T_Q6_K ? 32.0f : 0.0f;
    for (int k = 0; k < 4; k++) {
        __m256 q = off != 0.0f ? _mm256_sub_ps(f[k], _mm256_set1_ps(off)) : f[k]; /* exact: small integers */
        __m256 v = _mm256_mul_ps(k < 2 ? a0 : a1, q);
        if (TY == T_Q4_1 || TY == T_Q5_1) v = _mm256_add_ps(v, b);
        if (TY == T_Q4_K || TY == T_Q5_K) v = _mm256_sub_ps(v, b);
        w[k] = v;
    }
}

/* ---- exact: y[n] = sum_c x[n, c] * W[row, c] for NT tokens (x row stride ldx), nb blocks ---- */

INLINE void row_exact(const int TY, const int NT, const uint8_t *wr, int64_t nb, const float *x, int64_t ldx,
                      float *y, int64_t ldy) {
    __m256 acc[GMAXT][2];
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = _mm256_setzero_ps();
    const int64_t G = bw_of(TY) / 32, BB = bb_of(TY);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *blk = wr + i * BB;
        tmg_scales s;
        block_scales(TY, blk, &s);
        for (int g = 0; g < G; g++) {
            __m256 w[4];
            group_f(TY, blk, g, &s, w);
            const float *xc = x + (i * G + g) * 32;
            for (int n = 0; n < NT; n++)
                for (int k = 0; k < 4; k++)
                    acc[n][k & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xc + n * ldx + 8 * k), w[k], acc[n][k & 1]);
        }
    }
    for (int n = 0; n < NT; n++) y[n * ldy] = hsum8(_mm256_add_ps(acc[n][0], acc[n][1]));
}

/* ---- fast: activations as int8 blocks ---- */

/* Quantized activations: row n's int8 values q + n * ldq, its scale per block of 32 (or 256 for K-quants)
 * d + n * ldd, its sums per 16 values s + n * lds. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *s;
    int64_t ldq, ldd, lds;
} tmg_xq;

/* Row x [C] into q (int8 [C]), d ([C / QB]), s (int16 [C / 16]): per block of QB values d = max|x| / 127,
 * q = round(x / d) (to nearest even). */
static inline void quantize_x(const float *x, int64_t C, int64_t QB, int8_t *q, float *d, int16_t *s) {
    for (int64_t c0 = 0; c0 < C; c0 += QB) {
        __m256 m = _mm256_setzero_ps();
        for (int64_t c = c0; c < c0 + QB; c += 8)
            m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(x + c)));
        float amax = 0.0f, lanes[8];
        _mm256_storeu_ps(lanes, m);
        for (int k = 0; k < 8; k++) amax = fmaxf(amax, lanes[k]);
        const float dd = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[c0 / QB] = dd;
        for (int64_t c = c0; c < c0 + QB; c += 8) {
            const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + c), _mm256_set1_ps(id)));
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)t, v);
            for (int k = 0; k < 8; k++) q[c + k] = (int8_t)(t[k] > 127 ? 127 : t[k] < -127 ? -127 : t[k]);
        }
        for (int64_t c = c0; c < c0 + QB; c += 16) {
            int sum = 0;
            for (int k = 0; k < 16; k++) sum += q[c + k];
            s[c / 16] = (int16_t)sum;
        }
    }
}

/* 32 products q * x summed by pairs into 16 int16 (q: the group's quants, s8 for Q8_0 and, offset, Q4_0 and
 * Q5_0: their signs moved onto x; else u8). */
INLINE __m256i dot_pairs(const int TY, __m256i q, __m256i x) {
    if (TY == T_Q8_0 || TY == T_Q4_0 || TY == T_Q5_0)
        return _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
    return _mm256_maddubs_epi16(q, x);
}

/* The int32 lanes of 4 blocks' dot products (s[0..3], 8 lanes each) summed per block, per 128-bit lane: lanes
 * 0..3 the 4 blocks' sums over their low halves, lanes 4..7 over their high halves (in-lane shuffles only:
 * hadd and lane-crossing permutes cost 4 to 8 uops each on Zen 1). */
INLINE __m256i sum4_halves(const __m256i *s) {
    const __m256i u01 = _mm256_add_epi32(_mm256_unpacklo_epi32(s[0], s[1]), _mm256_unpackhi_epi32(s[0], s[1]));
    const __m256i u23 = _mm256_add_epi32(_mm256_unpacklo_epi32(s[2], s[3]), _mm256_unpackhi_epi32(s[2], s[3]));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(u01, u23), _mm256_unpackhi_epi64(u01, u23));
}

/* 8 blocks of 32 from block i (w8) for NT tokens into acc: each 4 blocks' int32 dot products reduced to half
 * sums at once (sum4_halves), then scaled by those blocks' d_w * d_x ([d0..d3, d0..d3]) in one vector FMA. */
INLINE void fast8(const int TY, const int NT, const uint8_t *w8, int64_t i, const tmg_xq *X, __m256 *acc) {
    const int64_t BB = bb_of(TY);
    const int MIN = TY == T_Q4_1 || TY == T_Q5_1; /* + m * sum(x) */
    const __m256i ones = _mm256_set1_epi16(1);
    uint16_t hd[8], hm[8] = {0};
    __m256i q[8];
    for (int k = 0; k < 8; k++) {
        const uint8_t *blk = w8 + k * BB;
        memcpy(&hd[k], blk, 2);
        if (MIN) memcpy(&hm[k], blk + 2, 2);
        q[k] = group_q(TY, blk, 0);
        if (TY == T_Q4_0 || TY == T_Q5_0) q[k] = _mm256_sub_epi8(q[k], _mm256_set1_epi8(TY == T_Q4_0 ? 8 : 16));
    }
    /* built in registers (8 stores then one wide load would miss store forwarding) */
    const __m128i h = _mm_set_epi16((short)hd[7], (short)hd[6], (short)hd[5], (short)hd[4], (short)hd[3],
                                    (short)hd[2], (short)hd[1], (short)hd[0]);
    const __m256 dw_lo = _mm256_cvtph_ps(_mm_unpacklo_epi64(h, h)), dw_hi = _mm256_cvtph_ps(_mm_unpackhi_epi64(h, h));
    for (int n = 0; n < NT; n++) {
        const int8_t *xq = X->q + n * X->ldq + 32 * i;
        __m256i s[8];
        for (int k = 0; k < 8; k++)
            s[k] = _mm256_madd_epi16(dot_pairs(TY, q[k], _mm256_loadu_si256((const __m256i *)(xq + 32 * k))), ones);
        const float *dxp = X->d + n * X->ldd + i;
        const __m256 dx_lo = _mm256_broadcast_ps((const __m128 *)dxp);
        const __m256 dx_hi = _mm256_broadcast_ps((const __m128 *)(dxp + 4));
        acc[n] = _mm256_fmadd_ps(_mm256_mul_ps(dw_lo, dx_lo), _mm256_cvtepi32_ps(sum4_halves(s)), acc[n]);
        acc[n] = _mm256_fmadd_ps(_mm256_mul_ps(dw_hi, dx_hi), _mm256_cvtepi32_ps(sum4_halves(s + 4)), acc[n]);
        if (MIN) { /* the blocks' sums of x: their two sums per 16, added */
            const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)hm));
            const __m256i s16 = _mm256_loadu_si256((const __m256i *)(X->s + n * X->lds + 2 * i));
            const __m256 xs = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
            acc[n] = _mm256_fmadd_ps(_mm256_mul_ps(mw, _mm256_loadu_ps(dxp)), xs, acc[n]);
        }
    }
}

#ifndef TMG_PFR
#define TMG_PFR 2 /* rows ahead of the prefetch */
#endif

/* Prefetch the n bytes at p TMG_PFR rows (of ldw bytes) on: what a row kernel reads next there. */
INLINE void prefetch_ahead(const uint8_t *p, int64_t ldw, int64_t n) {
    if (TMG_PFR) {
        const char *pf = (const char *)p + TMG_PFR * ldw;
        for (int64_t o = 0; o < n; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
    }
}

/* One row of the 32-weight types (K-quants: row_fast_k) for NT tokens (row stride ldw): 8 blocks at once, each
 * 8 prefetched TMG_PFR rows on (as row_fast_k), the rest one by one. */
INLINE void row_fast(const int TY, const int NT, const uint8_t *wr, int64_t ldw, int64_t nb, const tmg_xq *X,
                     float *y, int64_t ldy) {
    __m256 acc[GMAXT];
    float corr[GMAXT];
    for (int n = 0; n < NT; n++) acc[n] = _mm256_setzero_ps(), corr[n] = 0.0f;
    const int64_t BB = bb_of(TY);
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        prefetch_ahead(wr + i * BB, ldw, 8 * BB);
        fast8(TY, NT, wr + i * BB, i, X, acc);
    }
    for (; i < nb; i++) { /* the last nb % 8 blocks */
        const uint8_t *blk = wr + i * BB;
        __m256i q = group_q(TY, blk, 0);
        if (TY == T_Q4_0 || TY == T_Q5_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(TY == T_Q4_0 ? 8 : 16));
        const float dw = f16(blk);
        for (int n = 0; n < NT; n++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(X->q + n * X->ldq + 32 * i));
            const __m256i s32 = _mm256_madd_epi16(dot_pairs(TY, q, xv), ones);
            const float dx = X->d[n * X->ldd + i];
            acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(s32), acc[n]);
            if (TY == T_Q4_1 || TY == T_Q5_1) { /* + m * sum(x) */
                const int16_t *s = X->s + n * X->lds + 2 * i;
                corr[n] += f16(blk + 2) * dx * (float)(s[0] + s[1]);
            }
        }
    }
    for (int n = 0; n < NT; n++) y[n * ldy] = hsum8(acc[n]) + corr[n];
}

/* ---- fast, K-quants: one row at a time, the next rows prefetched ---- */

/* A K-quant block's scales for the fast way: s[0] (Q4_K, Q5_K: the 8 int16 scales in both 128-bit lanes;
 * Q6_K: the int16 scales 0..7 in both lanes), s[1] (Q6_K: scales 8..15 in both lanes), off (Q6_K: -32 * scale
 * per 16; Q4_K, Q5_K: min per 16, each twice), d, dmin. */
typedef struct {
    __m256i s[2], off;
    float d, dmin;
} kscales;

INLINE void kscales_of(const int TY, const uint8_t *blk, kscales *k) {
    if (TY == T_Q6_K) {
        const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        k->d = f16(blk + 208), k->dmin = 0.0f;
        k->s[0] = _mm256_permute2x128_si256(s16, s16, 0x00);
        k->s[1] = _mm256_permute2x128_si256(s16, s16, 0x11);
        k->off = _mm256_slli_epi16(_mm256_sub_epi16(_mm256_setzero_si256(), s16), 5);
    } else {
        k->d = f16(blk), k->dmin = f16(blk + 2);
        uint32_t u[4];
        unpack_k4(blk + 4, u);
        const __m256i sm = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
        const __m128i mn16 = _mm256_extracti128_si256(sm, 1);
        k->s[0] = k->s[1] = _mm256_permute2x128_si256(sm, sm, 0x00);
        k->off = _mm256_set_m128i(_mm_unpackhi_epi16(mn16, mn16), _mm_unpacklo_epi16(mn16, mn16));
    }
}

/* Group g's int16 scales: Q4_K, Q5_K: scale g in every lane; Q6_K: scale 2g (low 128 bits), 2g + 1 (high). */
INLINE __m256i kscale_g(const int TY, const kscales *k, int g) {
    if (TY == T_Q6_K) {
        const int j = 2 * (g & 3);
        const __m256i ctl = _mm256_set_m128i(_mm_set1_epi16((short)(0x0100 + 0x0202 * (j + 1))),
                                             _mm_set1_epi16((short)(0x0100 + 0x0202 * j)));
        return _mm256_shuffle_epi8(k->s[g >> 2], ctl);
    }
    return _mm256_shuffle_epi8(k->s[0], _mm256_set1_epi16((short)(0x0100 + 0x0202 * g)));
}

/* Row wr (of a matrix with row stride ldw) of a K-quant for NT tokens: y[n * ldy]. Per block: the integer
 * dot products of its 8 groups by their scales (int32 lanes, exact), then d * dx (and dmin * dx) times them
 * in fp32. Each block TMG_PFR rows on is prefetched (a prefetch never faults: past the last row it is only
 * wasted). Measured on Zen 1: 2 or 4 rows at once were no faster from cache and slower from DRAM (whose
 * streams the hardware prefetcher then loses): the kernel is bound by its integer multiplies (17 a block
 * and token), not by latency. */
INLINE void row_fast_k(const int TY, const int NT, const uint8_t *wr, int64_t ldw, int64_t nb, const tmg_xq *X,
                       float *y, int64_t ldy) {
    __m256 acc[GMAXT];
    for (int n = 0; n < NT; n++) acc[n] = _mm256_setzero_ps();
    const int64_t BB = bb_of(TY);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *blk = wr + i * BB;
        prefetch_ahead(blk, ldw, BB);
        kscales ks;
        kscales_of(TY, blk, &ks);
        __m256i iacc[GMAXT];
        for (int n = 0; n < NT; n++) iacc[n] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) { /* unrolled: group_q's and kscale_g's choices are made at compile time */
            const __m256i q = group_q(TY, blk, g), sc = kscale_g(TY, &ks, g);
#pragma GCC unroll 8
            for (int n = 0; n < NT; n++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(X->q + n * X->ldq + 256 * i + 32 * g));
                iacc[n] = _mm256_add_epi32(iacc[n], _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), sc));
            }
        }
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) {
            const float dx = X->d[n * X->ldd + i];
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(X->s + n * X->lds + 16 * i)); /* sums per 16 */
            const __m256i ob = _mm256_madd_epi16(bs, ks.off);
            if (TY == T_Q6_K) { /* sum_k scale_k * (dot_k - 32 * bsum_k) */
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(ks.d * dx), _mm256_cvtepi32_ps(_mm256_add_epi32(iacc[n], ob)),
                                         acc[n]);
            } else { /* d * sum_g scale_g * dot_g - dmin * sum_g min_g * bsum_g */
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(ks.d * dx), _mm256_cvtepi32_ps(iacc[n]), acc[n]);
                acc[n] = _mm256_fnmadd_ps(_mm256_set1_ps(ks.dmin * dx), _mm256_cvtepi32_ps(ob), acc[n]);
            }
        }
    }
    for (int n = 0; n < NT; n++) y[n * ldy] = hsum8(acc[n]);
}

/* Rows [r0, r1) of W for NT tokens, fast. */
INLINE void rows_fast(const int TY, const int NT, const uint8_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t nb,
                      const tmg_xq *X, float *y, int64_t ldy) {
    for (int64_t r = r0; r < r1; r++) {
        if (is_k(TY))
            row_fast_k(TY, NT, w + r * ldw, ldw, nb, X, y + r, ldy);
        else
            row_fast(TY, NT, w + r * ldw, ldw, nb, X, y + r, ldy);
    }
}

/* ---- per-type kernels (ggml_quant.c) ---- */

/* Rows [r0, r1) of W (nb blocks a row) for nt <= GMAXT tokens: y[n * ldy + r] (exact: x rows at x + n * ldx). */
typedef void (*tmg_exact_fn)(int nt, const uint8_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t nb,
                             const float *x, int64_t ldx, float *y, int64_t ldy);
typedef void (*tmg_fast_fn)(int nt, const uint8_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t nb, const tmg_xq *X,
                            float *y, int64_t ldy);
/* One row of nb blocks into o [nb * block_weights]. */
typedef void (*tmg_dequant_fn)(const uint8_t *w, int64_t nb, float *o);

typedef struct {
    tmg_exact_fn exact;
    tmg_fast_fn fast;
    tmg_dequant_fn dequant;
} tmg_kernels;

/* The kernels of ggml type `type` into k; 0 for a type this library does not know. */
int tmg_lookup(int type, tmg_kernels *k);

/* The AVX512-BW/VL/VNNI fast kernel of `type` (ggml_quant_avx512.c: bit for bit the AVX2 one's results) where
 * this CPU has those and the environment does not set TILEMEM_GGML_AVX2=1; else NULL. */
tmg_fast_fn tmg_fast_avx512(int type);

/* The quantized activations of x [N, C] for `type` (fast path): one allocation, freed with free(X->q). */
int tmg_quantize_rows(int type, const float *x, int64_t ldx, int64_t N, int64_t C, tmg_xq *X, int nthreads);

#endif
