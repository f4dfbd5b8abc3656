/* Dense linear y[M, N] = x[M, K] @ w[N, K]^T for a few rows (rows of w split across threads, bf16 or x12),
 * and RMSNorm. */
#include "dot.h"
#include "internal.h"

/* Rows [n0, n1) of y = x @ w^T: 4-row blocks outer, so a block stays in L1 for every token block. c: w as
 * x12 (then w is not read), or NULL. Without memory for its decoded rows, it computes nothing and sets *err
 * (see set_failed). */
void linear_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t ldw,
                 const tm_x12 *c, int64_t n0, int64_t n1, void *y, int64_t ldy, int y_fp32, int *err) {
  float res[4][TB];
  uint16_t *buf = c && M > TB ? (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (4 * K + 64)) : NULL;
  if (c && M > TB && !buf) {
    set_failed(err);
    return;
  }
  for (int64_t n = n0; n < n1; n += 4) {
    int R = n1 - n < 4 ? (int)(n1 - n) : 4;
    int64_t ld = ldw;
    const uint16_t *wr = c && M <= TB ? NULL : rows_of(w, c, n, R, &ld, buf); /* few rows: decoded in registers */
    for (int64_t m0 = 0; m0 < M; m0 += TB) {
      int mt = M - m0 < TB ? (int)(M - m0) : TB;
      const uint16_t *xs[TB];
      for (int j = 0; j < mt; j++) xs[j] = x + (m0 + j) * ldx;
      if (!wr && mt == 1)
        dot_1_x12(c, n, R, xs[0], res);
      else if (!wr)
        dot_n_x12(c, n, R, xs, mt, res);
      else
        dot_rows(wr, ld, R, xs, mt, K, res, M >= 2 * TB);
      for (int j = 0; j < mt; j++)
        for (int r = 0; r < R; r++) {
          if (y_fp32)
            ((float *)y)[(m0 + j) * ldy + n + r] = res[r][j];
          else
            ((uint16_t *)y)[(m0 + j) * ldy + n + r] = f2bf(res[r][j]);
        }
    }
  }
  free(buf);
}

/* y [M, N] = x [M, K] @ w^T, w [N, K] at row stride ldw or, with c, stored as x12 (w unused). */
int tm_linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                   int64_t ldw, const tm_x12 *c, void *y, int64_t ldy, int y_fp32, int nthreads) {
  int err = TM_OK;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t n0, n1;
    split(N, omp_get_num_threads(), omp_get_thread_num(), 4, &n0, &n1);
    linear_rows(x, M, K, ldx, w, ldw, c, n0, n1, y, ldy, y_fp32, &err);
  }
  return err;
}

/* RMSNorm of one row x [D] into y (y may be x): bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), the same
 * roundings as the torch module (fp32 statistics, cast back, then the weight product in the model dtype). */
void rmsnorm_row(const uint16_t *x, int64_t D, const uint16_t *w, float eps, uint16_t *y) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 v = ld16f(x + d);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  float ss = _mm512_reduce_add_ps(acc);
  for (; d < D; d++) ss += bf2f(x[d]) * bf2f(x[d]);
  float r = 1.f / sqrtf(ss / (float)D + eps);
  for (d = 0; d < D; d++) y[d] = f2bf(bf2f(w[d]) * bf2f(f2bf(bf2f(x[d]) * r)));
}

void tm_rmsnorm_bf16(const uint16_t *x, int64_t M, int64_t D, const uint16_t *w, float eps, uint16_t *y,
                     int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * D >= 65536)
  for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * D, D, w, eps, y + m * D);
}
