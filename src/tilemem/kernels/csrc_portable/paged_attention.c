/* Decode attention over a paged KV cache on AVX2 + FMA: each row's one query per head against the positions its
 * block table maps, read in place (no gather into a contiguous cache first).
 *
 * Layout: keys [N, Hkv, bs, Dk] and values [N, Hkv, bs, Dv] at element strides (skn, skh, skt, 1) and (svn, svh,
 * svt, 1), both bf16 or both fp32 (values may be a narrowed view of keys: MLA's latent cache). Position p of row b
 * lives in block table[b * M + p / bs] at offset p % bs. Row b attends positions 0 .. len[b] - 1, or with sel
 * [B, K] only the positions sel[b, i] >= 0 (DeepSeek sparse attention's top-k).
 *
 * Numerics, as torch's CPU scaled_dot_product_attention for bf16: scores q.k in fp32 times scale, softmax in fp32
 * (the exponentials summed unrounded), the probabilities rounded to the values' dtype for the product with the
 * values (fp32 accumulation), divided by the sum at the end, rounded to q's dtype. A row with no position to
 * attend gets zeros.
 *
 * Threads: work items are (row, kv head, chunk of up to HC of its query heads), so that one read of a key or
 * value row serves every query head of the chunk (GQA; MLA's latent cache has one kv head for all heads).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp8.h"
#include "paged.h"

#define HC 4 /* query heads per work item */

/* fp32 -> bf16, round to nearest even (NaN stays NaN), as torch rounds. */
INLINE uint16_t to_bf16(float f) {
    bits c = {.f = f};
    if (f != f) return 0x7fc0;
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

INLINE float round_bf16(float f) {
    bits c = {.u = (uint32_t)to_bf16(f) << 16};
    return c.f;
}

/* e^x on 8 lanes (x <= 0 here): Cephes' expf polynomial, about 1 ulp. */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

INLINE float exp1(float x) {
    float v[8];
    _mm256_storeu_ps(v, exp8(_mm256_set1_ps(x)));
    return v[0];
}

/* Softmax of n scores in place (times scale first): the exponentials summed unrounded, then rounded to bf16
 * when the values are bf16 (rnd). Returns the sum. */
static float softmax(float *s, int64_t n, float scale, int rnd) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        s[i] *= scale;
        m = s[i] > m ? s[i] : m;
    }
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
        acc = _mm256_add_ps(acc, e);
        _mm256_storeu_ps(s + i, e);
    }
    float sum = hsum8(acc);
    for (; i < n; i++) {
        s[i] = exp1(s[i] - m);
        sum += s[i];
    }
    if (rnd)
        for (i = 0; i < n; i++) s[i] = round_bf16(s[i]);
    return sum;
}

/* Scores of n positions (key rows at k + ko[i]) for NH heads, NK positions at a time (the last ones padded
 * with copies of position 0, their scores dropped). */
INLINE void scores(const void *k, const int64_t *ko, int64_t n, const float *q, int64_t Dk, float *s, int64_t lds,
                   const int NK, const int NH, const int bf) {
    int64_t i = 0;
    for (; i + NK <= n; i += NK) {
        for (int j = 0; j < NK; j++) fetch_ahead(k, ko, i + j, n, Dk, bf);
        score_tile(k, ko + i, q, Dk, s + i, lds, NK, NH, bf);
    }
    if (i < n) {
        int64_t pad[8];
        float t[4 * 8];
        for (int j = 0; j < NK; j++) pad[j] = i + j < n ? ko[i + j] : ko[0];
        score_tile(k, pad, q, Dk, t, NK, NK, NH, bf);
        for (int h = 0; h < NH; h++)
            for (int64_t j = 0; i + j < n; j++) s[h * lds + i + j] = t[h * NK + j];
    }
}

/* acc[h * Dv + f + c] += sum_i p[h * ldp + i] * v_i[f + c] for value rows i in [i0, i1) at v + vo[i], c < 8 * FC:
 * NH x FC chains in registers, each value vector loaded once for all NH heads. */
INLINE void wsum_tile(const void *v, const int64_t *vo, int64_t i0, int64_t i1, const float *p, int64_t ldp,
                      int64_t Dv, int64_t f, float *acc, const int NH, const int FC, const int bf) {
    __m256 a[4][8];
#pragma GCC unroll 4
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int c = 0; c < FC; c++) a[h][c] = _mm256_loadu_ps(acc + h * Dv + f + 8 * c);
    for (int64_t i = i0; i < i1; i++) {
#pragma GCC unroll 8
        for (int c = 0; c < FC; c++) {
            __m256 vv = load8(v, vo[i] + f + 8 * c, bf);
#pragma GCC unroll 4
            for (int h = 0; h < NH; h++) a[h][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + h * ldp + i), vv, a[h][c]);
        }
    }
#pragma GCC unroll 4
    for (int h = 0; h < NH; h++)
#pragma GCC unroll 8
        for (int c = 0; c < FC; c++) _mm256_storeu_ps(acc + h * Dv + f + 8 * c, a[h][c]);
}

#define ROWS 32 /* value rows per pass over the accumulators (8 KB of bf16 rows of 128 values: in L1 for every pass) */

/* acc[h * Dv + f] += sum_i p[h * ldp + i] * v_i[f] over n value rows at v + vo[i], for NH heads. */
INLINE void weighted_sum(const void *v, const int64_t *vo, int64_t n, const float *p, int64_t ldp, int64_t Dv,
                         float *acc, const int NH, const int bf) {
    for (int64_t i0 = 0; i0 < n; i0 += ROWS) {
        const int64_t i1 = n - i0 < ROWS ? n : i0 + ROWS;
        for (int64_t i = i0; i < i1; i++) fetch_ahead(v, vo, i + ROWS - AHEAD, n, Dv, bf); /* the next pass's */
        int64_t f = 0;
        for (; f + 64 <= Dv && NH == 1; f += 64) wsum_tile(v, vo, i0, i1, p, ldp, Dv, f, acc, NH, 8, bf);
        for (; f + 32 <= Dv && NH <= 2; f += 32) wsum_tile(v, vo, i0, i1, p, ldp, Dv, f, acc, NH, 4, bf);
        for (; f + 16 <= Dv; f += 16) wsum_tile(v, vo, i0, i1, p, ldp, Dv, f, acc, NH, 2, bf);
        for (; f + 8 <= Dv; f += 8) wsum_tile(v, vo, i0, i1, p, ldp, Dv, f, acc, NH, 1, bf);
        for (; f < Dv; f++)
            for (int64_t i = i0; i < i1; i++) {
                float x = load1(v, vo[i] + f, bf);
                for (int h = 0; h < NH; h++) acc[h * Dv + f] += p[h * ldp + i] * x;
            }
    }
}

/* The scores and weighted sum of nh heads (specialized by head count and dtype). */
INLINE void attend(const void *k, const void *v, const int64_t *ko, const int64_t *vo, int64_t n, const float *qf,
                   int64_t Dk, int64_t Dv, float *s, int64_t lds, float *acc, float *sums, float scale, const int NH,
                   const int bf) {
    if (NH >= 3)
        scores(k, ko, n, qf, Dk, s, lds, 2, 4, bf); /* 3 heads: a 4th, padded, scored and dropped */
    else if (NH == 2)
        scores(k, ko, n, qf, Dk, s, lds, 4, 2, bf);
    else
        scores(k, ko, n, qf, Dk, s, lds, 8, 1, bf);
    for (int h = 0; h < NH; h++) sums[h] = softmax(s + h * lds, n, scale, bf);
    weighted_sum(v, vo, n, s, lds, Dv, acc, NH, bf);
}

/* Whether every row's length fits its block table, its selected positions its length, and the table entries
 * of its positions the pool of N blocks. */
static int fits(const int64_t *table, int64_t B, int64_t M, int64_t bs, int64_t N, const int64_t *len,
                const int64_t *sel, int64_t K) {
    for (int64_t b = 0; b < B; b++) {
        if (len[b] < 0 || len[b] > M * bs) return 0;
        for (int64_t j = 0; j * bs < len[b]; j++)
            if (table[b * M + j] < 0 || table[b * M + j] >= N) return 0;
        for (int64_t i = 0; sel && i < K; i++)
            if (sel[b * K + i] >= len[b]) return 0;
    }
    return 1;
}

/* out [B, H, Dv] (contiguous, q's dtype) = attention of q [B, H, Dk] (strides sqb, sqh, 1) over the paged cache
 * (see the top of this file); scale: the score factor. Returns TMP_EINVAL (nothing written) where a length,
 * selected position or table entry does not fit, TMP_ENOMEM where a thread's scratch could not be allocated. */
TMP_API int tmp_paged_attention(const void *q, int q_bf16, int64_t sqb, int64_t sqh, const void *k, const void *v,
                                int kv_bf16, int64_t skn, int64_t skh, int64_t skt, int64_t svn, int64_t svh,
                                int64_t svt, int64_t N, int64_t bs, const int64_t *table, int64_t M,
                                const int64_t *len, const int64_t *sel, int64_t K, int64_t B, int64_t H, int64_t Hkv,
                                int64_t Dk, int64_t Dv, float scale, void *out, int nthreads) {
    if (!fits(table, B, M, bs, N, len, sel, K)) return TMP_EINVAL;
    const int64_t G = H / Hkv, chunks = (G + HC - 1) / HC, items = B * Hkv * chunks;
    int64_t most = 0; /* the most positions a row attends */
    for (int64_t b = 0; b < B; b++) most = (sel ? K : len[b]) > most ? (sel ? K : len[b]) : most;
    int err = TMP_OK;
#pragma omp parallel num_threads(nthreads)
    {
        float *qf = (float *)malloc(sizeof(float) * (HC * (Dk + Dv + most) + 8));
        int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (2 * most + 1));
        if (!qf || !off) {
#pragma omp atomic write
            err = TMP_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!qf || !off) continue;
            const int64_t b = it / (Hkv * chunks), g = it / chunks % Hkv, h0 = g * G + it % chunks * HC;
            const int nh = (int)(G - (h0 - g * G) < HC ? G - (h0 - g * G) : HC);
            float *acc = qf + HC * Dk, *s = acc + HC * Dv;
            int64_t *ko = off, *vo = off + most, n = 0;
            const int64_t *tb = table + b * M;
            const int64_t cnt = sel ? K : len[b];
            for (int64_t i = 0; sel && i < cnt; i++) { /* the rows' offsets in the pools, position by position */
                int64_t p = sel[b * K + i];
                if (p < 0) continue;
                int64_t blk = tb[p / bs], t = p % bs;
                ko[n] = blk * skn + g * skh + t * skt;
                vo[n++] = blk * svn + g * svh + t * svt;
            }
            for (int64_t j = 0; !sel && j * bs < cnt; j++) /* block by block (no division per position) */
                for (int64_t t = 0; t < bs && n < cnt; t++) {
                    ko[n] = tb[j] * skn + g * skh + t * skt;
                    vo[n++] = tb[j] * svn + g * svh + t * svt;
                }
            for (int h = 0; h < HC; h++) /* the chunk's queries as fp32, padded with copies of its first */
                for (int64_t d = 0; d < Dk; d++)
                    qf[h * Dk + d] = load1(q, b * sqb + (h0 + (h < nh ? h : 0)) * sqh + d, q_bf16);
            for (int64_t i = 0; i < nh * Dv; i++) acc[i] = 0.f;
            float sums[HC];
            if (n && kv_bf16) {
                switch (nh) {
                    case 1: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 1, 1); break;
                    case 2: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 2, 1); break;
                    case 3: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 3, 1); break;
                    default: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 4, 1);
                }
            } else if (n) {
                switch (nh) {
                    case 1: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 1, 0); break;
                    case 2: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 2, 0); break;
                    case 3: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 3, 0); break;
                    default: attend(k, v, ko, vo, n, qf, Dk, Dv, s, most, acc, sums, scale, 4, 0);
                }
            }
            for (int h = 0; h < nh; h++) {
                const int64_t o = (b * H + h0 + h) * Dv;
                for (int64_t f = 0; f < Dv; f++) {
                    float y = n ? acc[h * Dv + f] / sums[h] : 0.f;
                    if (q_bf16)
                        ((uint16_t *)out)[o + f] = to_bf16(y);
                    else
                        ((float *)out)[o + f] = y;
                }
            }
        }
        free(qf);
        free(off);
    }
    return err;
}
