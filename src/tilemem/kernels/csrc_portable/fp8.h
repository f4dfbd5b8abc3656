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

enum tmp_status { TMP_OK = 0, TMP_ENOMEM = 1 };

/* out[i, j] = W[r0 + i, j] for i < nrows, j < C (out: fp32, row stride ldo). */
TMP_API int tmp_fp8_dequantize(const uint8_t *w, int64_t ldw, const float *scale, int64_t lds, int64_t r0,
                               int64_t nrows, int64_t C, float *out, int64_t ldo, int nthreads);

/* y [N, R] = x [N, C] @ W^T (x, y: fp32, row strides ldx, ldy). Streams W once per 8 tokens. */
TMP_API int tmp_fp8_matmul_nt(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                              int64_t C, const float *scale, int64_t lds, float *y, int64_t ldy, int nthreads);

/* y [N, C] = x [N, R] @ W (x, y: fp32, row strides ldx, ldy). Threads own column ranges of y. */
TMP_API int tmp_fp8_matmul_nn(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                              int64_t C, const float *scale, int64_t lds, float *y, int64_t ldy, int nthreads);

#endif
