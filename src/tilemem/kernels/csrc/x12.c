/* x12: lossless 12-bit storage of bf16 weight matrices. A weight's low byte (7 mantissa bits and the
 * exponent's lowest bit) is kept as is; its high byte (sign and the exponent's upper 7 bits) as a 4-bit
 * code into the matrix's 16 most common high bytes: trained and random weights alike use few exponents,
 * and the 16 most common high bytes cover >99.9% of the weights. The rare others are exceptions, stored
 * whole and written over the decoded rows. A memory-bound pass over the weights reads 12 bits per weight
 * instead of 16, and every decoded row is the original, bit for bit.
 *
 * Layout: rows of KP = K rounded up to 64 weights, in chunks of 64. Byte p of a chunk's 64 low bytes
 * belongs to weight (p % 16 < 8 ? 0 : 32) + 8 * (p / 16) + p % 8 (where vpunpck{l,h}bw take it from),
 * and so does nibble p of its 32 code bytes (the low nibbles of bytes 0-31, then their high nibbles):
 * then one vpshufb turns the codes into high bytes, and the unpacks of the low and high bytes give
 * weights 0-31 and 32-63 in order. */

#include "internal.h"


/* Bytes ahead that the one-token dot products prefetch each row's low bytes (codes: half that): 1.2x
 * the expert kernel's decode speed here, where the hardware prefetcher alone leaves the streams short.
 * (The GEMMs' row decoding runs slower with it.) */
#define X12_PF 2048
static inline int64_t x12_kp(int64_t K) { return (K + 63) / 64 * 64; }

/* 64 weights from their low bytes and codes (exceptions not yet written): w0 weights 0-31, w1 32-63. */
static inline void x12_chunk(const uint8_t *lo, const uint8_t *hc, __m512i tab, __m512i *w0, __m512i *w1) {
  __m512i l = _mm512_loadu_si512(lo), c = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)hc));
  c = _mm512_and_si512(_mm512_mask_srli_epi16(c, 0xFFFF0000u, c, 4), _mm512_set1_epi8(0x0F));
  __m512i h = _mm512_shuffle_epi8(tab, c);
  *w0 = _mm512_unpacklo_epi8(l, h);
  *w1 = _mm512_unpackhi_epi8(l, h);
}

/* Rows [r0, r0 + R) of c as bf16 into dst [R, K]; writes up to 32 elements past the last row's end
 * (where K is not a multiple of 64). */
void x12_rows(const tm_x12 *c, int64_t r0, int R, uint16_t *dst) {
  const int64_t K = c->K, KP = x12_kp(K);
  const __m512i tab = _mm512_loadu_si512(c->tab);
  for (int r = 0; r < R; r++) {
    const uint8_t *lo = c->lo + (r0 + r) * KP, *hc = c->hc + (r0 + r) * (KP / 2);
    uint16_t *d = dst + r * K;
    for (int64_t k = 0; k < KP; k += 64) {
      __m512i w0, w1;
      x12_chunk(lo + k, hc + k / 2, tab, &w0, &w1);
      _mm512_storeu_si512(d + k, w0);
      _mm512_storeu_si512(d + k + 32, w1);
    }
    for (int32_t i = c->xrow[r0 + r]; i < c->xrow[r0 + r + 1]; i++) d[c->xval[i] >> 16] = (uint16_t)c->xval[i];
  }
}

/* Row r's 64-chunk at k with its exceptions written in: *xp, the row's next exception (none before k). */
static inline void x12_load(const tm_x12 *c, int64_t r, int64_t k, __m512i tab, const uint32_t **xp,
                            __m512i *w0, __m512i *w1) {
  const int64_t KP = x12_kp(c->K);
  _mm_prefetch((const char *)(c->lo + r * KP + k + X12_PF), _MM_HINT_T0);
  if (k % 128 == 0) _mm_prefetch((const char *)(c->hc + r * (KP / 2) + k / 2 + X12_PF / 2), _MM_HINT_T0);
  x12_chunk(c->lo + r * KP + k, c->hc + r * (KP / 2) + k / 2, tab, w0, w1);
  for (const uint32_t *xe = c->xval + c->xrow[r + 1]; *xp < xe && (int64_t)(**xp >> 16) < k + 64; (*xp)++) {
    int j = (int)((**xp >> 16) - k);
    if (j < 32)
      *w0 = _mm512_mask_set1_epi16(*w0, (__mmask32)1u << j, (short)**xp);
    else
      *w1 = _mm512_mask_set1_epi16(*w1, (__mmask32)1u << (j - 32), (short)**xp);
  }
}

/* gu_pair (one token, gate and up rows of R neurons from row r0) on x12 matrices, decoded in registers:
 * the same sums in the same order, so the same bits. */
void gu_pair_x12(const tm_x12 *g, const tm_x12 *u, int64_t r0, int R, const uint16_t *x, float og[4][TB],
                 float ou[4][TB]) {
  const int64_t K = g->K;
  const __m512i tg = _mm512_loadu_si512(g->tab), tu = _mm512_loadu_si512(u->tab);
  for (int r = 0; r < R; r++) {
    const uint32_t *xg = g->xval + g->xrow[r0 + r], *xu = u->xval + u->xrow[r0 + r];
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t k = 0; k < K; k += 64) {
      __m512i g0, g1, u0, u1;
      x12_load(g, r0 + r, k, tg, &xg, &g0, &g1);
      x12_load(u, r0 + r, k, tu, &xu, &u0, &u1);
      __m512bh x0 = ld32(x + k, 32);
      a0 = _mm512_dpbf16_ps(a0, (__m512bh)g0, x0);
      b0 = _mm512_dpbf16_ps(b0, (__m512bh)u0, x0);
      if (k + 32 < K) {
        __m512bh x1 = ld32(x + k + 32, 32);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)g1, x1);
        b1 = _mm512_dpbf16_ps(b1, (__m512bh)u1, x1);
      }
    }
    og[r][0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    ou[r][0] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
  }
}

/* dot_1 (one token, rows r0..r0+R of an x12 matrix) decoded in registers: dot_block's four accumulators
 * over 128 weights, then its 32-weight tail steps into the first, so the same bits. */
void dot_1_x12(const tm_x12 *c, int64_t r0, int R, const uint16_t *x, float out[4][TB]) {
  const int64_t K = c->K;
  const __m512i tab = _mm512_loadu_si512(c->tab);
  for (int r = 0; r < R; r++) {
    const uint32_t *xp = c->xval + c->xrow[r0 + r];
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    __m512i w[4];
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
      x12_load(c, r0 + r, k, tab, &xp, &w[0], &w[1]);
      x12_load(c, r0 + r, k + 64, tab, &xp, &w[2], &w[3]);
      for (int q = 0; q < 4; q++) acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)w[q], ld32(x + k + 32 * q, 32));
    }
    for (; k < K; k += 64) {
      x12_load(c, r0 + r, k, tab, &xp, &w[0], &w[1]);
      acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)w[0], ld32(x + k, 32));
      if (k + 32 < K) acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)w[1], ld32(x + k + 32, 32));
    }
    out[r][0] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), acc[2]), acc[3]));
  }
}



/* dot_block for 2..TB tokens (U = 2: weights 0-31 of each 64 into the first accumulator, 32-63 into the
 * second, a tail of 32 into the first) on rows r0..r0+R of an x12 matrix, decoded in registers once for all nt
 * tokens: the same sums in the same order, so the same bits. */
void dot_n_x12(const tm_x12 *c, int64_t r0, int R, const uint16_t *const *x, int nt, float out[4][TB]) {
  const int64_t K = c->K;
  const __m512i tab = _mm512_loadu_si512(c->tab);
  for (int r = 0; r < R; r++) {
    const uint32_t *xp = c->xval + c->xrow[r0 + r];
    __m512 acc[TB][2];
    for (int j = 0; j < TB; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    __m512i w0, w1;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      x12_load(c, r0 + r, k, tab, &xp, &w0, &w1);
      for (int j = 0; j < nt; j++) {
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], (__m512bh)w0, ld32(x[j] + k, 32));
        acc[j][1] = _mm512_dpbf16_ps(acc[j][1], (__m512bh)w1, ld32(x[j] + k + 32, 32));
      }
    }
    if (k < K) {
      x12_load(c, r0 + r, k, tab, &xp, &w0, &w1);
      for (int j = 0; j < nt; j++) {
        acc[j][0] = _mm512_dpbf16_ps(acc[j][0], (__m512bh)w0, ld32(x[j] + k, K - k));
        if (k + 32 < K) acc[j][0] = _mm512_dpbf16_ps(acc[j][0], (__m512bh)w1, ld32(x[j] + k + 32, K - k - 32));
      }
    }
    for (int j = 0; j < nt; j++) out[r][j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]));
  }
}

/* Rows [r0, r0 + R) into dst [R, K] (and up to 32 elements past it: see x12_rows). */
void tm_x12_decode(const tm_x12 *c, int64_t r0, int64_t R, uint16_t *dst, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = r0; r < r0 + R; r++) x12_rows(c, r, 1, dst + (r - r0) * c->K);
}

/* tab[0:64]: the 16 most common high bytes of rows 0, step, 2 step, ... of w [N, K] (most common first,
 * ties: the lower byte), repeated in each 128-bit lane (see tm_x12). */
void tm_x12_table(const uint16_t *w, int64_t N, int64_t K, int64_t step, uint8_t *tab) {
  int64_t hist[256] = {0};
  for (int64_t r = 0; r < N; r += step)
    for (int64_t k = 0; k < K; k++) hist[w[r * K + k] >> 8]++;
  for (int q = 0; q < 16; q++) {
    int best = 0;
    for (int b = 1; b < 256; b++) best = hist[b] > hist[best] ? b : best;
    tab[q] = (uint8_t)best;
    hist[best] = -1;
  }
  for (int q = 16; q < 64; q++) tab[q] = tab[q % 16];
}

/* Encodes w [N, K] with tab (the 16 high bytes of codes 0-15) into lo and hc (see tm_x12); cnt[r] = row
 * r's exceptions (they get code 0 until tm_x12_exceptions lists them). Padding weights are zero. 64
 * weights at a time: packing the low and the high bytes of two 32-weight vectors puts them where the
 * decoder's unpacks take them from, and 16 byte compares find the codes. */
void tm_x12_encode(const uint16_t *w, int64_t N, int64_t K, const uint8_t *tab, uint8_t *lo, uint8_t *hc,
                   int32_t *cnt, int nthreads) {
  const int64_t KP = x12_kp(K);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < N; r++) {
    const uint16_t *wr = w + r * K;
    int32_t n = 0;
    for (int64_t k = 0; k < KP; k += 64) {
      __m512i w0 = _mm512_loadu_si512(wr + k); /* K is a multiple of 32: a chunk is 64 weights or 32 */
      __m512i w1 = k + 64 <= K ? _mm512_loadu_si512(wr + k + 32) : _mm512_setzero_si512();
      const __m512i ff = _mm512_set1_epi16(0xFF);
      __m512i l = _mm512_packus_epi16(_mm512_and_si512(w0, ff), _mm512_and_si512(w1, ff));
      __m512i h = _mm512_packus_epi16(_mm512_srli_epi16(w0, 8), _mm512_srli_epi16(w1, 8));
      __m512i c = _mm512_setzero_si512();
      __mmask64 hit = 0;
      for (int q = 0; q < 16; q++) {
        __mmask64 m = _mm512_cmpeq_epi8_mask(h, _mm512_set1_epi8((char)tab[q]));
        c = _mm512_mask_mov_epi8(c, m, _mm512_set1_epi8((char)q));
        hit |= m;
      }
      uint64_t miss = ~(uint64_t)hit;
      if (k + 64 > K) miss &= 0x00FF00FF00FF00FFull; /* the padding (weights 32-63) holds no exceptions */
      n += __builtin_popcountll(miss);
      _mm512_storeu_si512(lo + r * KP + k, l);
      __m256i c0 = _mm512_castsi512_si256(c), c1 = _mm512_extracti64x4_epi64(c, 1);
      _mm256_storeu_si256((__m256i *)(hc + r * (KP / 2) + k / 2), _mm256_or_si256(c0, _mm256_slli_epi16(c1, 4)));
    }
    cnt[r] = n;
  }
}

/* The exceptions of w (see tm_x12_encode) into xval, row r's from xrow[r] on. */
void tm_x12_exceptions(const uint16_t *w, int64_t N, int64_t K, const uint8_t *tab, const int32_t *xrow,
                       uint32_t *xval, int nthreads) {
  int8_t code[256];
  memset(code, -1, sizeof(code));
  for (int q = 0; q < 16; q++) code[tab[q]] = (int8_t)q;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < N; r++) {
    int32_t at = xrow[r];
    for (int64_t k = 0; at < xrow[r + 1] && k < K; k++)
      if (code[w[r * K + k] >> 8] < 0) xval[at++] = (uint32_t)k << 16 | w[r * K + k];
  }
}
