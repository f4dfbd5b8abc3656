/* Portable FP8 kernels (AVX2 + FMA + F16C): float8 e4m3 weights with fp32 scales per 128x128 block.
 *
 * A weight matrix W [R, C] is stored as e4m3 bytes `w` (row stride `ldw` >= C bytes) and fp32 scales
 * `scale` [ceil(R/128), ceil(C/128)] (row stride `lds`): W[i, j] = e4m3(w[i, j]) * scale[i/128, j/128].
 * NaN bytes (0x7F, 0xFF) decode to a finite value (480); checkpoints hold none.
 *
 * Built apart from the main (AVX512) library so it runs on every x86-64 CPU with AVX2 + FMA + F16C.
 * Every function runs its OpenMP loops on `nthreads` threads and returns a tmp_status; with an empty
 * shape (N, R or C zero) the matmuls return at once and leave y as it was.
 */
#ifndef TILEMEM_FP8_H
#define TILEMEM_FP8_H

#include <stdint.h>

#define TMP_API __attribute__((visibility("default")))

enum tmp_status { TMP_OK = 0, TMP_ENOMEM = 1, TMP_EINVAL = 2, TMP_EUNSUPPORTED = 3 };

/* out[i, j] = W[r0 + i, j] for i < nrows, j < C (out: fp32, row stride ldo). */
TMP_API int tmp_fp8_dequantize(const uint8_t *w, int64_t ldw, const float *scale, int64_t lds, int64_t r0,
                               int64_t nrows, int64_t C, float *out, int64_t ldo, int nthreads);

/* y [N, R] = x [N, C] @ W^T (x, y: fp32, row strides ldx, ldy). Streams W once per 8 tokens. */
TMP_API int tmp_fp8_matmul_nt(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                              int64_t C, const float *scale, int64_t lds, float *y, int64_t ldy, int nthreads);

/* y [N, C] = x [N, R] @ W (x, y: fp32, row strides ldx, ldy). Threads own column ranges of y. */
TMP_API int tmp_fp8_matmul_nn(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                              int64_t C, const float *scale, int64_t lds, float *y, int64_t ldy, int nthreads);

/* The 1-token AVX512-BF16 path of the fp8 matmuls and FFNs (fp8_avx512.c): set < 0 asks, 0 turns it off,
 * 1 on where the CPU has avx512bf16 (the default, unless TILEMEM_FP8_BF16=0); returns whether it is on. */
TMP_API int tmp_fp8_bf16_path(int set);

/* Within that path, rows of bf16-valued x decode e4m3 by byte tables (AVX512-VBMI) instead of integer ops: set < 0
 * asks, 0 off, 1 on where the CPU has avx512vbmi (the default, unless TILEMEM_FP8_LUT=0); returns whether it is on. */
TMP_API int tmp_fp8_lut_path(int set);

/* y [N, R] = x [N, C] @ W^T (x, y: fp32) with exact products on AVX512-BF16 CPUs (fp8_gemm.c), for prefill:
 * VDPBF16PS where every value of x is a bf16 number, else (with fp32_x) fp32 FMAs. TMP_EUNSUPPORTED, nothing
 * written, where the AVX512-BF16 path is off (tmp_fp8_bf16_path), or x is not bf16-valued and fp32_x is 0. */
TMP_API int tmp_fp8_gemm_nt(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                            int64_t C, const float *scale, int64_t lds, float *y, int64_t ldy, int fp32_x,
                            int nthreads);

/* ---- fused gated FFNs (fp8_ffn.c) ---- */

enum tmp_act { TMP_ACT_SILU = 0, TMP_ACT_GELU = 1, TMP_ACT_RELU = 2 }; /* torch's F.silu, F.gelu (erf), F.relu */

/* One fp8 matrix W [R, C]: W[i, j] = e4m3(w[i * ldw + j]) * scale[(i / 128) * lds + j / 128]. */
typedef struct {
    const uint8_t *w;
    int64_t ldw;
    const float *scale;
    int64_t lds;
} tmp_fp8_matrix;

/* One expert (or tile of one) and its tokens: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for
 * x = x[tok[j]], j < ntok. Every field is 64 bits wide (the Python side packs tasks as int64 arrays). */
typedef struct {
    tmp_fp8_matrix gate, up; /* [n, D] */
    tmp_fp8_matrix down;     /* down_t = 0: [D, n] (checkpoint down_proj); 1: [n, D] (a tile's down^T rows) */
    int64_t n;               /* neurons (rows of gate and up) */
    int64_t down_t;
    int64_t ntok;
    const int32_t *tok;      /* [ntok] rows of x and out, in [0, T) */
    const float *weight;     /* [ntok] routing weights */
} tmp_fp8_ffn_task;

/* out [T, D] += every task's FFN (x, out: fp32, row strides ldx, ldo); act: a tmp_act. One parallel region:
 * threads split each task's neurons (gate, up, and a transposed down into per-thread partial sums), then
 * the checkpoint-layout downs by output rows. Streams the weights once per 8 tokens of a task.
 * bf16_h: the hidden activations h = act(gate x) * (up x) (gate, up: fp32 sums) are rounded to bf16 (to nearest
 * even) before the down, as a bf16 model's kernels (csrc/ffn.c) round them; 0: h stays fp32 (an fp32 model).
 * TMP_EINVAL (nothing written) for an unknown act or a token outside [0, T). */
TMP_API int tmp_fp8_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                              const tmp_fp8_ffn_task *tasks, int64_t ntasks, int act, int bf16_h, int nthreads);

/* tmp_fp8_ffn_tasks for prefill-sized tasks by the AVX512-BF16 GEMM (fp8_gemm.c): the same sums, exact products
 * (bf16-valued x and, with bf16_h, the bf16 hidden activations by VDPBF16PS; other x and fp32 hidden activations
 * by fp32 FMAs), checkpoint-layout downs only. TMP_EINVAL (nothing written) for an unknown act, a token outside
 * [0, T) or a down_t task; TMP_EUNSUPPORTED where the path is off. */
TMP_API int tmp_fp8_ffn_gemm(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                             const tmp_fp8_ffn_task *tasks, int64_t ntasks, int act, int bf16_h, int nthreads);

/* sizeof(tmp_fp8_ffn_task), for the Python side's check. */
TMP_API int64_t tmp_fp8_ffn_task_size(void);

/* ---- bf16 weights, decode-sized (bf16.c) ---- */

/* y [M, R] = x [M, C] @ W^T, W bf16 [R, C] (row stride ldw); x, y fp32 (row strides ldx, ldy). Threads split rows. */
TMP_API int tmp_bf16_matmul_nt(const uint16_t *w, int64_t ldw, int64_t R, int64_t C, const float *x, int64_t ldx,
                               int64_t M, float *y, int64_t ldy, int nthreads);

/* y [M, C] = x [M, R] @ W, W bf16 [R, C] (row stride ldw); x, y fp32. Threads split columns. */
TMP_API int tmp_bf16_matmul_nn(const uint16_t *w, int64_t ldw, int64_t R, int64_t C, const float *x, int64_t ldx,
                               int64_t M, float *y, int64_t ldy, int nthreads);

#endif
