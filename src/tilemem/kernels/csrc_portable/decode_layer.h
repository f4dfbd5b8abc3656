/* The portable one-call decode layers' shared types (decode_layer.c, mla_decode.c). */
#pragma once
#include <stdint.h>

enum { LIN_BF16 = 0, LIN_FP8 = 1, LIN_GGML = 2 }; /* a linear's (and an expert FFN's) weight format */

/* One linear y = x @ W^T (+ bias), W [R, C]: bf16 (w elements, row stride ldw elements), e4m3 with fp32 block
 * scales (bytes; scale [ceil(R/128), ceil(C/128)], row stride lds) or ggml blocks of `type` (bytes; exact or
 * llama.cpp's fast way). bias: bf16 [R] or NULL. */
typedef struct {
    int64_t kind;
    const void *w;
    int64_t ldw;
    const float *scale;
    int64_t lds;
    int64_t type;
    int64_t exact;
    const uint16_t *bias;
    int64_t R, C;
} tmp_linear;

/* Multi-head latent attention's decode weights (`layers.mla.MLAttention`): q_a (R == 0: none; the layer's q linear
 * is q_proj) with its RMSNorm q_a_ln [Q] and q_b [H * (dn + dr), Q]; kv_a [R + dr, D] with its latent RMSNorm
 * kv_a_ln [R] (both norms at epsilon latent_eps); the absorbed kv_b_proj w_kv bf16 [H, dn + dv, R] (contiguous);
 * the rope part rotated as interleaved pairs (interleave) or halves. */
typedef struct {
    tmp_linear q_a, q_b, kv_a;
    const uint16_t *q_a_ln, *kv_a_ln;
    double latent_eps;
    int64_t R, dn, dr, dv, interleave;
    const uint16_t *w_kv;
} tmp_mla;

/* y [B, R] fp32 = x [B, C] fp32 @ W^T + bias (decode_layer.c). */
int tmp_dl_linear(const tmp_linear *L, const float *x, int64_t B, float *y, int nthreads);

/* Whether the MLA weights fit H heads, hidden size D and the q linear `q` (q_proj where there is no q_a). */
int tmp_mla_ok(const tmp_mla *A, const tmp_linear *q, int64_t H, int64_t D);

/* MLA's decode for B rows (mla_decode.c): xn [B, D] fp32 (the normed input, bf16 values) -> o [B, H * dv] fp32 (bf16
 * values: o_proj's input); the latent and rope key written to the pool kc [N, 1, bs, R + dr] bf16 at element strides
 * (skn, -, skt, 1) at each row's position. */
int tmp_mla_attention(const tmp_mla *A, const tmp_linear *q, int64_t H, float scale, const float *xn, int64_t B,
                      int64_t D, const void *cos, const void *sin, int64_t scs, int rot32, void *kc, int64_t skn,
                      int64_t skh, int64_t skt, int64_t N, int64_t bs, const int64_t *table, int64_t M,
                      const int64_t *pos, float *o, int nthreads);
