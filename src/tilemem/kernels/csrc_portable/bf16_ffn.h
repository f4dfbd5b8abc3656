/* Fused gated FFNs on bf16 weights (bf16_ffn.c): a MoE layer's routed experts in one call, on AVX2 + FMA.
 * Part of the portable library's interface (the status and activation codes are fp8.h's). */
#ifndef TILEMEM_BF16_FFN_H
#define TILEMEM_BF16_FFN_H

#include <stdint.h>

#include "fp8.h"

/* One expert and its tokens: out[tok[j]] += weight[j] * down(act(gate x) * (up x)) for x = x[tok[j]], j < ntok.
 * gate and up bf16 [n, D] (row strides ldg, ldu), down bf16 [D, n] (row stride ldd): a checkpoint's layout.
 * Every field is 64 bits wide (the Python side packs tasks as int64 arrays). */
typedef struct {
    const uint16_t *gate;
    int64_t ldg;
    const uint16_t *up;
    int64_t ldu;
    const uint16_t *down;
    int64_t ldd;
    int64_t n;           /* neurons (rows of gate and up, columns of down) */
    int64_t ntok;
    const int32_t *tok;  /* [ntok] rows of x and out, in [0, T) */
    const float *weight; /* [ntok] routing weights */
} tmp_bf16_ffn_task;

/* out [T, D] += every task's FFN (x, out: fp32, row strides ldx, ldo); act: a tmp_act. One parallel region: threads
 * split each task's neurons (gate and up), then after a barrier the downs by output rows. Streams the weights once
 * per 8 tokens of a task. TMP_EINVAL (nothing written) for an unknown act, a stride below its row, or a token
 * outside [0, T). */
TMP_API int tmp_bf16_ffn_tasks(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                               const tmp_bf16_ffn_task *tasks, int64_t ntasks, int act, int nthreads);

/* sizeof(tmp_bf16_ffn_task), for the Python side's check. */
TMP_API int64_t tmp_bf16_ffn_task_size(void);

#endif
