/* TileMEM's native CPU kernels (AVX512-BF16, AMX where the CPU has it): the one interface of the shared
 * library that tilemem.kernels builds from the .c files beside this header and loads with ctypes.
 *
 * Decode reads every weight byte once per token, so speed is memory bandwidth. These kernels
 * stream each weight row once for all the tokens that need it (up to TB at a time), in one
 * sequential pass per row, accumulate in fp32 with vdpbf16ps, and fuse a gated expert FFN
 * (gate, up, act, down, routing weight) into one pass with one thread barrier. Prefill-sized
 * tasks (many tokens per expert) run as a GEMM over packed token vectors instead (gemm.c), on AMX
 * tiles where the CPU has them and Linux grants them (amx.c), and a decode step's whole attention
 * block is one call (tm_attn_decode_bf16), as is a run of MoE decoder layers (tm_decode_layers_bf16).
 *
 * Threads: OpenMP (the same libgomp that torch loaded). An expert FFN is split across threads
 * by neuron range for gate/up (each thread its contiguous rows), then by hidden rows for down
 * (checkpoint layout [D, I]: each thread a contiguous block of rows) or by neuron range with
 * per-thread partial sums (tile layout, down stored transposed [n, D]). Prefill-sized tasks go to
 * the threads as work items (neuron chunks, then hidden-row chunks) as the threads come free.
 *
 * Files by role: simd.h (bf16 and AVX512 helpers), dot.h (register-blocked dot products of a few
 * tokens), gemm.c (the prefill GEMM's packing and microkernels), amx.c
 * (AMX tiles), x12.c (the lossless 12-bit codec and its decoders), linear_norm.c (small-batch linear,
 * RMSNorm), ffn.c (fused gated FFN tasks), moe.c (a MoE layer's routed experts), attention.c (decode
 * attention block, prefill causal attention), decode_layers.c (a decode step's run of MoE decoder
 * layers), abi.c (the ABI version and struct sizes); internal.h holds what they share.
 *
 * Errors: the functions that allocate return a tm_status; on TM_ENOMEM their outputs are undefined. The
 * decode functions that read a paged KV cache check its block table first: TM_EINVAL (nothing read or
 * written) for a position past the table or a used entry outside the pool's N blocks.
 *
 * Shape legend: T tokens, D hidden, n neurons of a task, K reduction length, N output rows.
 */
#ifndef TILEMEM_H
#define TILEMEM_H

#include <stdint.h>

/* The one interface version: bump it whenever a struct or a prototype below changes. Python reads it
 * from this line and checks it, and the struct sizes, against the loaded library. */
#define TM_ABI_VERSION 9

#define TM_API __attribute__((visibility("default")))

typedef enum { TM_OK = 0, TM_ENOMEM = 1, TM_EINVAL = 2 } tm_status;

/* A bf16 matrix [N, K] in 12 bits per weight, losslessly (see x12.c). */
typedef struct {
  const uint8_t *lo;    /* [N, KP] low bytes */
  const uint8_t *hc;    /* [N, KP / 2] high-byte codes */
  const uint8_t *tab;   /* [64] code -> high byte, the 16 entries repeated in each 128-bit lane */
  const int32_t *xrow;  /* [N + 1] row r's exceptions are xval[xrow[r]:xrow[r + 1]] */
  const uint32_t *xval; /* column << 16 | bf16 bits, by row, then column */
  int64_t N, K;
} tm_x12;

/* One gated-FFN task: out[tok] += scale * down(act(gate x) * up x) over a neuron range (see ffn.c). */
typedef struct {
  const uint16_t *gate; /* [n, ld_gu] rows */
  const uint16_t *up;   /* [n, ld_gu] rows */
  const uint16_t *down; /* down_t ? [n, ld_down] (transposed rows) : [D, ld_down] starting at column 0 */
  int64_t n, ld_gu, ld_down;
  int32_t down_t, ntok;
  const int32_t *tok;  /* [ntok] token rows of x / out */
  const float *scale;  /* [ntok] routing weights */
  const tm_x12 *cgate, *cup, *cdown; /* checkpoint layout: the matrices stored as x12 (then gate, up, down
                                      * are not read), or NULL */
} tm_ffn_task;

/* One attention layer's weights and options for a decode step (see attention.c). */
typedef struct {
  const uint16_t *wq, *wk, *wv, *wo;         /* [H*hd, D], [Hkv*hd, D] x2, [D, H*hd] */
  const uint16_t *bq, *bk, *bv, *bo;         /* biases or NULL */
  const uint16_t *q_norm, *k_norm;           /* [H*hd], [Hkv*hd] (qk_norm 1) or [hd] (2); else NULL */
  int32_t qk_norm, H, Hkv, hd;
  float eps, scale, clip;                    /* clip <= 0: none */
  int32_t fp32_rotate;                       /* cos/sin fp32 and the rotation in fp32 (else bf16 ops) */
  const tm_x12 *cq, *ck, *cv, *co;           /* the projections stored as x12 (then wq.. unused), or NULL */
} tm_attn_layer;

/* One MoE decoder layer for a decode step: softmax top-k routing, routed experts in checkpoint layout
 * (see decode_layers.c). */
typedef struct {
  tm_attn_layer attn;
  const uint16_t *ln1, *ln2;          /* input and post-attention RMSNorm weights [D] */
  float eps;                          /* their epsilon */
  const uint16_t *router;             /* [E, D] */
  const int64_t *gate, *up, *down;    /* [E] expert data pointers, checkpoint layout */
  int32_t E, K, I, act;
  int32_t norm_topk, weights_bf16;    /* renormalize the top-k weights; round them to bf16 */
  float routed_scale;                 /* routed_scaling_factor */
  const int64_t *cgate, *cup, *cdown; /* [E] tm_x12 pointers of the experts, or NULL (bf16) */
} tm_decode_layer;

/* abi.c */
TM_API int tm_abi_version(void);
/* sizeof the struct named `name` ("tm_x12", "tm_ffn_task", "tm_attn_layer", "tm_decode_layer"); -1 for
 * another name. */
TM_API int64_t tm_struct_size(const char *name);

/* amx.c */
TM_API int tm_amx_enable(int on);
TM_API int tm_amx_enabled(void);

/* x12.c */
TM_API void tm_x12_decode(const tm_x12 *c, int64_t r0, int64_t R, uint16_t *dst, int nthreads);
TM_API void tm_x12_table(const uint16_t *w, int64_t N, int64_t K, int64_t step, uint8_t *tab);
TM_API void tm_x12_encode(const uint16_t *w, int64_t N, int64_t K, const uint8_t *tab, uint8_t *lo, uint8_t *hc,
                          int32_t *cnt, int nthreads);
TM_API void tm_x12_exceptions(const uint16_t *w, int64_t N, int64_t K, const uint8_t *tab, const int32_t *xrow,
                              uint32_t *xval, int nthreads);

/* linear_norm.c */
TM_API int tm_linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                          int64_t ldw, const tm_x12 *c, void *y, int64_t ldy, int y_fp32, int nthreads);
TM_API void tm_rmsnorm_bf16(const uint16_t *x, int64_t M, int64_t D, const uint16_t *w, float eps, uint16_t *y,
                            int nthreads);

/* ffn.c */
TM_API int tm_ffn_tasks_bf16(const uint16_t *x, float *out, int64_t T, int64_t D, const tm_ffn_task *tasks,
                             int64_t ntasks, int act, int nthreads, float *scratch, uint16_t *h);

/* moe.c */
TM_API int tm_moe_bf16(const uint16_t *x, float *out, int64_t T, int64_t D, int64_t I, const int64_t *ids,
                       const float *w, int64_t K, int64_t E, const int64_t *gate, const int64_t *up,
                       const int64_t *down, const int64_t *cgate, const int64_t *cup, const int64_t *cdown, int act,
                       int nthreads, float *scratch, uint16_t *h);

/* attention.c */
TM_API int tm_attn_prefill_bf16(const uint16_t *q, int64_t sqb, int64_t sqh, int64_t sqt, const uint16_t *k,
                                const uint16_t *v, int64_t skb, int64_t skh, int64_t skt, uint16_t *out, int64_t B,
                                int64_t H, int64_t Hkv, int64_t T, int64_t hd, float scale, int nthreads);
TM_API int tm_attn_decode_bf16(const tm_attn_layer *a, const uint16_t *x, int64_t B, int64_t D, const void *cos,
                               const void *sin, uint16_t *kc, uint16_t *vc, int64_t N, int64_t bs,
                               const int64_t *table, int64_t M, const int64_t *pos, uint16_t *out, int nthreads,
                               uint16_t *ws, float *sc);

/* decode_layers.c */
TM_API int tm_decode_layers_bf16(const tm_decode_layer *layers, int64_t n, uint16_t *x, int64_t B, int64_t D,
                                 const void *cos, const void *sin, uint16_t *const *kc, uint16_t *const *vc,
                                 int64_t N, int64_t bs, const int64_t *table, int64_t M, const int64_t *pos,
                                 int nthreads, uint16_t *ws, float *sc, float *fs, uint16_t *h, int64_t *ids);

#endif
