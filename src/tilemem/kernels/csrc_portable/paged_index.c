/* The DSA lightning indexer's decode scores over a paged cache of indexer keys on AVX2 + FMA, read in place
 * (no gather of every cached key into a contiguous fp32 copy first):
 *
 *     index[b, l] = sum_h w[b, h] * relu(scale * q[b, h] . k_l)      for l < len[b], -inf for len[b] <= l < L
 *
 * Layout: keys [N, 1, bs, Di] at element strides (skn, -, skt, 1), bf16 or fp32; position p of row b lives in
 * block table[b * M + p / bs] at offset p % bs. q [B, Hi, Di] and w [B, Hi] fp32 contiguous; out [B, L] fp32
 * contiguous.
 *
 * Numerics, as the torch code (`layers/dsa.py`): each dot product in fp32 (bf16 keys widened exactly), times
 * scale, relu, times the head's weight, summed over heads in order h = 0 .. Hi - 1 starting from 0.
 *
 * Threads: work items are (row, chunk of CH positions); within one, NK positions at a time are scored against
 * NH heads at a time (NK x NH FMA chains in registers, each key vector loaded once for the NH heads), and the
 * NK sums then gather every head group in order before the next positions.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp8.h"
#include "paged.h"

#define CH 256 /* positions per work item */

/* o[i] = sum_h w[h] * relu(scale * q_h . k_i) for n key rows at k + ko[i], Hi heads in groups of NH (q padded
 * to a multiple of NH rows; the padding's scores are dropped), NK rows at a time (the last padded with copies
 * of row 0, dropped). */
INLINE void index_rows(const void *k, const int64_t *ko, int64_t n, const float *q, const float *w, int64_t Hi,
                       int64_t Di, float scale, float *o, const int NK, const int NH, const int bf) {
    for (int64_t i = 0; i < n; i += NK) {
        int64_t pad[8];
        const int64_t *kt = ko + i;
        if (i + NK > n) {
            for (int j = 0; j < NK; j++) pad[j] = i + j < n ? ko[i + j] : ko[0];
            kt = pad;
        }
        for (int j = 0; j < NK; j++) fetch_ahead(k, ko, i + j, n, Di, bf);
        float sum[8], s[4 * 8];
        for (int j = 0; j < NK; j++) sum[j] = 0.f;
        for (int64_t h0 = 0; h0 < Hi; h0 += NH) {
            score_tile(k, kt, q + h0 * Di, Di, s, NK, NK, NH, bf);
            const int nh = (int)(Hi - h0 < NH ? Hi - h0 : NH);
            for (int h = 0; h < nh; h++)
                for (int j = 0; j < NK; j++) {
                    float x = s[h * NK + j] * scale;
                    sum[j] += w[h0 + h] * (x > 0.f ? x : 0.f);
                }
        }
        for (int j = 0; j < NK && i + j < n; j++) o[i + j] = sum[j];
    }
}

/* Whether every row's length fits its block table and L, and the table entries of its positions the N blocks. */
static int fits(const int64_t *table, int64_t B, int64_t M, int64_t bs, int64_t N, const int64_t *len, int64_t L) {
    for (int64_t b = 0; b < B; b++) {
        if (len[b] < 0 || len[b] > M * bs || len[b] > L) return 0;
        for (int64_t j = 0; j * bs < len[b]; j++)
            if (table[b * M + j] < 0 || table[b * M + j] >= N) return 0;
    }
    return 1;
}

/* out [B, L] = the indexer scores of q [B, Hi, Di] with weights w [B, Hi] over the paged keys (see the top of
 * this file). Returns TMP_EINVAL (nothing written) where a length or table entry does not fit, TMP_ENOMEM where
 * a thread's scratch could not be allocated. */
TMP_API int tmp_paged_index(const float *q, const float *w, int64_t Hi, int64_t Di, const void *k, int k_bf16,
                            int64_t skn, int64_t skt, int64_t N, int64_t bs, const int64_t *table, int64_t M,
                            const int64_t *len, int64_t B, int64_t L, float scale, float *out, int nthreads) {
    if (!fits(table, B, M, bs, N, len, L)) return TMP_EINVAL;
    if (B == 0 || L == 0) return TMP_OK;
    const int64_t chunks = (L + CH - 1) / CH, items = B * chunks, hp = (Hi + 3) / 4 * 4;
    int err = TMP_OK;
#pragma omp parallel num_threads(nthreads)
    {
        float *qf = (float *)malloc(sizeof(float) * hp * Di);
        int64_t *ko = (int64_t *)malloc(sizeof(int64_t) * CH);
        int64_t qrow = -1; /* the row whose queries qf holds */
        if (!qf || !ko) {
#pragma omp atomic write
            err = TMP_ENOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!qf || !ko) continue;
            const int64_t b = it / chunks, p0 = it % chunks * CH, p1 = p0 + CH < L ? p0 + CH : L;
            const int64_t end = len[b] < p1 ? len[b] : p1; /* positions p0 .. end - 1 are scored */
            float *o = out + b * L;
            for (int64_t p = (end > p0 ? end : p0); p < p1; p++) o[p] = -INFINITY;
            if (end <= p0) continue;
            if (qrow != b) { /* the row's queries, padded with zero rows to a multiple of 4 heads */
                for (int64_t i = 0; i < hp * Di; i++) qf[i] = i < Hi * Di ? q[b * Hi * Di + i] : 0.f;
                qrow = b;
            }
            const int64_t *tb = table + b * M;
            int64_t n = 0, blk = p0 / bs, t = p0 % bs;
            for (int64_t p = p0; p < end; p++) { /* the keys' offsets in the pool, position by position */
                ko[n++] = tb[blk] * skn + t * skt;
                if (++t == bs) t = 0, blk++;
            }
            const float *wb = w + b * Hi;
            if (k_bf16) {
                if (Hi == 1)
                    index_rows(k, ko, n, qf, wb, Hi, Di, scale, o + p0, 8, 1, 1);
                else if (Hi == 2)
                    index_rows(k, ko, n, qf, wb, Hi, Di, scale, o + p0, 4, 2, 1);
                else
                    index_rows(k, ko, n, qf, wb, Hi, Di, scale, o + p0, 2, 4, 1);
            } else {
                if (Hi == 1)
                    index_rows(k, ko, n, qf, wb, Hi, Di, scale, o + p0, 8, 1, 0);
                else if (Hi == 2)
                    index_rows(k, ko, n, qf, wb, Hi, Di, scale, o + p0, 4, 2, 0);
                else
                    index_rows(k, ko, n, qf, wb, Hi, Di, scale, o + p0, 2, 4, 0);
            }
        }
        free(qf);
        free(ko);
    }
    return err;
}
