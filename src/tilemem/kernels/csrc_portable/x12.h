/* Portable x12 tile kernels (AVX2 + FMA): a bf16 tile W [R, D] (R = 3n: gate rows, up rows, down^T rows) as
 * one x12 payload of ~12 bits per weight, losslessly, and a fused gated FFN on such payloads.
 *
 * The payload layout is the one of docs in `layers/x12.py` (the torch reference) and of the AVX512 library's
 * x12 chunk order (csrc/x12.c): lo uint8 [R, KP], hc uint8 [R, KP/2], then at A = align16(R*KP*3/2) tab
 * uint8 [64], xrow int32 [R+1], xval int32 [cap]; KP = D rounded up to 64, cap = max(64, R*D/512).
 * D must be a multiple of 32 below 65536. Statuses: tmp_status, and TMP_X12_OVERFLOW below.
 */
#ifndef TILEMEM_X12_H
#define TILEMEM_X12_H

#include <stdint.h>

#include "fp8.h"

#define TMP_X12_OVERFLOW 3 /* more exceptions than the payload's capacity: store the tile as bf16 */

/* Bytes of the payload of a [R, D] matrix; -1 when D is not a multiple of 32 in (0, 65536) or R < 0. */
TMP_API int64_t tmp_x12_payload_bytes(int64_t R, int64_t D);

/* The payload (payload_bytes(R, D) bytes) of w bf16 [R, D] (row stride ldw). *nexc: the exceptions counted
 * (also on overflow, when the payload is left incomplete). TMP_EINVAL for a bad shape. */
TMP_API int tmp_x12_encode(const uint16_t *w, int64_t ldw, int64_t R, int64_t D, uint8_t *payload, int64_t *nexc,
                           int nthreads);

/* Rows [r0, r0 + nrows) of a payload of a [R, D] matrix, bit for bit, into dst bf16 (row stride ldd >= D).
 * TMP_EINVAL for a bad shape or range, or exception entries out of place (a corrupt payload). */
TMP_API int tmp_x12_decode(const uint8_t *payload, int64_t R, int64_t D, int64_t r0, int64_t nrows, uint16_t *dst,
                           int64_t ldd, int nthreads);

/* One x12 tile and its tokens: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for x = x[tok[j]],
 * j < ntok; the tile's payload holds W [3n, D] (gate rows, up rows, down^T rows). 64-bit fields (the Python
 * side packs tasks as int64 arrays). */
typedef struct {
    const uint8_t *payload;
    int64_t n;           /* neurons */
    int64_t ntok;
    const int32_t *tok;  /* [ntok] rows of x and out, in [0, T) */
    const float *weight; /* [ntok] routing weights */
} tmp_x12_ffn_task;

/* out [T, D] += every task's FFN (x, out fp32, row strides ldx, ldo); act: a tmp_act. Threads split each
 * task's neurons; the weights are decoded in registers (exceptions patched in) and streamed once per 8 tokens.
 * TMP_EINVAL (nothing written) for an unknown act, a bad D or a token outside [0, T). */
TMP_API int tmp_x12_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                              const tmp_x12_ffn_task *tasks, int64_t ntasks, int act, int nthreads);

/* sizeof(tmp_x12_ffn_task), for the Python side's check. */
TMP_API int64_t tmp_x12_ffn_task_size(void);

#endif
