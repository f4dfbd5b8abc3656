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
#include "torch_sum.h"

/* paged_attention.c */
TMP_API int tmp_paged_attention(const void *q, int q_bf16, int64_t sqb, int64_t sqh, const void *k, const void *v,
                                int kv_bf16, int64_t skn, int64_t skh, int64_t skt, int64_t svn, int64_t svh,
                                int64_t svt, int64_t N, int64_t bs, const int64_t *table, int64_t M,
                                const int64_t *len, const int64_t *sel, int64_t K, int64_t B, int64_t H, int64_t Hkv,
                                int64_t Dk, int64_t Dv, float scale, void *out, int nthreads);

enum { NORM_NONE = 0, NORM_FULL = 1, NORM_HEAD = 2 };

/* fp32 -> bf16, round to nearest even (NaN stays NaN), as torch rounds. */
INLINE uint16_t bf16_bits(float f) {
    bits c = {.f = f};
    if (f != f) return 0x7fc0;
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* f rounded to the dtype (bf16 when bf, else fp32: unchanged). */
INLINE float rnd(float f, const int bf) {
    if (!bf) return f;
    bits c = {.u = (uint32_t)bf16_bits(f) << 16};
    return c.f;
}

INLINE void store1(void *p, int64_t i, float f, const int bf) {
    if (bf)
        ((uint16_t *)p)[i] = bf16_bits(f);
    else
        ((float *)p)[i] = f;
}

/* x[0..n) = w * to_dtype(x * rsqrt(mean(x^2) + eps)), rounded to the dtype: RMSNorm's torch math. */
static void rms_norm(float *x, int64_t n, const void *w, float eps, const int bf) {
    const float mean = torch_sumsq(x, n) / (float)n;
    const float r = 1.f / sqrtf(mean + eps);
    for (int64_t i = 0; i < n; i++) x[i] = rnd(load1(w, i, bf) * rnd(x[i] * r, bf), bf);
}

/* The q or k row x [nh * hd] (fp32 values of the dtype) through norm, clip, head norm and rope, in place; t: hd
 * floats of scratch. cos/sin [hd]: fp32 when rot32, else the dtype. */
static void qk_row(float *x, int64_t nh, int64_t hd, int norm, const void *w, float eps, int clip_on, float clip,
                   const void *cos, const void *sin, int rot32, float *t, const int bf) {
    const int64_t n = nh * hd, half = hd / 2;
    const int cbf = bf && !rot32; /* the products and sum round to bf16 op by op */
    if (norm == NORM_FULL) rms_norm(x, n, w, eps, bf);
    for (int64_t i = 0; clip_on && i < n; i++) x[i] = x[i] < -clip ? -clip : (x[i] > clip ? clip : x[i]);
    for (int64_t h = 0; norm == NORM_HEAD && h < nh; h++) rms_norm(x + h * hd, hd, w, eps, bf);
    for (int64_t h = 0; h < nh; h++) {
        float *xh = x + h * hd;
        for (int64_t i = 0; i < hd; i++) t[i] = xh[i];
        for (int64_t i = 0; i < hd; i++) {
            const float rot = i < half ? -t[i + half] : t[i - half]; /* rotate_half */
            float a = t[i] * load1(cos, i, cbf), b = rot * load1(sin, i, cbf);
            if (cbf) a = rnd(a, 1), b = rnd(b, 1);
            xh[i] = rnd(a + b, bf);
        }
    }
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
    if (!fits(table, B, M, bs, N, pos) || hd % 2 || Hkv <= 0 || H % Hkv) return TMP_EINVAL;
    const int64_t es = bf ? 2 : 4, nq = H * hd, nk = Hkv * hd;
    float *x = (float *)malloc(sizeof(float) * ((nq > nk ? nq : nk) + hd));
    void *qr = malloc(es * B * nq);
    int64_t *len = (int64_t *)malloc(sizeof(int64_t) * (B ? B : 1));
    int err = !x || !qr || !len ? TMP_ENOMEM : TMP_OK;
    for (int64_t b = 0; b < B && !err; b++) {
        const void *cb = (const char *)cos + b * scs * (rot32 ? 4 : es);
        const void *sb = (const char *)sin + b * scs * (rot32 ? 4 : es);
        const int64_t blk = table[b * M + pos[b] / bs], t = pos[b] % bs;
        len[b] = pos[b] + 1;
        for (int64_t i = 0; i < nq; i++) x[i] = load1(q, b * sq + i, bf);
        qk_row(x, H, hd, norm, qw, eps, clip_on, clip, cb, sb, rot32, x + nq, bf);
        for (int64_t i = 0; i < nq; i++) store1(qr, b * nq + i, x[i], bf);
        for (int64_t i = 0; i < nk; i++) x[i] = load1(k, b * sk + i, bf);
        qk_row(x, Hkv, hd, norm, kw, eps, clip_on, clip, cb, sb, rot32, x + nk, bf);
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t d = 0; d < hd; d++) {
                store1(kc, blk * skn + g * skh + t * skt + d, x[g * hd + d], bf);
                float y = load1(v, b * sv + g * hd + d, bf);
                if (clip_on) y = y < -clip ? -clip : (y > clip ? clip : y);
                store1(vc, blk * svn + g * svh + t * svt + d, y, bf);
            }
    }
    if (!err)
        err = tmp_paged_attention(qr, bf, nq, hd, kc, vc, bf, skn, skh, skt, svn, svh, svt, N, bs, table, M, len, NULL,
                                  0, B, H, Hkv, hd, hd, scale, out, nthreads);
    free(x);
    free(qr);
    free(len);
    return err;
}
