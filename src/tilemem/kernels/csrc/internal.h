/* What the kernel files share besides the ABI (tilemem.h): the GEMM's packing constants, the AMX switch,
 * and the functions one file calls in another. Compiled with -fvisibility=hidden: none of this is
 * exported from the library. */
#ifndef TILEMEM_INTERNAL_H
#define TILEMEM_INTERNAL_H

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"
#include "tilemem.h"

/* Prefill GEMM (many tokens per weight row, compute-bound). The token rows of a group of up to GB
 * tokens are packed pairs-major, p[kp][j] = (x[j][2kp], x[j][2kp+1]), so one vector holds pair kp of
 * 16 (or 8) tokens. Each weight pair is broadcast from its row-major row and multiplied into those
 * tokens at once: 8 rows x up to 3 token vectors = 24 accumulators, no horizontal sums, and the
 * weights read in place (no packing). Up to GEMM_SPAN groups of a task go through one block of weight
 * rows while it is in cache, and each block's pass prefetches the next block into L2 (one line per
 * step): the hardware prefetcher alone leaves 20-30% of the time stalled on the 8 row streams. */
#define GB 48         /* tokens per group: up to three vectors of 16 */
#define GEMM_MIN 8    /* fewer tokens per task: the register-blocked dot products above */

#define GEMM_SPAN 8 /* groups packed at once: one pass over the weights each (bounds the pack buffer) */

/* Rows per GEMM block: 8 weight rows at the same column sit 4 KiB apart in one L1 set (8 ways); 12
 * rows thrash it (10-20% slower at D = 2048). */
#define GEMM_ROWS 8
#define GEMM_ROWS_MAX 32 /* with AMX (gemm_step) */

/* Groups a task's ntok tokens fall into: ceil(ntok / 8) eight-token units, at most GB / 8 per group. */
static inline int64_t task_groups(int64_t ntok) { return ((ntok + 7) / 8 + GB / 8 - 1) / (GB / 8); }

/* Eight-token units of group g of a task's ntok tokens: the units spread evenly over task_groups, so
 * at most 7 lanes of the whole task are padding; 0 past the last group. */
static inline int group_units(int64_t ntok, int g) {
  int v = (int)((ntok + 7) / 8), groups = (int)task_groups(ntok);
  return g < groups ? v / groups + (g < v % groups) : 0;
}

enum { ACT_SILU = 0, ACT_GELU = 1, ACT_RELU = 2 };

/* gemm.c */
int plan_groups(int64_t ntok, int *units, int64_t *first);
void pack_span(const uint16_t *base, int64_t ld, const int32_t *idx, const int64_t *first, int gb, int ge,
               int64_t K, uint32_t *pk);
void gemm_rows(const uint16_t *w, int64_t ld, int R, const uint32_t *p, int u, int64_t K, float *o,
               const uint16_t *pf);
void gu_pair(const uint16_t *g, const uint16_t *u, int64_t ld, int R, const uint16_t *x, int64_t K,
             float og[4][TB], float ou[4][TB]);

/* amx.c */
extern int use_amx;              /* set by tm_amx_enable */
extern __thread int amx_ready;   /* this thread's tiles are configured (amx_configure) */
void amx_configure(void);
void amx_release(void);
void gemm_rows_amx(const uint16_t *w, int64_t ld, int R, const uint32_t *p, int nb, int64_t K, float *o);

/* Weight rows per GEMM block: two AMX row blocks, or GEMM_ROWS. */
static inline int gemm_step(void) { return amx_ready ? GEMM_ROWS_MAX : GEMM_ROWS; }

/* x12.c */
void x12_rows(const tm_x12 *c, int64_t r0, int R, uint16_t *dst);
void gu_pair_x12(const tm_x12 *g, const tm_x12 *u, int64_t r0, int R, const uint16_t *x, float og[4][TB],
                 float ou[4][TB]);
void dot_1_x12(const tm_x12 *c, int64_t r0, int R, const uint16_t *x, float out[4][TB]);
void dot_n_x12(const tm_x12 *c, int64_t r0, int R, const uint16_t *const *x, int nt, float out[4][TB]);

/* Rows [r0, r0 + R) of a matrix, read in place (c NULL: bf16 at w, row stride *ld) or decoded into buf
 * (*ld becomes K). */
static inline const uint16_t *rows_of(const uint16_t *w, const tm_x12 *c, int64_t r0, int R, int64_t *ld,
                                      uint16_t *buf) {
  if (!c) return w + r0 * *ld;
  x12_rows(c, r0, R, buf);
  *ld = c->K;
  return buf;
}

/* linear_norm.c */
void linear_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t ldw,
                 const tm_x12 *c, int64_t n0, int64_t n1, void *y, int64_t ldy, int y_fp32, int *err);
void rmsnorm_row(const uint16_t *x, int64_t D, const uint16_t *w, float eps, uint16_t *y);

/* ffn.c */

/* What every thread of an FFN call needs to know about its tasks, made once per call: where each task's
 * activations start, its packed activations and GEMM work items (see ffn_tasks_body). */
typedef struct {
  int64_t *offs, *poff, *ioff, *nextp; /* [ntasks + 1] each */
  int any_t, any_c;                    /* a task with transposed down rows; one stored as x12 */
  int64_t kmax, gmax;                  /* the longest reduction; the most packed groups of a task */
  int64_t none[4];                     /* the arrays of a plan of no tasks (one that could not be made) */
} ffn_plan;
void ffn_plan_none(ffn_plan *fp, int64_t D);
int ffn_plan_make(const tm_ffn_task *tasks, int64_t ntasks, int64_t D, ffn_plan *fp);
void ffn_plan_free(ffn_plan *fp);
void ffn_tasks_body(const uint16_t *x, float *out, int64_t T, int64_t D, const tm_ffn_task *tasks, int64_t ntasks,
                    int act, const ffn_plan *fp, float *scratch, uint16_t *h, int *err);

/* moe.c */

/* A MoE layer's routed (token, expert) pairs grouped by expert into FFN tasks (checkpoint layout),
 * token order kept within an expert. */
typedef struct {
  tm_ffn_task *tasks;
  int64_t n;
  int32_t *tok;
  float *scale;
} moe_plan;


int moe_plan_make(int64_t T, int64_t D, int64_t I, const int64_t *ids, const float *w, int64_t K, int64_t E,
                  const int64_t *gate, const int64_t *up, const int64_t *down, const int64_t *cgate,
                  const int64_t *cup, const int64_t *cdown, moe_plan *p);
void moe_plan_free(moe_plan *p);

/* attention.c */
/* Whether B rows at positions pos[b] fit their block tables (table [B, M] of a pool of N blocks of bs
 * positions): 0 <= pos[b] < M * bs and every entry of blocks 0..pos[b] / bs in [0, N). */
int tables_ok(const int64_t *table, int64_t B, int64_t M, int64_t bs, int64_t N, const int64_t *pos);
void attn_decode_body(const tm_attn_layer *a, const uint16_t *x, int64_t B, int64_t D, const void *cos,
                      const void *sin, uint16_t *kc, uint16_t *vc, int64_t bs, const int64_t *table, int64_t M,
                      const int64_t *pos, uint16_t *out, uint16_t *ws, float *sc, int *err);

/* Records that this thread could not get memory: the call's status becomes TM_ENOMEM (err: the call's
 * status, shared by its threads). */
static inline void set_failed(int *err) {
#pragma omp atomic write
  *err = TM_ENOMEM;
}

#endif
