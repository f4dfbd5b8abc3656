/* Register-blocked dot products of a few tokens against weight rows (decode-sized work: linear, FFN
 * tasks of few tokens, decode attention's scores), inline in every file that takes them. */
#ifndef TILEMEM_DOT_H
#define TILEMEM_DOT_H

#include "simd.h"

/* out[r][j] = dot(w + r*ld, x[j]) over K, for R rows (R <= 4) and nt tokens (nt <= TB).
 * Rows are read one after another, each in one sequential pass (the hardware prefetcher streams
 * it; interleaving rows that sit 4 KiB apart stalls it at every page), with U independent
 * accumulators per token along K to hide the dot-product latency. */
static inline void dot_block(const uint16_t *w, int64_t ld, int R, const uint16_t *const *x, int nt, int U,
                             int64_t K, float out[4][TB]) {
  for (int r = 0; r < R; r++) {
    const uint16_t *wr = w + r * ld;
    __m512 acc[TB][4];
    for (int j = 0; j < TB; j++)
      for (int u = 0; u < 4; u++) acc[j][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; u++) {
        __m512bh wv = ld32(wr + k + 32 * u, 32);
        for (int j = 0; j < nt; j++) acc[j][u] = _mm512_dpbf16_ps(acc[j][u], wv, ld32(x[j] + k + 32 * u, 32));
      }
    for (; k < K; k += 32) {
      __m512bh wv = ld32(wr + k, K - k);
      for (int j = 0; j < nt; j++) acc[j][0] = _mm512_dpbf16_ps(acc[j][0], wv, ld32(x[j] + k, K - k));
    }
    for (int j = 0; j < nt; j++) {
      __m512 s = acc[j][0];
      for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[j][u]);
      out[r][j] = _mm512_reduce_add_ps(s);
    }
  }
}

/* Specialize per token count so the compiler fully unrolls the register block. */
#define DOT_SPEC(NT_, U_)                                                                                    \
  static inline void dot_##NT_(const uint16_t *w, int64_t ld, int R, const uint16_t *const *x, int64_t K,    \
                               float out[4][TB]) {                                                           \
    dot_block(w, ld, R, x, NT_, U_, K, out);                                                                 \
  }
DOT_SPEC(1, 4)
DOT_SPEC(2, 2)
DOT_SPEC(3, 2)
DOT_SPEC(4, 2)

/* Many tokens per row (prefill, compute-bound): 4 rows x 4 tokens interleaved, so each vector
 * loaded feeds 4 dot products (loads are the limit there, not bandwidth). K a multiple of 32. */
static inline void dot_quads_4(const uint16_t *w, int64_t ld, const uint16_t *const *x, int64_t K, float out[4][TB]) {
  __m512 a[4][TB];
  for (int r = 0; r < 4; r++)
    for (int j = 0; j < TB; j++) a[r][j] = _mm512_setzero_ps();
  const uint16_t *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
  for (int64_t k = 0; k + 32 <= K; k += 32) {
    __m512bh v0 = ld32(w0 + k, 32), v1 = ld32(w1 + k, 32), v2 = ld32(w2 + k, 32), v3 = ld32(w3 + k, 32);
    for (int j = 0; j < TB; j++) {
      __m512bh xv = ld32(x[j] + k, 32);
      a[0][j] = _mm512_dpbf16_ps(a[0][j], v0, xv);
      a[1][j] = _mm512_dpbf16_ps(a[1][j], v1, xv);
      a[2][j] = _mm512_dpbf16_ps(a[2][j], v2, xv);
      a[3][j] = _mm512_dpbf16_ps(a[3][j], v3, xv);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int j = 0; j < TB; j++) out[r][j] = _mm512_reduce_add_ps(a[r][j]);
}

static inline void dot_rows(const uint16_t *w, int64_t ld, int R, const uint16_t *const *x, int nt, int64_t K,
                            float out[4][TB], int wide) {
  if (wide && nt == TB && R == 4 && K % 32 == 0) {
    dot_quads_4(w, ld, x, K, out);
    return;
  }
  switch (nt) {
    case 1: dot_1(w, ld, R, x, K, out); return;
    case 2: dot_2(w, ld, R, x, K, out); return;
    case 3: dot_3(w, ld, R, x, K, out); return;
    default: dot_4(w, ld, R, x, K, out); return;
  }
}


#endif
