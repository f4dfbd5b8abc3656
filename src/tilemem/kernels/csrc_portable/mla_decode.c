/* Multi-head latent attention (DeepSeek-V2/V3) for a decode step's rows inside the one-call decode layers
 * (decode_layer.c), as `layers.mla.MLAttention` decodes on a CPU without the AVX512 library, op by op:
 *   q = q_b(rmsnorm(q_a(n))) or q_proj(n); c = kv_a(n) (each linear rounded to bf16)
 *   q_rope, k_rope rotated (interleaved pairs de-interleaved to halves first; in fp32 and rounded once, or each
 *   product and the sum rounded to bf16), the latent rmsnorm'd; [latent | k_rope] written to the pool
 *   q_lat[h] = bf16(q_nope[h] @ W_UK[h]) (bf16.c's matmul_nn, as the module's per-head call)
 *   o_lat = paged attention of [q_lat | q_rope] over the pool (paged_attention.c; the values the latent part)
 *   o[h] = bf16(o_lat[h] @ W_UV[h]^T) (bf16.c's matmul_nt)
 * Shapes: B rows, D hidden, H heads, Q q_lora_rank, R kv_lora_rank, dn / dr / dv the nope / rope / value widths.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode_layer.h"
#include "fp8.h"
#include "paged.h"
#include "torch_rows.h"

/* x [d] (bf16 values) rotated in place as `layers.rope.RotaryEmbedding.apply`: interleaved pairs to halves first,
 * then x * cos + rotate_half(x) * sin; in fp32 (rot32: fp32 cos/sin) rounded once, else each product and the sum
 * rounded to bf16. tmp: scratch [d]. */
static void rope(float *x, int64_t d, int interleave, const void *cos, const void *sin, int rot32, float *tmp) {
    const int64_t half = d / 2;
    const int cbf = !rot32;
    if (interleave) {
        for (int64_t i = 0; i < half; i++) tmp[i] = x[2 * i], tmp[half + i] = x[2 * i + 1];
        memcpy(x, tmp, sizeof(float) * (size_t)d);
    }
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[half + i];
        const float a1 = rnd(x1 * load1(cos, i, cbf), cbf), b1 = rnd(-x2 * load1(sin, i, cbf), cbf);
        const float a2 = rnd(x2 * load1(cos, half + i, cbf), cbf), b2 = rnd(x1 * load1(sin, half + i, cbf), cbf);
        x[i] = rnd(a1 + b1, 1);
        x[half + i] = rnd(a2 + b2, 1);
    }
}

static void round_bf16(float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = rnd(y[i], 1);
}

static int lin_ok(const tmp_linear *L, int64_t R, int64_t C) {
    return L->kind >= LIN_BF16 && L->kind <= LIN_GGML && L->R == R && L->C == C;
}

int tmp_mla_ok(const tmp_mla *A, const tmp_linear *q, int64_t H, int64_t D) {
    const int64_t dq = A->dn + A->dr, Q = A->q_a.R;
    if (A->R <= 0 || A->dn <= 0 || A->dr <= 0 || A->dr % 2 || A->dv <= 0 || !A->kv_a_ln || !A->w_kv) return 0;
    if (!lin_ok(&A->kv_a, A->R + A->dr, D)) return 0;
    if (Q > 0) return lin_ok(&A->q_a, Q, D) && lin_ok(&A->q_b, H * dq, Q) && A->q_a_ln;
    return lin_ok(q, H * dq, D);
}

int tmp_mla_attention(const tmp_mla *A, const tmp_linear *q, int64_t H, float scale, const float *xn, int64_t B,
                      int64_t D, const void *cos, const void *sin, int64_t scs, int rot32, void *kc, int64_t skn,
                      int64_t skh, int64_t skt, int64_t N, int64_t bs, const int64_t *table, int64_t M,
                      const int64_t *pos, float *o, int nthreads) {
    (void)D;
    const int64_t R = A->R, dn = A->dn, dr = A->dr, dv = A->dv, dq = dn + dr, E = R + dr, Q = A->q_a.R;
    const int64_t wide = R > dn ? R : dn, hw = dn + dv; /* hw: a head's rows of w_kv */
    /* fp32: qf [B, H * dq], qa [B, Q], c [B, E], xh [B, wide], yh [B, wide], tmp [E]; bf16: qfull [B, H, E], olat
     * [B, H, R]; len [B] */
    float *f = malloc(sizeof(float) * (size_t)(B * (H * dq + Q + E + 2 * wide) + E));
    uint16_t *h16 = malloc(sizeof(uint16_t) * (size_t)(B * H * (E + R)));
    int64_t *len = malloc(sizeof(int64_t) * (size_t)B);
    int st = !f || !h16 || !len ? TMP_ENOMEM : TMP_OK;
    float *qf = f, *qa = qf + B * H * dq, *c = qa + B * Q, *xh = c + B * E, *yh = xh + B * wide, *tmp = yh + B * wide;
    uint16_t *qfull = h16, *olat = qfull + B * H * E;
    if (st == TMP_OK && Q > 0) {
        if (!(st = tmp_dl_linear(&A->q_a, xn, B, qa, nthreads))) {
            round_bf16(qa, B * Q);
            for (int64_t b = 0; b < B; b++) rms_norm(qa + b * Q, Q, A->q_a_ln, (float)A->latent_eps, 1);
            st = tmp_dl_linear(&A->q_b, qa, B, qf, nthreads);
        }
    } else if (st == TMP_OK) {
        st = tmp_dl_linear(q, xn, B, qf, nthreads);
    }
    if (st == TMP_OK) st = tmp_dl_linear(&A->kv_a, xn, B, c, nthreads);
    if (st == TMP_OK) {
        round_bf16(qf, B * H * dq);
        round_bf16(c, B * E);
        for (int64_t b = 0; b < B; b++) {
            const void *cb = (const char *)cos + b * scs * (rot32 ? 4 : 2);
            const void *sb = (const char *)sin + b * scs * (rot32 ? 4 : 2);
            float *cr = c + b * E;
            rms_norm(cr, R, A->kv_a_ln, (float)A->latent_eps, 1);
            rope(cr + R, dr, (int)A->interleave, cb, sb, rot32, tmp);
            const int64_t blk = table[b * M + pos[b] / bs], t = pos[b] % bs;
            store_row(kc, blk * skn + t * skt, cr, E, 1);
            for (int64_t hh = 0; hh < H; hh++) {
                float *qh = qf + (b * H + hh) * dq;
                rope(qh + dn, dr, (int)A->interleave, cb, sb, rot32, tmp);
                store_row(qfull, (b * H + hh) * E + R, qh + dn, dr, 1);
            }
            len[b] = pos[b] + 1;
        }
    }
    for (int64_t hh = 0; hh < H && st == TMP_OK; hh++) { /* q_lat[h] = q_nope[h] @ W_UK[h] */
        for (int64_t b = 0; b < B; b++) memcpy(xh + b * dn, qf + (b * H + hh) * dq, sizeof(float) * (size_t)dn);
        st = tmp_bf16_matmul_nn(A->w_kv + hh * hw * R, R, dn, R, xh, dn, B, yh, R, nthreads);
        for (int64_t b = 0; b < B && st == TMP_OK; b++) {
            round_bf16(yh + b * R, R);
            store_row(qfull, (b * H + hh) * E, yh + b * R, R, 1);
        }
    }
    if (st == TMP_OK)
        st = tmp_paged_attention(qfull, 1, H * E, E, kc, kc, 1, skn, skh, skt, skn, skh, skt, N, bs, table, M, len,
                                 NULL, 0, B, H, 1, E, R, scale, olat, nthreads);
    for (int64_t hh = 0; hh < H && st == TMP_OK; hh++) { /* o[h] = o_lat[h] @ W_UV[h]^T */
        for (int64_t b = 0; b < B; b++) load_row(xh + b * R, olat, (b * H + hh) * R, R, 1);
        st = tmp_bf16_matmul_nt(A->w_kv + (hh * hw + dn) * R, R, dv, R, xh, R, B, yh, dv, nthreads);
        for (int64_t b = 0; b < B && st == TMP_OK; b++) {
            round_bf16(yh + b * dv, dv);
            memcpy(o + (b * H + hh) * dv, yh + b * dv, sizeof(float) * (size_t)dv);
        }
    }
    free(f);
    free(h16);
    free(len);
    return st;
}
