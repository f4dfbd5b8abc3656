/* Portable kernels for llama.cpp's (ggml's) quantized blocks, on AVX2 + FMA + F16C (+ OpenMP).
 *
 * Types (ggml's type ids): Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 (32 weights a block),
 * Q4_K = 12, Q5_K = 13, Q6_K = 14 (256 weights a super-block); block layouts exactly as ggml stores them.
 * A matrix W [R, C] is R rows of C / block_weights blocks each, row i at w + i * ldw.
 *
 * Two ways to multiply:
 *   exact: each weight decoded to the fp32 value ggml's dequantize gives (bit for bit: the same fp32
 *          products and sums, never fused), FMAs with the fp32 activations;
 *   fast:  llama.cpp's way: activations quantized to int8 per block of 32 (Q8_0-like) or 256 with sums per
 *          16 (Q8_K-like), integer dot products (maddubs / madd), fp32 scaling per block.
 * Built apart from the main (AVX512) library; every function runs its OpenMP loops on `nthreads` threads and
 * returns a tmg_status.
 */
#ifndef TILEMEM_GGML_QUANT_H
#define TILEMEM_GGML_QUANT_H

#include <stdint.h>

#define TMG_API __attribute__((visibility("default")))

enum tmg_status { TMG_OK = 0, TMG_ENOMEM = 1, TMG_EINVAL = 2 };

/* Bytes of one block of `type` (0 for a type this library does not know). */
TMG_API int64_t tmg_block_bytes(int type);

/* Weights of one block of `type` (0 for a type this library does not know). */
TMG_API int64_t tmg_block_weights(int type);

/* out[i, j] = W[r0 + i, j] for i < nrows, j < C (out: fp32, row stride ldo), as gguf.quants.dequantize. */
TMG_API int tmg_dequantize(int type, const uint8_t *w, int64_t ldw, int64_t r0, int64_t nrows, int64_t C, float *out,
                           int64_t ldo, int nthreads);

/* y [N, R] = x [N, C] @ W^T (x, y: fp32, row strides ldx, ldy); exact or fast (see above). Threads own row
 * ranges of W, streamed once per 8 tokens. */
TMG_API int tmg_matmul_nt(int type, int exact, const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw,
                          int64_t R, int64_t C, float *y, int64_t ldy, int nthreads);

/* y [N, R] = x [N, C] @ W^T in fp32 for prefill-sized N (ggml_quant_gemm.c): W's rows dequantized a panel at a time
 * (tmg_dequantize's values) into a per-thread buffer, register-blocked FMAs with x transposed by 16 tokens. Exact
 * (fp32 sums in another order than tmg_matmul_nt's). Threads own panels of rows. */
TMG_API int tmg_matmul_dq(int type, const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                          int64_t C, float *y, int64_t ldy, int nthreads);

/* y [N, R] = x [N, C] @ W^T for prefill-sized N on Q4_K, Q5_K, Q6_K, Q8_0 weights, the fast way
 * (ggml_quant_gemm_q8.c): x quantized as tmg_matmul_nt's fast path quantizes it, W's rows decoded 8 at a time into
 * a per-thread buffer interleaved by 4 weights, 8-bit products summed in int16 across a sub-block before its
 * scale's one multiply (Q8_0: in int32 per vector, by AVX512-VNNI where the CPU has it). The same results as the
 * fast path up to the order of fp32 sums. TMG_EINVAL for another type. */
TMG_API int tmg_matmul_q8(int type, const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                          int64_t C, float *y, int64_t ldy, int nthreads);

/* ---- fused gated FFNs (ggml_quant_ffn.c) ---- */

enum tmg_act { TMG_ACT_SILU = 0, TMG_ACT_GELU = 1, TMG_ACT_RELU = 2 }; /* torch's F.silu, F.gelu (erf), F.relu */

/* One quantized matrix: rows at w + i * ldw, of `type`. */
typedef struct {
    const uint8_t *w;
    int64_t ldw;
    int64_t type;
} tmg_matrix;

/* One expert and its tokens: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for x = x[tok[j]], j < ntok.
 * gate, up: [n, D]; down: [D, n]. Every field is 64 bits wide (the Python side packs tasks as int64 arrays). */
typedef struct {
    tmg_matrix gate, up, down;
    int64_t n;
    int64_t ntok;
    const int32_t *tok;  /* [ntok] rows of x and out, in [0, T) */
    const float *weight; /* [ntok] routing weights */
} tmg_ffn_task;

/* out [T, D] += every task's FFN (x, out: fp32, row strides ldx, ldo); act: a tmg_act; exact or fast as the
 * matmul. Phase 1: threads split each task's neurons (gate, up, activation into h); phase 2: they split
 * the downs' output rows. TMG_EINVAL (nothing written) for an unknown act or type or a token outside [0, T). */
TMG_API int tmg_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                          const tmg_ffn_task *tasks, int64_t ntasks, int act, int exact, int nthreads);

/* sizeof(tmg_ffn_task), for the Python side's check. */
TMG_API int64_t tmg_ffn_task_size(void);

#endif
