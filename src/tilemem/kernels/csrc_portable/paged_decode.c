/* A decode step's attention block after its projections, on AVX2 + FMA, in one call: for B rows of one new
 * token each, q [B, H * hd], k and v [B, Hkv * hd] (the q/k/v projections' outputs, bf16 or fp32) go through
 * the optional q/k RMSNorm (over all heads at once, "full", or per head, "head"), the optional clip, the
 * rotary embedding of q and k (non-interleaved halves); the rotated k and v are written into the paged pools at
 * each row's position, and q attends positions 0 .. position (paged_attention.c) -> o [B, H * hd].
 *
 * Numerics: those of the torch modules (`layers.attention.Attention`'s torch path) op by op, each op rounded to
 * the dtype as torch rounds it: RMSNorm in fp32 (the sum of squares in torch's order, torch_sum.h; times
 * 1 / sqrt(mean + eps)), rounded to the dtype, times the weight, rounded; the clip at the bound rounded to the
 * dtype (the caller passes it so); rope as x * cos + rotate_half(x) * sin with each product and the sum rounded
 * to the dtype, or in fp32 (fp32 cos/sin, `rot32`) and rounded once at the end. No FMA in any of these
 * (-ffp-contract=off): torch runs them as separate ops.
 *
 * Layout: keys [N, Hkv, bs, hd] and values [N, Hkv, bs, hd] at element strides (skn, skh, skt, 1) and (svn, svh,
 * svt, 1), in the dtype; position p of row b lives in block table[b * M + p / bs] at offset p % bs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fp8.h"
#include "paged.h"
#include "torch_rows.h"

enum { NORM_NONE = 0, NORM_FULL = 1, NORM_HEAD = 2 };

/* x clamped to [-c, c] (NaN stays NaN: max and min return their second operand then). */
static void clamp(float *x, int64_t n, float c) {
    const __m256 lo = _mm256_set1_ps(-c), hi = _mm256_set1_ps(c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(x + i))));
    for (; i < n; i++) x[i] = x[i] < -c ? -c : (x[i] > c ? c : x[i]);
}

/* One head xh [hd] rotated in place: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1) for the halves
 * x1, x2; the products rounded to bf16 when cbf, the sum to the dtype. */
static void rope_head(float *xh, int64_t hd, const void *cos, const void *sin, const int cbf, const int bf) {
    const int64_t half = hd / 2;
    const __m256 sign = _mm256_set1_ps(-0.f);
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(xh + i), x2 = _mm256_loadu_ps(xh + half + i);
        const __m256 a1 = rnd8(_mm256_mul_ps(x1, load8(cos, i, cbf)), cbf);
        const __m256 b1 = rnd8(_mm256_mul_ps(_mm256_xor_ps(x2, sign), load8(sin, i, cbf)), cbf);
        const __m256 a2 = rnd8(_mm256_mul_ps(x2, load8(cos, half + i, cbf)), cbf);
        const __m256 b2 = rnd8(_mm256_mul_ps(x1, load8(sin, half + i, cbf)), cbf);
        _mm256_storeu_ps(xh + i, rnd8(_mm256_add_ps(a1, b1), bf));
        _mm256_storeu_ps(xh + half + i, rnd8(_mm256_add_ps(a2, b2), bf));
    }
    for (; i < half; i++) {
        const float x1 = xh[i], x2 = xh[half + i];
        const float a1 = rnd(x1 * load1(cos, i, cbf), cbf), b1 = rnd(-x2 * load1(sin, i, cbf), cbf);
        const float a2 = rnd(x2 * load1(cos, half + i, cbf), cbf), b2 = rnd(x1 * load1(sin, half + i, cbf), cbf);
        xh[i] = rnd(a1 + b1, bf);
        xh[half + i] = rnd(a2 + b2, bf);
    }
}

/* The q or k row x [nh * hd] (fp32 values of the dtype) through norm, clip, head norm and rope, in place.
 * cos/sin [hd]: fp32 when rot32, else the dtype. */
static void qk_row(float *x, int64_t nh, int64_t hd, int norm, const void *w, float eps, int clip_on, float clip,
                   const void *cos, const void *sin, int rot32, const int bf) {
    const int cbf = bf && !rot32; /* the products round to bf16 op by op */
    if (norm == NORM_FULL) rms_norm(x, nh * hd, w, eps, bf);
    if (clip_on) clamp(x, nh * hd, clip);
    for (int64_t h = 0; norm == NORM_HEAD && h < nh; h++) rms_norm(x + h * hd, hd, w, eps, bf);
    for (int64_t h = 0; h < nh; h++) rope_head(x + h * hd, hd, cos, sin, cbf, bf);
}

/* Whether every row's position fits its block table and the table entries up to it the pool of N blocks. */
static int fits(const int64_t *table, int64_t B, int64_t M, int64_t bs, int64_t N, const int64_t *pos) {
    for (int64_t b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] >= M * bs) return 0;
        for (int64_t j = 0; j <= pos[b] / bs; j++)
            if (table[b * M + j] < 0 || table[b * M + j] >= N) return 0;
    }
    return 1;
}

/* out [B, H * hd] (contiguous, the dtype) = the attention block of B decode rows (see the top of this file).
 * q, k, v at row strides sq, sk, sv (elements); bf: bf16 tensors, else fp32 (q, k, v, the pools, the norm
 * weights, out; cos and sin too unless rot32). norm: 0 none, 1 full (qw [H * hd], kw [Hkv * hd]), 2 head (qw,
 * kw [hd]). clip_on: clamp q, k, v to [-clip, clip] (clip in the dtype already). cos, sin [B, hd] at row stride
 * scs. pos [B]: each row's new position. Returns TMP_EINVAL (nothing written) where a position or the table
 * entries up to it do not fit, TMP_ENOMEM where scratch could not be allocated. */
TMP_API int tmp_paged_decode_block(const void *q, int64_t sq, const void *k, int64_t sk, const void *v, int64_t sv,
                                   int bf, int64_t B, int64_t H, int64_t Hkv, int64_t hd, int norm, const void *qw,
                                   const void *kw, float eps, int clip_on, float clip, const void *cos,
                                   const void *sin, int64_t scs, int rot32, void *kc, int64_t skn, int64_t skh,
                                   int64_t skt, void *vc, int64_t svn, int64_t svh, int64_t svt, int64_t N,
                                   int64_t bs, const int64_t *table, int64_t M, const int64_t *pos, float scale,
                                   void *out, int nthreads) {
    if (!fits(table, B, M, bs, N, pos) || hd <= 0 || hd % 2 || Hkv <= 0 || H % Hkv) return TMP_EINVAL;
    if (B == 0) return TMP_OK;
    const int64_t es = bf ? 2 : 4, nq = H * hd, nk = Hkv * hd;
    float *x = (float *)malloc(sizeof(float) * (nq > nk ? nq : nk));
    void *qr = malloc(es * B * nq);
    int64_t *len = (int64_t *)malloc(sizeof(int64_t) * (B ? B : 1));
    int err = !x || !qr || !len ? TMP_ENOMEM : TMP_OK;
    for (int64_t b = 0; b < B && !err; b++) {
        const void *cb = (const char *)cos + b * scs * (rot32 ? 4 : es);
        const void *sb = (const char *)sin + b * scs * (rot32 ? 4 : es);
        const int64_t blk = table[b * M + pos[b] / bs], t = pos[b] % bs;
        len[b] = pos[b] + 1;
        load_row(x, q, b * sq, nq, bf);
        qk_row(x, H, hd, norm, qw, eps, clip_on, clip, cb, sb, rot32, bf);
        store_row(qr, b * nq, x, nq, bf);
        load_row(x, k, b * sk, nk, bf);
        qk_row(x, Hkv, hd, norm, kw, eps, clip_on, clip, cb, sb, rot32, bf);
        for (int64_t g = 0; g < Hkv; g++) store_row(kc, blk * skn + g * skh + t * skt, x + g * hd, hd, bf);
        load_row(x, v, b * sv, nk, bf);
        if (clip_on) clamp(x, nk, clip);
        for (int64_t g = 0; g < Hkv; g++) store_row(vc, blk * svn + g * svh + t * svt, x + g * hd, hd, bf);
    }
    if (!err)
        err = tmp_paged_attention(qr, bf, nq, hd, kc, vc, bf, skn, skh, skt, svn, svh, svt, N, bs, table, M, len, NULL,
                                  0, B, H, Hkv, hd, hd, scale, out, nthreads);
    free(x);
    free(qr);
    free(len);
    return err;
}
