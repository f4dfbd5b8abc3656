/* A MoE layer's routed experts in checkpoint layout: the (token, expert) pairs grouped by expert into FFN
 * tasks, then run as one FFN call. */
#include "internal.h"

/* ids/w [T, K]; gate/up/down: per-expert data pointers ([I, D], [I, D], [D, I]); cgate/cup/cdown: per-expert
 * tm_x12 pointers of the same matrices, or NULL (bf16). Free with moe_plan_free, also on TM_ENOMEM (then
 * p has no tasks). */
int moe_plan_make(int64_t T, int64_t D, int64_t I, const int64_t *ids, const float *w, int64_t K, int64_t E,
                  const int64_t *gate, const int64_t *up, const int64_t *down, const int64_t *cgate,
                  const int64_t *cup, const int64_t *cdown, moe_plan *p) {
  const int64_t pairs = T * K, most = T * K < E ? T * K : E;
  *p = (moe_plan){(tm_ffn_task *)malloc(sizeof(tm_ffn_task) * most), 0, (int32_t *)malloc(sizeof(int32_t) * pairs),
                  (float *)malloc(sizeof(float) * pairs)};
  int32_t *count = (int32_t *)calloc(E + 1, sizeof(int32_t));
  int32_t *fill = (int32_t *)malloc(sizeof(int32_t) * E);
  if ((most && !p->tasks) || (pairs && (!p->tok || !p->scale)) || !count || (E && !fill)) {
    free(fill);
    free(count);
    return TM_ENOMEM;
  }
  for (int64_t q = 0; q < T * K; q++) count[ids[q] + 1]++;
  for (int64_t e = 0; e < E; e++) count[e + 1] += count[e]; /* exclusive prefix: start of expert e */
  memcpy(fill, count, sizeof(int32_t) * E);
  for (int64_t q = 0; q < T * K; q++) {
    int64_t e = ids[q];
    p->tok[fill[e]] = (int32_t)(q / K);
    p->scale[fill[e]++] = w[q];
  }
  for (int64_t e = 0; e < E; e++) {
    int32_t c = count[e + 1] - count[e];
    if (!c) continue;
    tm_ffn_task tk = {(const uint16_t *)gate[e], (const uint16_t *)up[e], (const uint16_t *)down[e], I, D, I, 0, c,
                      p->tok + count[e], p->scale + count[e], cgate ? (const tm_x12 *)cgate[e] : NULL,
                      cup ? (const tm_x12 *)cup[e] : NULL, cdown ? (const tm_x12 *)cdown[e] : NULL};
    p->tasks[p->n++] = tk;
  }
  free(fill);
  free(count);
  return TM_OK;
}

void moe_plan_free(moe_plan *p) {
  free(p->tasks);
  free(p->tok);
  free(p->scale);
  *p = (moe_plan){NULL, 0, NULL, NULL};
}

/* Routed experts of one MoE layer, checkpoint layout: group tokens by expert, then run the tasks.
 * ids/w [T, K]; gate/up/down, cgate/cup/cdown: as in moe_plan_make. */
int tm_moe_bf16(const uint16_t *x, float *out, int64_t T, int64_t D, int64_t I, const int64_t *ids, const float *w,
                int64_t K, int64_t E, const int64_t *gate, const int64_t *up, const int64_t *down,
                const int64_t *cgate, const int64_t *cup, const int64_t *cdown, int act, int nthreads, float *scratch,
                uint16_t *h) {
  moe_plan p;
  int err = moe_plan_make(T, D, I, ids, w, K, E, gate, up, down, cgate, cup, cdown, &p);
  if (err == TM_OK) err = tm_ffn_tasks_bf16(x, out, T, D, p.tasks, p.n, act, nthreads, scratch, h);
  moe_plan_free(&p);
  return err;
}
