/* The prefill GEMM (many tokens per weight row, compute-bound): token rows packed as pairs, AVX512-BF16
 * microkernels over them (gemm_rows hands whole 16-row blocks to AMX where a thread has its tiles), and
 * the one-token gate/up pass of decode (gu_pair). */
#include "internal.h"

/* Transposes a 16 x 16 block of 32-bit elements in registers: r[i][k] -> r[k][i]. */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) { /* r[4i + c], 128-bit lane L: column 4L + c of rows 4i..4i+3 */
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; c++) {
    __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    __m512i w0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44), w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
  for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* p[kp * GB + j] = pair kp of row j of the group, j < nt (row j: base + idx[j] * ld); zero for j in
 * [nt, GB). 16 tokens x 16 pairs at a time, transposed in registers: a
 * pair-at-a-time gather from rows 4 KiB apart misses L1 on every read. */
static void pack_pairs(const uint16_t *base, int64_t ld, const int32_t *idx, int nt, int64_t K, uint32_t *p) {
  int64_t KP = K / 2, kp0 = 0;
  for (; kp0 + 16 <= KP; kp0 += 16)
    for (int j0 = 0; j0 < GB; j0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; i++)
        r[i] = j0 + i < nt ? _mm512_loadu_si512(base + idx[j0 + i] * ld + 2 * kp0)
                           : _mm512_setzero_si512();
      if (j0 < nt) transpose16(r);
      for (int k = 0; k < 16; k++) _mm512_store_si512(p + (kp0 + k) * GB + j0, r[k]);
    }
  for (int64_t kp = kp0; kp < KP; kp++) {
    uint32_t *d = p + kp * GB;
    for (int j = 0; j < nt; j++) memcpy(d + j, base + idx[j] * ld + 2 * kp, 4);
    for (int j = nt; j < GB; j++) d[j] = 0;
  }
}

/* o[r * GB + 8u + l] = sum_kp dpbf16(p[kp][8u + l], w[r][2kp:2kp+2]) for R rows and the 2 * NZ + NY
 * eight-token units of a group: NZ 16-lane vectors, then NY (0 or 1) 8-lane vector. The 8-lane form
 * costs no speed (two 256-bit dot products issue per cycle where one 512-bit does) and halves the
 * padding of a group's last vector. */
#define GEMM_MK(R_, NZ_, NY_)                                                                              \
  static void mk_##R_##_##NZ_##_##NY_(const uint16_t *w, int64_t ld, const uint32_t *p, int64_t KP, float *o,   \
                                      const uint16_t *pf) {                                                   \
    __m512 acc[R_][NZ_ ? NZ_ : 1];                                                                         \
    __m256 acy[R_][NY_ ? NY_ : 1];                                                                         \
    for (int r = 0; r < R_; r++) {                                                                         \
      for (int b = 0; b < NZ_; b++) acc[r][b] = _mm512_setzero_ps();                                       \
      for (int b = 0; b < NY_; b++) acy[r][b] = _mm256_setzero_ps();                                       \
    }                                                                                                      \
    for (int64_t kp = 0; kp < KP; kp++) {                                                                  \
      if (pf && (kp / R_) * 32 < 2 * KP) /* the next block, one cache line per step, into L2 */           \
        _mm_prefetch((const char *)(pf + (kp % R_) * ld + (kp / R_) * 32), _MM_HINT_T1);                 \
      __m512bh xv[NZ_ ? NZ_ : 1];                                                                          \
      __m256bh yv[NY_ ? NY_ : 1];                                                                          \
      for (int b = 0; b < NZ_; b++) xv[b] = (__m512bh)_mm512_load_si512(p + kp * GB + 16 * b);             \
      for (int b = 0; b < NY_; b++) yv[b] = (__m256bh)_mm256_load_si256((const __m256i *)(p + kp * GB + 16 * NZ_)); \
      for (int r = 0; r < R_; r++) {                                                                       \
        int32_t pair;                                                                                      \
        memcpy(&pair, w + r * ld + 2 * kp, 4);                                                             \
        __m512i wv = _mm512_set1_epi32(pair);                                                              \
        for (int b = 0; b < NZ_; b++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv[b], (__m512bh)wv);        \
        for (int b = 0; b < NY_; b++)                                                                      \
          acy[r][b] = _mm256_dpbf16_ps(acy[r][b], yv[b], (__m256bh)_mm512_castsi512_si256(wv));            \
      }                                                                                                    \
    }                                                                                                      \
    for (int r = 0; r < R_; r++) {                                                                         \
      for (int b = 0; b < NZ_; b++) _mm512_storeu_ps(o + r * GB + 16 * b, acc[r][b]);                      \
      for (int b = 0; b < NY_; b++) _mm256_storeu_ps(o + r * GB + 16 * NZ_, acy[r][b]);                    \
    }                                                                                                      \
  }
#define GEMM_MK_ROWS(NZ_, NY_) GEMM_MK(8, NZ_, NY_) GEMM_MK(4, NZ_, NY_) GEMM_MK(1, NZ_, NY_)
GEMM_MK_ROWS(0, 1)
GEMM_MK_ROWS(1, 0)
GEMM_MK_ROWS(1, 1)
GEMM_MK_ROWS(2, 0)
GEMM_MK_ROWS(2, 1)
GEMM_MK_ROWS(3, 0)


/* Splits a task's ntok tokens into groups (see group_units): units[g] eight-token units from token
 * first[g] on, first[ngroups] = ntok. Returns the number of groups. */
int plan_groups(int64_t ntok, int *units, int64_t *first) {
  int g = 0;
  first[0] = 0;
  for (int u; (u = group_units(ntok, g)) > 0; g++) {
    units[g] = u;
    first[g + 1] = first[g] + 8 * u < ntok ? first[g] + 8 * u : ntok;
  }
  return g;
}

/* Packs groups [gb, ge) of a task (see plan_groups) into pk, group g at pk + (g - gb) * GB * K / 2;
 * token j is row base + idx[j] * ld. */
void pack_span(const uint16_t *base, int64_t ld, const int32_t *idx, const int64_t *first, int gb, int ge,
               int64_t K, uint32_t *pk) {
  for (int g = gb; g < ge; g++)
    pack_pairs(base, ld, idx + first[g], (int)(first[g + 1] - first[g]), K, pk + (g - gb) * GB * (K / 2));
}

/* o[r * GB + j] = dot(w + r*ld, token j) for R rows and the u units of a packed group; pf: the rows to
 * prefetch meanwhile (same ld), or NULL. */
void gemm_rows(const uint16_t *w, int64_t ld, int R, const uint32_t *p, int u, int64_t K, float *o,
               const uint16_t *pf) {
  typedef void (*mk_fn)(const uint16_t *, int64_t, const uint32_t *, int64_t, float *, const uint16_t *);
  static const mk_fn big[7] = {0, mk_8_0_1, mk_8_1_0, mk_8_1_1, mk_8_2_0, mk_8_2_1, mk_8_3_0},
                     four[7] = {0, mk_4_0_1, mk_4_1_0, mk_4_1_1, mk_4_2_0, mk_4_2_1, mk_4_3_0},
                     one[7] = {0, mk_1_0_1, mk_1_1_0, mk_1_1_1, mk_1_2_0, mk_1_2_1, mk_1_3_0};
  if (amx_ready && R % 16 == 0 && K % 32 == 0) {
    gemm_rows_amx(w, ld, R, p, (u + 1) / 2, K, o);
    return;
  }
  for (int r = 0; r < R;) {
    int step = R - r >= GEMM_ROWS ? GEMM_ROWS : R - r >= 4 ? 4 : 1;
    (step == GEMM_ROWS ? big : step == 4 ? four : one)[u](w + r * ld, ld, p, K / 2, o + r * GB, pf ? pf + r * ld : NULL);
    r += step;
  }
}

/* One token: the gate row and up row of each neuron in one pass (two streams in flight, one x load
 * for both; 8-15% faster than the two matrices one after the other). */
void gu_pair(const uint16_t *g, const uint16_t *u, int64_t ld, int R, const uint16_t *x, int64_t K,
             float og[4][TB], float ou[4][TB]) {
  for (int r = 0; r < R; r++) {
    const uint16_t *gr = g + r * ld, *ur = u + r * ld;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      __m512bh x0 = ld32(x + k, 32), x1 = ld32(x + k + 32, 32);
      a0 = _mm512_dpbf16_ps(a0, ld32(gr + k, 32), x0);
      b0 = _mm512_dpbf16_ps(b0, ld32(ur + k, 32), x0);
      a1 = _mm512_dpbf16_ps(a1, ld32(gr + k + 32, 32), x1);
      b1 = _mm512_dpbf16_ps(b1, ld32(ur + k + 32, 32), x1);
    }
    for (; k < K; k += 32) {
      __m512bh xv = ld32(x + k, K - k);
      a0 = _mm512_dpbf16_ps(a0, ld32(gr + k, K - k), xv);
      b0 = _mm512_dpbf16_ps(b0, ld32(ur + k, K - k), xv);
    }
    og[r][0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    ou[r][0] = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
  }
}
