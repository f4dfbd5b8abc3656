/* A decode step's run of MoE decoder layers (attention, softmax top-k routing, routed experts) in one
 * parallel region. */
#include "internal.h"

/* Softmax router of one row: bf16 logits [E] -> the K largest probabilities, largest first (ties: lower
 * expert first), as the torch router computes them (fp32 softmax, optional renormalization and scale,
 * optional rounding to bf16). */
static void route_row(const tm_decode_layer *L, const uint16_t *logits, int64_t *ids, float *w) {
  float mx = -INFINITY, sum = 0.f;
  for (int e = 0; e < L->E; e++) mx = bf2f(logits[e]) > mx ? bf2f(logits[e]) : mx;
  for (int e = 0; e < L->E; e++) sum += expf(bf2f(logits[e]) - mx);
  float picked = 0.f;
  for (int k = 0; k < L->K; k++) {
    int best = -1;
    for (int e = 0; e < L->E; e++) {
      int taken = 0;
      for (int j = 0; j < k; j++) taken |= ids[j] == e;
      if (!taken && (best < 0 || bf2f(logits[e]) > bf2f(logits[best]))) best = e;
    }
    ids[k] = best;
    w[k] = expf(bf2f(logits[best]) - mx) / sum;
    picked += w[k];
  }
  for (int k = 0; k < L->K; k++) {
    if (L->norm_topk) w[k] /= picked;
    if (L->routed_scale != 1.f) w[k] *= L->routed_scale;
    if (L->weights_bf16) w[k] = bf2f(f2bf(w[k]));
  }
}

/* x [B, D] bf16, the residual stream, updated in place by one decoder layer for one new token per row:
 * x += attn(rmsnorm(x)), then x += moe(rmsnorm(x)), with the torch modules' roundings (bf16 residual
 * adds, the routed sum rounded to bf16 first). Run by every thread of the enclosing parallel region;
 * x is complete after the next barrier. Scratch as in tm_decode_layers_bf16; plan, fplan: shared by the
 * threads; err: as in ffn_tasks_body (the layers after a failure still run, on whatever they read, and
 * the call fails). */
static void decode_layer_body(const tm_decode_layer *Ly, uint16_t *x, int64_t B, int64_t D, const void *cos,
                              const void *sin, uint16_t *kc, uint16_t *vc, int64_t bs, const int64_t *table,
                              int64_t M, const int64_t *pos, uint16_t *ws, float *sc, float *fs, uint16_t *h,
                              int64_t *ids, moe_plan *plan, ffn_plan *fplan, int *err) {
  const int64_t E = Ly->E, K = Ly->K;
  uint16_t *xn = ws, *ao = ws + B * D, *logits = ws + 2 * B * D, *aws = logits + B * E; /* normed, attn out */
  float *mo = fs, *w = fs + B * D; /* routed sum [B, D], routing weights [B, K] */
  int nt = omp_get_num_threads(), t = omp_get_thread_num();
#pragma omp for
  for (int64_t b = 0; b < B; b++) rmsnorm_row(x + b * D, D, Ly->ln1, Ly->eps, xn + b * D);
  attn_decode_body(&Ly->attn, xn, B, D, cos, sin, kc, vc, bs, table, M, pos, ao, aws, sc, err);
#pragma omp barrier
#pragma omp for
  for (int64_t b = 0; b < B; b++) {
    for (int64_t d = 0; d < D; d++) x[b * D + d] = f2bf(bf2f(x[b * D + d]) + bf2f(ao[b * D + d]));
    rmsnorm_row(x + b * D, D, Ly->ln2, Ly->eps, xn + b * D);
  }
  int64_t r0, r1;
  split(E, nt, t, 4, &r0, &r1);
  linear_rows(xn, B, D, D, Ly->router, D, NULL, r0, r1, logits, E, 0, err);
#pragma omp barrier
#pragma omp single
  {
    for (int64_t b = 0; b < B; b++) route_row(Ly, logits + b * E, ids + b * K, w + b * K);
    memset(mo, 0, sizeof(float) * B * D);
    /* without memory for the plans: no experts this layer (and the call fails) */
    if (moe_plan_make(B, D, Ly->I, ids, w, K, E, Ly->gate, Ly->up, Ly->down, Ly->cgate, Ly->cup, Ly->cdown, plan)) {
      set_failed(err);
      moe_plan_free(plan);
      ffn_plan_none(fplan, D);
    } else if (ffn_plan_make(plan->tasks, plan->n, D, fplan)) {
      set_failed(err);
      moe_plan_free(plan);
    }
  }
  ffn_tasks_body(xn, mo, B, D, plan->tasks, plan->n, Ly->act, fplan, NULL, h, err);
#pragma omp barrier
#pragma omp for
  for (int64_t b = 0; b < B; b++)
    for (int64_t d = 0; d < D; d++) x[b * D + d] = f2bf(bf2f(x[b * D + d]) + bf2f(f2bf(mo[b * D + d])));
#pragma omp single
  {
    moe_plan_free(plan);
    ffn_plan_free(fplan);
  }
}

/* n consecutive MoE decoder layers for one new token per row, in one parallel region: x [B, D] bf16, the
 * residual stream, is updated in place (see decode_layer_body). kc[l]/vc[l]: layer l's cache (each a pool
 * of N blocks), the other attention arguments as in tm_attn_decode_bf16 (TM_EINVAL, nothing done, where
 * the block tables do not fit the pools). Scratch, sized for the largest layer: ws bf16 of
 * B * (2*D + E + 2*H*hd + 2*Hkv*hd) elements; sc fp32 of nthreads * M * bs; fs fp32 of B * (D + K); h bf16 of
 * B * K * I. ids [n, B, K]: each layer's routed experts. */
int tm_decode_layers_bf16(const tm_decode_layer *layers, int64_t n, uint16_t *x, int64_t B, int64_t D,
                          const void *cos, const void *sin, uint16_t *const *kc, uint16_t *const *vc, int64_t N,
                          int64_t bs, const int64_t *table, int64_t M, const int64_t *pos, int nthreads, uint16_t *ws,
                          float *sc, float *fs, uint16_t *h, int64_t *ids) {
  if (!tables_ok(table, B, M, bs, N, pos)) return TM_EINVAL;
  moe_plan plan;
  ffn_plan fplan;
  int err = TM_OK;
#pragma omp parallel num_threads(nthreads)
  for (int64_t l = 0; l < n; l++) {
    decode_layer_body(&layers[l], x, B, D, cos, sin, kc[l], vc[l], bs, table, M, pos, ws, sc, fs, h,
                      ids + l * B * layers[l].K, &plan, &fplan, &err);
  }
  return err;
}
