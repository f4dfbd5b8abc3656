/* The fast ggml row kernels (ggml_quant_internal.h's row_fast_k, row_fast on Q8_0) with AVX512-BW/VL and VNNI,
 * chosen at run time by tmg_lookup where the CPU has them (the library itself is built for AVX2: this file's
 * functions alone are compiled for AVX512, and only called after the CPU check).
 *
 * Bit for bit the AVX2 kernels' results: the int32 lanes of each block's dot products are the same integers
 * (sums of the same exact products, no int16 saturation on either side), and each block's fp32 operations are
 * the AVX2 kernel's, in its order.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

#include "ggml_quant_internal.h"

#include <stdlib.h>

/* K-quants: two groups a zmm (groups 2p, 2p + 1: low, high 256 bits); the int16 pair sums times their scales
 * accumulated by one dpwssd; the two halves added at the end of a block give the AVX2 kernel's 8 int32 lanes. */

/* Groups 2p, 2p + 1 of block b. */
INLINE __m512i group_q2(const int TY, const uint8_t *b, int p) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    if (TY == T_Q6_K) { /* groups 4h + k, 4h + k + 1 (k = 2 (p & 1)): ql 64 bytes on, nibble p & 1 */
        const int h = p >> 1;
        const __m512i v = _mm512_loadu_si512((const void *)(b + 64 * h));
        const __m512i lo = _mm512_and_si512(p & 1 ? _mm512_srli_epi16(v, 4) : v, m4);
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h)));
        /* k = 0, 1: << 4, << 2; k = 2, 3: as is, >> 2 */
        const __m512i hi = p & 1 ? _mm512_mask_srli_epi16(qh, 0xFFFF0000u, qh, 2)
                                 : _mm512_sllv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1));
        return _mm512_or_si512(lo, _mm512_and_si512(hi, _mm512_set1_epi8(0x30)));
    }
    const int64_t qs = TY == T_Q4_K ? 16 : 48;
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + qs + 32 * p)));
    __m512i q = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), m4);
    if (TY == T_Q5_K) { /* bit g of qh[i]: bit 4 of weight i of group g */
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
        const __m512i cnt = _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * p)), _mm256_set1_epi16((short)(2 * p + 1)), 1);
        const __m512i hb = _mm512_and_si512(_mm512_srlv_epi16(qh, cnt), _mm512_set1_epi8(1));
        q = _mm512_or_si512(q, _mm512_slli_epi16(hb, 4));
    }
    return q;
}

/* Scales of groups 2p, 2p + 1 as int16 lanes (as kscale_g's, low and high 256 bits), from s16: Q4_K, Q5_K: the
 * 8 scales (int16 0..7); Q6_K: the 16 scales (int16 0..15). */
INLINE __m512i kscale_2(const int TY, __m512i s16, int p) {
    if (TY == T_Q6_K) { /* 128-bit lanes: scales 4p, 4p + 1, 4p + 2, 4p + 3 */
        const long long s0 = 0x0001000100010001LL * (4 * p), one = 0x0001000100010001LL;
        const __m512i idx = _mm512_set_epi64(s0 + 3 * one, s0 + 3 * one, s0 + 2 * one, s0 + 2 * one, s0 + one,
                                             s0 + one, s0, s0);
        return _mm512_permutexvar_epi16(idx, s16);
    }
    const long long lo = 0x0001000100010001LL * (2 * p), hi = 0x0001000100010001LL * (2 * p + 1);
    return _mm512_permutexvar_epi16(_mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo), s16);
}

/* A K-quant block's scales (kscales_of's values, Q4_K / Q5_K's 12 scale bytes unpacked by byte shuffles). */
INLINE void kscales16(const int TY, const uint8_t *blk, __m512i *s16, __m256i *off, float *d, float *dmin) {
    if (TY == T_Q6_K) {
        const __m256i s = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        *d = f16(blk + 208), *dmin = 0.0f;
        *s16 = _mm512_castsi256_si512(s);
        *off = _mm256_slli_epi16(_mm256_sub_epi16(_mm256_setzero_si256(), s), 5);
        return;
    }
    *d = f16(blk), *dmin = f16(blk + 2);
    /* bytes b0..b11 (b = blk + 4): scales 0..3 = b0..3 & 63, 4..7 = (b8..11 & 15) | (b0..3 >> 6) << 4;
     * mins 0..3 = b4..7 & 63, 4..7 = (b8..11 >> 4) | (b4..7 >> 6) << 4 (unpack_k4) */
    const __m128i v = _mm_loadu_si128((const __m128i *)(blk + 4)); /* 12 scale bytes, then 4 of qs (unused) */
    const __m128i a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    const __m128i c = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    const __m128i lo = _mm_and_si128(_mm_blend_epi32(a, _mm_srli_epi16(a, 4), 0x8),
                                     _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    const __m128i sm = _mm_or_si128(lo, _mm_and_si128(_mm_srli_epi16(c, 2), _mm_set1_epi8(0x30)));
    const __m256i w = _mm256_cvtepu8_epi16(sm); /* scales 0..7, mins 0..7 */
    *s16 = _mm512_castsi256_si512(w);
    const __m128i mn16 = _mm256_extracti128_si256(w, 1);
    *off = _mm256_set_m128i(_mm_unpackhi_epi16(mn16, mn16), _mm_unpacklo_epi16(mn16, mn16));
}

INLINE void row_fast_k512(const int TY, const int NT, const uint8_t *wr, int64_t ldw, int64_t nb, const tmg_xq *X,
                          float *y, int64_t ldy) {
    __m256 acc[GMAXT];
    for (int n = 0; n < NT; n++) acc[n] = _mm256_setzero_ps();
    const int64_t BB = bb_of(TY);
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *blk = wr + i * BB;
        prefetch_ahead(blk, ldw, BB);
        __m512i s16; /* int16: Q4_K, Q5_K: scales 0..7; Q6_K: scales 0..15 */
        __m256i off;    /* kscales' off */
        float d, dmin;
        kscales16(TY, blk, &s16, &off, &d, &dmin);
        __m512i iacc[GMAXT];
        for (int n = 0; n < NT; n++) iacc[n] = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int p = 0; p < 4; p++) {
            const __m512i q = group_q2(TY, blk, p), sc = kscale_2(TY, s16, p);
#pragma GCC unroll 8
            for (int n = 0; n < NT; n++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(X->q + n * X->ldq + 256 * i + 64 * p));
                iacc[n] = _mm512_dpwssd_epi32(iacc[n], _mm512_maddubs_epi16(q, xv), sc);
            }
        }
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) {
            const __m256i ia = _mm256_add_epi32(_mm512_castsi512_si256(iacc[n]), _mm512_extracti64x4_epi64(iacc[n], 1));
            const float dx = X->d[n * X->ldd + i];
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(X->s + n * X->lds + 16 * i)); /* sums per 16 */
            const __m256i ob = _mm256_madd_epi16(bs, off);
            if (TY == T_Q6_K) {
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(_mm256_add_epi32(ia, ob)), acc[n]);
            } else {
                acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(ia), acc[n]);
                acc[n] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(ob), acc[n]);
            }
        }
    }
    for (int n = 0; n < NT; n++) y[n * ldy] = hsum8(acc[n]);
}

/* Q8_0: fast8's 8 blocks with each block's dot product one dpbusd (|q| as u8 times x with q's sign: the same
 * exact sums as maddubs then madd, whose int16 pairs never saturate: 2 * 128 * 127 < 32768). */
INLINE __m256i dot8_0(__m256i q, __m256i x) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
}

INLINE void fast8_q8(const int NT, const uint8_t *w8, int64_t i, const tmg_xq *X, __m256 *acc) {
    const int64_t BB = bb_of(T_Q8_0);
    uint16_t hd[8];
    __m256i q[8];
    for (int k = 0; k < 8; k++) {
        memcpy(&hd[k], w8 + k * BB, 2);
        q[k] = _mm256_loadu_si256((const __m256i *)(w8 + k * BB + 2));
    }
    const __m128i h = _mm_set_epi16((short)hd[7], (short)hd[6], (short)hd[5], (short)hd[4], (short)hd[3],
                                    (short)hd[2], (short)hd[1], (short)hd[0]);
    const __m256 dw_lo = _mm256_cvtph_ps(_mm_unpacklo_epi64(h, h)), dw_hi = _mm256_cvtph_ps(_mm_unpackhi_epi64(h, h));
    __m256i qa[8];
    for (int k = 0; k < 8; k++) qa[k] = _mm256_abs_epi8(q[k]);
    for (int n = 0; n < NT; n++) {
        const int8_t *xq = X->q + n * X->ldq + 32 * i;
        __m256i s[8];
        for (int k = 0; k < 8; k++)
            s[k] = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qa[k],
                                       _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xq + 32 * k)), q[k]));
        const float *dxp = X->d + n * X->ldd + i;
        const __m256 dx_lo = _mm256_broadcast_ps((const __m128 *)dxp);
        const __m256 dx_hi = _mm256_broadcast_ps((const __m128 *)(dxp + 4));
        acc[n] = _mm256_fmadd_ps(_mm256_mul_ps(dw_lo, dx_lo), _mm256_cvtepi32_ps(sum4_halves(s)), acc[n]);
        acc[n] = _mm256_fmadd_ps(_mm256_mul_ps(dw_hi, dx_hi), _mm256_cvtepi32_ps(sum4_halves(s + 4)), acc[n]);
    }
}

INLINE void row_fast_q8(const int NT, const uint8_t *wr, int64_t ldw, int64_t nb, const tmg_xq *X, float *y,
                        int64_t ldy) {
    __m256 acc[GMAXT];
    for (int n = 0; n < NT; n++) acc[n] = _mm256_setzero_ps();
    const int64_t BB = bb_of(T_Q8_0);
    int64_t i = 0;
    for (; i + 8 <= nb; i += 8) {
        prefetch_ahead(wr + i * BB, ldw, 8 * BB);
        fast8_q8(NT, wr + i * BB, i, X, acc);
    }
    for (; i < nb; i++) {
        const uint8_t *blk = wr + i * BB;
        const __m256i q = group_q(T_Q8_0, blk, 0);
        const float dw = f16(blk);
        for (int n = 0; n < NT; n++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(X->q + n * X->ldq + 32 * i));
            const float dx = X->d[n * X->ldd + i];
            acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(dot8_0(q, xv)), acc[n]);
        }
    }
    for (int n = 0; n < NT; n++) y[n * ldy] = hsum8(acc[n]);
}

#define CASE_K(TY, NT)                                                                                             \
    case NT:                                                                                                       \
        for (int64_t r = r0; r < r1; r++) row_fast_k512(TY, NT, w + r * ldw, ldw, nb, X, y + r, ldy);              \
        break;
#define CASE_Q8(NT)                                                                                                \
    case NT:                                                                                                       \
        for (int64_t r = r0; r < r1; r++) row_fast_q8(NT, w + r * ldw, ldw, nb, X, y + r, ldy);                    \
        break;

#define FAST512_K(NAME, TY)                                                                                        \
    static void fast512_##NAME(int nt, const uint8_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t nb,         \
                               const tmg_xq *X, float *y, int64_t ldy) {                                           \
        switch (nt) {                                                                                              \
            CASE_K(TY, 1) CASE_K(TY, 2) CASE_K(TY, 3) CASE_K(TY, 4)                                                \
            CASE_K(TY, 5) CASE_K(TY, 6) CASE_K(TY, 7) CASE_K(TY, 8)                                                \
        }                                                                                                          \
    }

FAST512_K(q4_k, T_Q4_K)
FAST512_K(q5_k, T_Q5_K)
FAST512_K(q6_k, T_Q6_K)

static void fast512_q8_0(int nt, const uint8_t *w, int64_t ldw, int64_t r0, int64_t r1, int64_t nb, const tmg_xq *X,
                         float *y, int64_t ldy) {
    switch (nt) { CASE_Q8(1) CASE_Q8(2) CASE_Q8(3) CASE_Q8(4) CASE_Q8(5) CASE_Q8(6) CASE_Q8(7) CASE_Q8(8) }
}

#pragma GCC reset_options

tmg_fast_fn tmg_fast_avx512(int type) {
    static int ok = -1;
    if (ok < 0)
        ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    const char *off = getenv("TILEMEM_GGML_AVX2"); /* "1": the AVX2 kernels (tests compare the two) */
    if (!ok || (off != NULL && off[0] == '1')) return NULL;
    switch (type) {
    case T_Q4_K: return fast512_q4_k;
    case T_Q5_K: return fast512_q5_k;
    case T_Q6_K: return fast512_q6_k;
    case T_Q8_0: return fast512_q8_0;
    }
    return NULL;
}
