/* Fused bf16 CPU kernels for small-batch MoE inference (AVX512-BF16).
 *
 * Decode reads every weight byte once per token, so speed is memory bandwidth. These kernels
 * stream each weight row once for all the tokens that need it (up to TB at a time), in one
 * sequential pass per row, accumulate in fp32 with vdpbf16ps, and fuse a gated expert FFN
 * (gate, up, act, down, routing weight) into one pass with one thread barrier. Prefill-sized
 * tasks (many tokens per expert) run as a GEMM over packed token vectors instead (see GB), on AMX
 * tiles where the CPU has them and Linux grants them (see gemm_rows_amx), and a
 * decode step's whole attention block is one call (tm_attn_decode_bf16).
 *
 * Threads: OpenMP (the same libgomp that torch loaded). An expert FFN is split across threads
 * by neuron range for gate/up (each thread its contiguous rows), then by hidden rows for down
 * (checkpoint layout [D, I]: each thread a contiguous block of rows) or by neuron range with
 * per-thread partial sums (tile layout, down stored transposed [n, D]). Prefill-sized tasks go to
 * the threads as work items (neuron chunks, then hidden-row chunks) as the threads come free.
 *
 * Shape legend: T tokens, D hidden, n neurons of a task, K reduction length, N output rows.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define TB 4 /* tokens per register block */

int tm_abi_version(void) { return 7; }

static inline float bf2f(uint16_t v) {
  union { uint32_t u; float f; } c;
  c.u = ((uint32_t)v) << 16;
  return c.f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, like torch */
  union { uint32_t u; float f; } c;
  c.f = f;
  uint32_t u = c.u;
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* 32 bf16 values from p, zero past `rem` */
static inline __m512bh ld32(const uint16_t *p, int64_t rem) {
  if (rem >= 32) return (__m512bh)_mm512_loadu_si512((const void *)p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1u << rem) - 1u), p);
}

/* 16 bf16 values from p as fp32 */
static inline __m512 ld16f(const uint16_t *p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* Split [0, n) into nt parts, `align`-aligned: part t is [*a, *b). */
static inline void split(int64_t n, int nt, int t, int64_t align, int64_t *a, int64_t *b) {
  int64_t per = ((n + nt - 1) / nt + align - 1) / align * align;
  *a = t * per < n ? t * per : n;
  *b = *a + per < n ? *a + per : n;
}

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
  static void dot_##NT_(const uint16_t *w, int64_t ld, int R, const uint16_t *const *x, int64_t K,          \
                        float out[4][TB]) {                                                                  \
    dot_block(w, ld, R, x, NT_, U_, K, out);                                                                \
  }
DOT_SPEC(1, 4)
DOT_SPEC(2, 2)
DOT_SPEC(3, 2)
DOT_SPEC(4, 2)

/* Many tokens per row (prefill, compute-bound): 4 rows x 4 tokens interleaved, so each vector
 * loaded feeds 4 dot products (loads are the limit there, not bandwidth). K a multiple of 32. */
static void dot_quads_4(const uint16_t *w, int64_t ld, const uint16_t *const *x, int64_t K, float out[4][TB]) {
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

static void dot_rows(const uint16_t *w, int64_t ld, int R, const uint16_t *const *x, int nt, int64_t K,
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

/* Prefill GEMM (many tokens per weight row, compute-bound). The token rows of a group of up to GB
 * tokens are packed pairs-major, p[kp][j] = (x[j][2kp], x[j][2kp+1]), so one vector holds pair kp of
 * 16 (or 8) tokens. Each weight pair is broadcast from its row-major row and multiplied into those
 * tokens at once: 8 rows x up to 3 token vectors = 24 accumulators, no horizontal sums, and the
 * weights read in place (no packing). Up to GEMM_SPAN groups of a task go through one block of weight
 * rows while it is in cache, and each block's pass prefetches the next block into L2 (one line per
 * step): the hardware prefetcher alone leaves 20-30% of the time stalled on the 8 row streams. */
#define GB 48         /* tokens per group: up to three vectors of 16 */
#define GEMM_MIN 8    /* fewer tokens per task: the register-blocked dot products above */

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

/* Groups a task's ntok tokens fall into: ceil(ntok / 8) eight-token units, at most GB / 8 per group. */
static inline int64_t task_groups(int64_t ntok) { return ((ntok + 7) / 8 + GB / 8 - 1) / (GB / 8); }

/* Eight-token units of group g of a task's ntok tokens: the units spread evenly over task_groups, so
 * at most 7 lanes of the whole task are padding; 0 past the last group. */
static inline int group_units(int64_t ntok, int g) {
  int v = (int)((ntok + 7) / 8), groups = (int)task_groups(ntok);
  return g < groups ? v / groups + (g < v % groups) : 0;
}

/* Splits a task's ntok tokens into groups (see group_units): units[g] eight-token units from token
 * first[g] on, first[ngroups] = ntok. Returns the number of groups. */
static int plan_groups(int64_t ntok, int *units, int64_t *first) {
  int g = 0;
  first[0] = 0;
  for (int u; (u = group_units(ntok, g)) > 0; g++) {
    units[g] = u;
    first[g + 1] = first[g] + 8 * u < ntok ? first[g] + 8 * u : ntok;
  }
  return g;
}

#define GEMM_SPAN 8 /* groups packed at once: one pass over the weights each (bounds the pack buffer) */

/* Packs groups [gb, ge) of a task (see plan_groups) into pk, group g at pk + (g - gb) * GB * K / 2;
 * token j is row base + idx[j] * ld. */
static void pack_span(const uint16_t *base, int64_t ld, const int32_t *idx, const int64_t *first, int gb, int ge,
                      int64_t K, uint32_t *pk) {
  for (int g = gb; g < ge; g++)
    pack_pairs(base, ld, idx + first[g], (int)(first[g + 1] - first[g]), K, pk + (g - gb) * GB * (K / 2));
}

/* Rows per GEMM block: 8 weight rows at the same column sit 4 KiB apart in one L1 set (8 ways); 12
 * rows thrash it (10-20% slower at D = 2048). */
#define GEMM_ROWS 8
#define GEMM_ROWS_MAX 32 /* with AMX (gemm_step) */

/* AMX (Intel Sapphire Rapids and later): the same GEMM on tile registers, 16 x 16 fp32 outputs per
 * tdpbf16ps. An A tile is 16 weight rows x 32 bf16 of k, loaded in place (stride: the row length); a
 * B tile is 16 pairs of k x 16 tokens of a packed group (stride GB words: pack_pairs' layout is the
 * tile layout); C tiles are stored straight into o's rows. A thread configures its tiles on entry to
 * a call that runs GEMMs and releases them on the way out (oneDNN, on the same threads, releases its
 * own after each call), and only a configured thread takes this path (tiles 0-1 weights, 2-4 tokens,
 * 4-7 or 5-7 outputs). */
#define AMX_PF 2 /* steps ahead that a block prefetches its rows (2-4% faster than none) */
static int use_amx; /* set by tm_amx_enable */
static __thread int amx_ready;

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")
typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_cfg;

/* Tiles 0-7: 16 rows of 64 bytes. A constant in memory: gcc drops stores to a local that only the
 * ldtilecfg reads. */
static const amx_cfg AMX_CFG __attribute__((aligned(64))) = {
    1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

static void amx_configure(void) {
  _tile_loadconfig(&AMX_CFG);
  amx_ready = 1;
}

static void amx_release(void) {
  _tile_release();
  amx_ready = 0;
}

/* Rows [0, R) of gemm_rows (R a multiple of 16, K of 32) for nb 16-token vectors of a packed group:
 * two row blocks per pass over k for up to 32 tokens, one row block for 48. */
static void gemm_rows_amx(const uint16_t *w, int64_t ld, int R, const uint32_t *p, int nb, int64_t K, float *o) {
  const int64_t sw = ld * 2, sp = GB * 4;
  int r = 0;
  if (nb <= 2)
    for (; r + 32 <= R; r += 32) {
      const uint16_t *w0 = w + r * ld, *w1 = w0 + 16 * ld;
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t k = 0; k < K; k += 32) {
        if (k + AMX_PF * 32 < K)
          for (int j = 0; j < 32; j++) _mm_prefetch((const char *)(w0 + j * ld + k + AMX_PF * 32), _MM_HINT_T0);
        _tile_loadd(0, w0 + k, sw);
        _tile_loadd(1, w1 + k, sw);
        _tile_loadd(2, p + (k / 2) * GB, sp);
        _tile_dpbf16ps(4, 0, 2);
        _tile_dpbf16ps(6, 1, 2);
        if (nb == 2) {
          _tile_loadd(3, p + (k / 2) * GB + 16, sp);
          _tile_dpbf16ps(5, 0, 3);
          _tile_dpbf16ps(7, 1, 3);
        }
      }
      _tile_stored(4, o + r * GB, sp);
      _tile_stored(6, o + (r + 16) * GB, sp);
      if (nb == 2) {
        _tile_stored(5, o + r * GB + 16, sp);
        _tile_stored(7, o + (r + 16) * GB + 16, sp);
      }
    }
  for (; r < R; r += 16) {
    const uint16_t *w0 = w + r * ld;
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t k = 0; k < K; k += 32) {
      const uint32_t *pk = p + (k / 2) * GB;
      _tile_loadd(0, w0 + k, sw);
      _tile_loadd(2, pk, sp);
      _tile_dpbf16ps(5, 0, 2);
      if (nb > 1) {
        _tile_loadd(3, pk + 16, sp);
        _tile_dpbf16ps(6, 0, 3);
      }
      if (nb > 2) {
        _tile_loadd(4, pk + 32, sp);
        _tile_dpbf16ps(7, 0, 4);
      }
    }
    _tile_stored(5, o + r * GB, sp);
    if (nb > 1) _tile_stored(6, o + r * GB + 16, sp);
    if (nb > 2) _tile_stored(7, o + r * GB + 32, sp);
  }
}
#pragma GCC pop_options

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Asks Linux for the AMX tile state (granted per process) and, granted, routes the GEMMs of whole
 * 16-row blocks through AMX. Returns whether AMX is on. */
int tm_amx_enable(int on) {
  use_amx = on && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return use_amx;
}

int tm_amx_enabled(void) { return use_amx; }

/* Weight rows per GEMM block: two AMX row blocks, or GEMM_ROWS. */
static inline int gemm_step(void) { return amx_ready ? GEMM_ROWS_MAX : GEMM_ROWS; }

/* o[r * GB + j] = dot(w + r*ld, token j) for R rows and the u units of a packed group; pf: the rows to
 * prefetch meanwhile (same ld), or NULL. */
static void gemm_rows(const uint16_t *w, int64_t ld, int R, const uint32_t *p, int u, int64_t K, float *o,
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
static void gu_pair(const uint16_t *g, const uint16_t *u, int64_t ld, int R, const uint16_t *x, int64_t K,
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

/* ---------------------------------------------------------------------------------------------- */
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

typedef struct {
  const uint8_t *lo;    /* [N, KP] low bytes */
  const uint8_t *hc;    /* [N, KP / 2] high-byte codes */
  const uint8_t *tab;   /* [64] code -> high byte, the 16 entries repeated in each 128-bit lane */
  const int32_t *xrow;  /* [N + 1] row r's exceptions are xval[xrow[r]:xrow[r + 1]] */
  const uint32_t *xval; /* column << 16 | bf16 bits, by row, then column */
  int64_t N, K;
} tm_x12;

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
static void x12_rows(const tm_x12 *c, int64_t r0, int R, uint16_t *dst) {
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
static void gu_pair_x12(const tm_x12 *g, const tm_x12 *u, int64_t r0, int R, const uint16_t *x, float og[4][TB],
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
static void dot_1_x12(const tm_x12 *c, int64_t r0, int R, const uint16_t *x, float out[4][TB]) {
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

/* Rows [r0, r0 + R) of a matrix, read in place (c NULL: bf16 at w, row stride *ld) or decoded into buf
 * (*ld becomes K). */
static inline const uint16_t *rows_of(const uint16_t *w, const tm_x12 *c, int64_t r0, int R, int64_t *ld,
                                      uint16_t *buf) {
  if (!c) return w + r0 * *ld;
  x12_rows(c, r0, R, buf);
  *ld = c->K;
  return buf;
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

/* ---------------------------------------------------------------------------------------------- */
/* Dense linear: y[M, N] = x[M, K] @ w[N, K]^T, rows of w split across threads.                     */

/* Rows [n0, n1) of y = x @ w^T: 4-row blocks outer, so a block stays in L1 for every token block. c: w as
 * x12 (then w is not read), or NULL. */
static void linear_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t ldw,
                        const tm_x12 *c, int64_t n0, int64_t n1, void *y, int64_t ldy, int y_fp32) {
  float res[4][TB];
  uint16_t *buf = c && M > 1 ? (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (4 * K + 64)) : NULL;
  for (int64_t n = n0; n < n1; n += 4) {
    int R = n1 - n < 4 ? (int)(n1 - n) : 4;
    int64_t ld = ldw;
    const uint16_t *wr = c && M == 1 ? NULL : rows_of(w, c, n, R, &ld, buf); /* one row: decoded in registers */
    for (int64_t m0 = 0; m0 < M; m0 += TB) {
      int mt = M - m0 < TB ? (int)(M - m0) : TB;
      const uint16_t *xs[TB];
      for (int j = 0; j < mt; j++) xs[j] = x + (m0 + j) * ldx;
      if (!wr)
        dot_1_x12(c, n, R, xs[0], res);
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
void tm_linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                    int64_t ldw, const tm_x12 *c, void *y, int64_t ldy, int y_fp32, int nthreads) {
#pragma omp parallel num_threads(nthreads)
  {
    int64_t n0, n1;
    split(N, omp_get_num_threads(), omp_get_thread_num(), 4, &n0, &n1);
    linear_rows(x, M, K, ldx, w, ldw, c, n0, n1, y, ldy, y_fp32);
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Gated FFN tasks: out[tok] += scale * down(act(gate x) * up x) over a neuron range.               */

typedef struct {
  const uint16_t *gate; /* [n, ld_gu] rows */
  const uint16_t *up;   /* [n, ld_gu] rows */
  const uint16_t *down; /* down_t ? [n, ld_down] (transposed rows) : [D, ld_down] starting at column 0 */
  int64_t n, ld_gu, ld_down;
  int32_t down_t, ntok;
  const int32_t *tok;  /* [ntok] token rows of x / out */
  const float *scale;  /* [ntok] routing weights */
  const tm_x12 *cgate, *cup, *cdown; /* checkpoint layout: the matrices stored as x12 (then gate, up, down
                                      * are not read), or NULL */
} tm_ffn_task;

enum { ACT_SILU = 0, ACT_GELU = 1, ACT_RELU = 2 };

/* e^x for 16 lanes (Cephes expf: range reduction by ln 2, degree-5 polynomial; within 2 ulp of expf) */
static inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.f)), _mm512_set1_ps(88.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

static inline float act_fn(int act, float g) {
  if (act == ACT_SILU) return g / (1.f + expf(-g));
  if (act == ACT_GELU) return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
  return g > 0.f ? g : 0.f;
}

/* g[r * GB + j] = act(g) * u for R rows of nb token vectors (SiLU 16 lanes at a time). */
static void act_gemm_rows(int act, float *g, const float *u, int R, int nb) {
  for (int r = 0; r < R; r++)
    for (int j = r * GB; j < r * GB + 16 * nb; j += 16) {
      __m512 gv = _mm512_loadu_ps(g + j), uv = _mm512_loadu_ps(u + j);
      if (act == ACT_SILU) {
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(g + j, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), uv));
      } else {
        for (int l = 0; l < 16; l++) g[j + l] = act_fn(act, g[j + l]) * u[j + l];
      }
    }
}

/* y[0:D] += s * sum_{i in [i0, i1)} h[i] * w[i, :] (transposed down rows), two rows per pass over y */
static void down_t_rows(const uint16_t *w, int64_t ld, const uint16_t *h, float s, int64_t i0, int64_t i1, int64_t D,
                        float *y) {
  for (int64_t i = i0; i < i1; i += 2) {
    int two = i + 1 < i1;
    float s0 = bf2f(h[i]) * s, s1 = two ? bf2f(h[i + 1]) * s : 0.f;
    const uint16_t *w0 = w + i * ld, *w1 = two ? w0 + ld : w0;
    __m512 h0 = _mm512_set1_ps(s0), h1 = _mm512_set1_ps(s1);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
      _mm512_storeu_ps(y + d, _mm512_fmadd_ps(h1, ld16f(w1 + d), _mm512_fmadd_ps(h0, ld16f(w0 + d), _mm512_loadu_ps(y + d))));
    for (; d < D; d++) y[d] += s0 * bf2f(w0[d]) + s1 * bf2f(w1[d]);
  }
}

/* 16 fp32 lanes rounded to bf16 like f2bf, each in the low half of its 32-bit lane. */
static inline __m512i f2bf16(__m512 f) {
  __m512i u = _mm512_castps_si512(f), one = _mm512_set1_epi32(1);
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one))),
      16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

/* Activations g [R][GB] (R even) of nb token vectors, rounded to bf16, into a down GEMM's packed group
 * (see pack_pairs): p[r / 2][j] = (g[r][j], g[r + 1][j]). The same words pack_pairs makes of the rows of h. */
static void pack_act_rows(const float *g, int R, int nb, uint32_t *p) {
  for (int r = 0; r < R; r += 2)
    for (int b = 0; b < nb; b++) {
      __m512i lo = f2bf16(_mm512_loadu_ps(g + r * GB + 16 * b)), hi = f2bf16(_mm512_loadu_ps(g + (r + 1) * GB + 16 * b));
      _mm512_store_si512(p + (r / 2) * GB + 16 * b, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

/* Gate and up GEMMs of rows [i0, i1) of task tk over its packed token groups [gb, ge) (pk: pack_span's
 * output), then the activation, into row-major hq [ntok][n] or, with ph, into the task's packed groups
 * for the down GEMM (group g at ph + g * n / 2 * GB). go, uo: GEMM_ROWS x GB fp32 each. */
static void gate_up_gemm(const tm_ffn_task *tk, int64_t D, int act, int64_t i0, int64_t i1, int gb, int ge,
                         const int *units, const int64_t *first, const uint32_t *pk, float *go, float *uo,
                         uint16_t *hq, uint32_t *ph, uint16_t *wb) {
  const int step = gemm_step();
  for (int64_t i = i0; i < i1; i += step) {
    int R = i1 - i < step ? (int)(i1 - i) : step;
    int64_t ldg = tk->ld_gu, ldu = tk->ld_gu; /* x12: the block's rows decoded into wb */
    const uint16_t *gw = rows_of(tk->gate, tk->cgate, i, R, &ldg, wb);
    const uint16_t *uw = rows_of(tk->up, tk->cup, i, R, &ldu, wb + GEMM_ROWS_MAX * D);
    const uint16_t *next = !tk->cgate && i + step < i1 ? gw + step * ldg : NULL;
    for (int g = gb; g < ge; g++) { /* the first group's pass prefetches the next weights */
      const uint32_t *pg = pk + (g - gb) * GB * (D / 2);
      gemm_rows(gw, ldg, R, pg, units[g], D, go, g > gb || tk->cup ? NULL : uw);
      gemm_rows(uw, ldu, R, pg, units[g], D, uo, g > gb ? NULL : next);
      act_gemm_rows(act, go, uo, R, (units[g] + 1) / 2);
      if (ph) {
        pack_act_rows(go, R, (units[g] + 1) / 2, ph + g * (tk->n / 2) * GB + (i / 2) * GB);
        continue;
      }
      for (int64_t j = first[g]; j < first[g + 1]; j++)
        for (int r = 0; r < R; r++) hq[j * tk->n + i + r] = f2bf(go[r * GB + j - first[g]]);
    }
  }
}

/* Down rows [d0, d1) of task tk into out: from its packed activation groups ph (see gate_up_gemm) or, without,
 * from row-major hq by dot products. after: weights to prefetch when the GEMM reaches d1 (or NULL). wb: room
 * for GEMM_ROWS_MAX decoded rows (x12). */
static void down_rows(const tm_ffn_task *tk, float *out, int64_t D, int64_t d0, int64_t d1, const uint16_t *hq,
                      const uint32_t *ph, const uint16_t *after, int *units, int64_t *first, float *go,
                      uint16_t *wb) {
  if (ph) {
    int ngr = plan_groups(tk->ntok, units, first);
    const int step = gemm_step();
    for (int64_t d = d0; d < d1; d += step) {
      int R = d1 - d < step ? (int)(d1 - d) : step;
      int64_t ld = tk->ld_down;
      const uint16_t *dw = rows_of(tk->down, tk->cdown, d, R, &ld, wb);
      const uint16_t *next = tk->cdown ? NULL : d + step < d1 ? dw + step * ld : after;
      for (int g = 0; g < ngr; g++) {
        gemm_rows(dw, ld, R, ph + g * (tk->n / 2) * GB, units[g], tk->n, go, g ? NULL : next);
        for (int64_t j = first[g]; j < first[g + 1]; j++) {
          float *yj = out + (int64_t)tk->tok[j] * D, s = tk->scale[j];
          for (int r = 0; r < R; r++) yj[d + r] += s * go[r * GB + j - first[g]];
        }
      }
    }
    return;
  }
  float res[4][TB];
  for (int64_t d = d0; d < d1; d += 4) {
    int R = d1 - d < 4 ? (int)(d1 - d) : 4;
    int64_t ld = tk->ld_down;
    int fused = tk->cdown && tk->ntok == 1; /* one token: x12 rows decoded in registers */
    const uint16_t *dw = fused ? NULL : rows_of(tk->down, tk->cdown, d, R, &ld, wb);
    for (int64_t j0 = 0; j0 < tk->ntok; j0 += TB) {
      int mt = tk->ntok - j0 < TB ? (int)(tk->ntok - j0) : TB;
      const uint16_t *hs[TB];
      for (int j = 0; j < mt; j++) hs[j] = hq + (j0 + j) * tk->n;
      if (fused)
        dot_1_x12(tk->cdown, d, R, hs[0], res);
      else
        dot_rows(dw, ld, R, hs, mt, tk->n, res, 0);
      for (int j = 0; j < mt; j++) {
        float *yj = out + (int64_t)tk->tok[j0 + j] * D;
        for (int r = 0; r < R; r++) yj[d + r] += tk->scale[j0 + j] * res[r][j];
      }
    }
  }
}

/* Work items of the prefill GEMMs, handed out to the threads as they come free (one core here often
 * runs 5-10% slower than the other, and a static split waits for it): gate/up in chunks of ITEM_ROWS
 * neurons of one task, down in chunks of ITEM_D hidden rows of all tasks in order. Every output element
 * is computed by one thread in the same order as with a static split, so results do not depend on the
 * schedule. */
#define ITEM_ROWS 128
#define ITEM_D 64

/* The tasks' FFNs, run by every thread of the enclosing parallel region (see tm_ffn_tasks_bf16). Tasks
 * of GEMM_MIN tokens or more (checkpoint layout) go through the GEMMs as work items, with the gate/up
 * output packed straight into the down GEMM's layout; the others split by a static row range. */
static void ffn_tasks_body(const uint16_t *x, float *out, int64_t T, int64_t D, const tm_ffn_task *tasks,
                           int64_t ntasks, int act, float *scratch, uint16_t *h) {
  int64_t *offs = (int64_t *)malloc(sizeof(int64_t) * (ntasks + 1) * 4);
  int64_t *poff = offs + ntasks + 1, *ioff = poff + ntasks + 1; /* packed-h words, items before task q */
  int64_t *nextp = ioff + ntasks + 1; /* the first packed task from q on (ntasks: none) */
  int any_t = 0, any_c = 0;
  int64_t kmax = D, gmax = 0;
  offs[0] = poff[0] = ioff[0] = 0;
  for (int64_t q = 0; q < ntasks; q++) {
    const tm_ffn_task *tk = &tasks[q];
    int gemm = tk->ntok >= GEMM_MIN && D % 2 == 0, dyn = gemm && !tk->down_t && tk->n % 2 == 0;
    kmax = tk->n > kmax ? tk->n : kmax;
    offs[q + 1] = offs[q] + tk->n * tk->ntok;
    any_t |= tk->down_t;
    any_c |= tk->cgate || tk->cdown;
    if (gemm) gmax = task_groups(tk->ntok) > gmax ? task_groups(tk->ntok) : gmax;
    poff[q + 1] = poff[q] + (dyn ? task_groups(tk->ntok) * (tk->n / 2) * GB : 0);
    ioff[q + 1] = ioff[q] + (dyn ? (task_groups(tk->ntok) + GEMM_SPAN - 1) / GEMM_SPAN * ((tk->n + ITEM_ROWS - 1) / ITEM_ROWS) : 0);
  }
  nextp[ntasks] = ntasks;
  for (int64_t q = ntasks - 1; q >= 0; q--) nextp[q] = ioff[q + 1] > ioff[q] ? q : nextp[q + 1];
  int nt = omp_get_num_threads(), t = omp_get_thread_num();
  float *yp = t == 0 ? out : scratch + (int64_t)(t - 1) * T * D; /* partial sums (transposed down) */
  if (t && any_t) memset(yp, 0, sizeof(float) * T * D);
  float res[4][TB], res2[4][TB];
  /* GEMM buffers only where a task takes the GEMM (gmax > 0): decode calls this once per layer */
  float *go = gmax ? (float *)aligned_alloc(64, sizeof(float) * 2 * GEMM_ROWS_MAX * GB) : NULL;
  float *uo = gmax ? go + GEMM_ROWS_MAX * GB : NULL;
  uint32_t *pk = gmax ? (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * GB * (kmax / 2 + 1) * GEMM_SPAN) : NULL;
  int *units = gmax ? (int *)malloc(sizeof(int) * gmax) : NULL;
  int64_t *first = gmax ? (int64_t *)malloc(sizeof(int64_t) * (gmax + 1)) : NULL;
  /* decoded x12 rows: two GEMM blocks (gate and up), or 4-row blocks of the dot products */
  uint16_t *wb = any_c ? (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (2 * (gmax ? GEMM_ROWS_MAX : 4) * kmax + 64)) : NULL;
  if (use_amx && gmax) amx_configure();
  uint32_t *ph = NULL; /* the GEMM tasks' packed activations, shared */
  if (ioff[ntasks]) {
#pragma omp single copyprivate(ph)
    ph = (uint32_t *)aligned_alloc(64, (sizeof(uint32_t) * poff[ntasks] + 63) / 64 * 64);
  }
  /* phase 1a: the other tasks, each thread its neuron range: gate/up, activation, transposed downs */
  for (int64_t q = 0; q < ntasks; q++) {
    const tm_ffn_task *tk = &tasks[q];
    if (ioff[q + 1] > ioff[q]) continue;
    int64_t i0, i1;
    split(tk->n, nt, t, 32, &i0, &i1);
    if (tk->ntok >= GEMM_MIN && D % 2 == 0) { /* prefill: packed token groups, all groups per row block */
      int ngr = plan_groups(tk->ntok, units, first);
      for (int gb = 0, ge; gb < ngr; gb = ge) {
        ge = gb + GEMM_SPAN < ngr ? gb + GEMM_SPAN : ngr;
        pack_span(x, D, tk->tok, first, gb, ge, D, pk);
        gate_up_gemm(tk, D, act, i0, i1, gb, ge, units, first, pk, go, uo, h + offs[q], NULL, wb);
      }
    } else {
      for (int64_t i = i0; i < i1; i += 4) { /* rows outer: a 4-row block stays in L1 for every token block */
        int R = i1 - i < 4 ? (int)(i1 - i) : 4;
        int64_t ld = tk->ld_gu, ldu = ld; /* the same for both: x12 for both or neither */
        int fused = tk->cgate && tk->ntok == 1; /* one token: x12 rows decoded in registers */
        const uint16_t *gw = fused ? NULL : rows_of(tk->gate, tk->cgate, i, R, &ld, wb);
        const uint16_t *uw = fused ? NULL : rows_of(tk->up, tk->cup, i, R, &ldu, wb + 4 * D);
        for (int64_t j0 = 0; j0 < tk->ntok; j0 += TB) {
          int mt = tk->ntok - j0 < TB ? (int)(tk->ntok - j0) : TB;
          const uint16_t *xs[TB];
          for (int j = 0; j < mt; j++) xs[j] = x + (int64_t)tk->tok[j0 + j] * D;
          if (fused) {
            gu_pair_x12(tk->cgate, tk->cup, i, R, xs[0], res, res2);
          } else if (mt == 1) { /* decode: gate and up rows of a neuron in one pass */
            gu_pair(gw, uw, ld, R, xs[0], D, res, res2);
          } else {
            dot_rows(gw, ld, R, xs, mt, D, res, 0);
            dot_rows(uw, ld, R, xs, mt, D, res2, 0);
          }
          for (int j = 0; j < mt; j++)
            for (int r = 0; r < R; r++)
              h[offs[q] + (j0 + j) * tk->n + i + r] = f2bf(act_fn(act, res[r][j]) * res2[r][j]);
        }
      }
    }
    if (!tk->down_t) continue;
    for (int64_t j = 0; j < tk->ntok; j++)
      down_t_rows(tk->down, tk->ld_down, h + offs[q] + j * tk->n, tk->scale[j], i0, i1, D, yp + (int64_t)tk->tok[j] * D);
  }
  /* phase 1b: the GEMM tasks' items (task, span of groups, neuron chunk); a thread packs a span's tokens once */
  if (ioff[ntasks]) {
    int64_t cq = -1, cgb = -1;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < ioff[ntasks]; it++) {
      int64_t q = 0;
      while (ioff[q + 1] <= it) q++;
      const tm_ffn_task *tk = &tasks[q];
      int64_t chunks = (tk->n + ITEM_ROWS - 1) / ITEM_ROWS, c = (it - ioff[q]) % chunks;
      int ngr = (int)task_groups(tk->ntok), gb = (int)((it - ioff[q]) / chunks) * GEMM_SPAN;
      int ge = gb + GEMM_SPAN < ngr ? gb + GEMM_SPAN : ngr;
      if (q != cq) plan_groups(tk->ntok, units, first);
      if (q != cq || gb != cgb) pack_span(x, D, tk->tok, first, gb, ge, D, pk);
      cq = q, cgb = gb;
      int64_t i1 = (c + 1) * ITEM_ROWS < tk->n ? (c + 1) * ITEM_ROWS : tk->n;
      gate_up_gemm(tk, D, act, c * ITEM_ROWS, i1, gb, ge, units, first, pk, go, uo, NULL, ph + poff[q], wb);
    }
  }
#pragma omp barrier
  /* phase 2: checkpoint-layout downs into out, by hidden rows; each row of out is one thread's, all tasks in order */
  if (ioff[ntasks]) {
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < (D + ITEM_D - 1) / ITEM_D; c++) {
      int64_t d0 = c * ITEM_D, d1 = d0 + ITEM_D < D ? d0 + ITEM_D : D;
      for (int64_t q = 0; q < ntasks; q++) {
        if (tasks[q].down_t) continue;
        int64_t q2 = nextp[q + 1]; /* its first rows are prefetched at d1 */
        const uint16_t *after = q2 < ntasks && !tasks[q2].cdown ? tasks[q2].down + d0 * tasks[q2].ld_down : NULL;
        const uint32_t *pq = nextp[q] == q ? ph + poff[q] : NULL;
        down_rows(&tasks[q], out, D, d0, d1, h + offs[q], pq, after, units, first, go, wb);
      }
    }
    if (t == 0) free(ph); /* every thread is past the loop's barrier */
  } else {
    int64_t d0, d1;
    split(D, nt, t, 16, &d0, &d1);
    for (int64_t q = 0; q < ntasks; q++)
      if (!tasks[q].down_t) down_rows(&tasks[q], out, D, d0, d1, h + offs[q], NULL, NULL, units, first, go, wb);
  }
  if (nt > 1 && any_t) {
#pragma omp barrier
#pragma omp for
    for (int64_t e = 0; e < T * D; e++) {
      float a = 0.f;
      for (int k = 0; k < nt - 1; k++) a += scratch[(int64_t)k * T * D + e];
      out[e] += a;
    }
  }
  free(go);
  free(wb);
  free(pk);
  free(units);
  free(first);
  free(offs);
  if (amx_ready) amx_release();
}

/* h: per task, ntok x n bf16 activations (the caller sizes it: sum of n * ntok). scratch: (threads-1) x T x D
 * fp32 per-thread partial sums for transposed-down tasks. out [T, D] fp32 is accumulated into. */
void tm_ffn_tasks_bf16(const uint16_t *x, float *out, int64_t T, int64_t D, const tm_ffn_task *tasks,
                       int64_t ntasks, int act, int nthreads, float *scratch, uint16_t *h) {
#pragma omp parallel num_threads(nthreads)
  ffn_tasks_body(x, out, T, D, tasks, ntasks, act, scratch, h);
}

/* A MoE layer's routed (token, expert) pairs grouped by expert into FFN tasks (checkpoint layout),
 * token order kept within an expert. */
typedef struct {
  tm_ffn_task *tasks;
  int64_t n;
  int32_t *tok;
  float *scale;
} moe_plan;

/* ids/w [T, K]; gate/up/down: per-expert data pointers ([I, D], [I, D], [D, I]); cgate/cup/cdown: per-expert
 * tm_x12 pointers of the same matrices, or NULL (bf16). Free with moe_plan_free. */
static moe_plan moe_plan_make(int64_t T, int64_t D, int64_t I, const int64_t *ids, const float *w, int64_t K,
                              int64_t E, const int64_t *gate, const int64_t *up, const int64_t *down,
                              const int64_t *cgate, const int64_t *cup, const int64_t *cdown) {
  moe_plan p = {(tm_ffn_task *)malloc(sizeof(tm_ffn_task) * (T * K < E ? T * K : E)), 0,
                (int32_t *)malloc(sizeof(int32_t) * T * K), (float *)malloc(sizeof(float) * T * K)};
  int32_t *count = (int32_t *)calloc(E + 1, sizeof(int32_t));
  for (int64_t q = 0; q < T * K; q++) count[ids[q] + 1]++;
  for (int64_t e = 0; e < E; e++) count[e + 1] += count[e]; /* exclusive prefix: start of expert e */
  int32_t *fill = (int32_t *)malloc(sizeof(int32_t) * E);
  memcpy(fill, count, sizeof(int32_t) * E);
  for (int64_t q = 0; q < T * K; q++) {
    int64_t e = ids[q];
    p.tok[fill[e]] = (int32_t)(q / K);
    p.scale[fill[e]++] = w[q];
  }
  for (int64_t e = 0; e < E; e++) {
    int32_t c = count[e + 1] - count[e];
    if (!c) continue;
    tm_ffn_task tk = {(const uint16_t *)gate[e], (const uint16_t *)up[e], (const uint16_t *)down[e], I, D, I, 0, c,
                      p.tok + count[e], p.scale + count[e], cgate ? (const tm_x12 *)cgate[e] : NULL,
                      cup ? (const tm_x12 *)cup[e] : NULL, cdown ? (const tm_x12 *)cdown[e] : NULL};
    p.tasks[p.n++] = tk;
  }
  free(fill);
  free(count);
  return p;
}

static void moe_plan_free(moe_plan *p) {
  free(p->tasks);
  free(p->tok);
  free(p->scale);
}

/* Routed experts of one MoE layer, checkpoint layout: group tokens by expert, then run the tasks.
 * ids/w [T, K]; gate/up/down, cgate/cup/cdown: as in moe_plan_make. */
void tm_moe_bf16(const uint16_t *x, float *out, int64_t T, int64_t D, int64_t I, const int64_t *ids,
                 const float *w, int64_t K, int64_t E, const int64_t *gate, const int64_t *up, const int64_t *down,
                 const int64_t *cgate, const int64_t *cup, const int64_t *cdown, int act, int nthreads,
                 float *scratch, uint16_t *h) {
  moe_plan p = moe_plan_make(T, D, I, ids, w, K, E, gate, up, down, cgate, cup, cdown);
  tm_ffn_tasks_bf16(x, out, T, D, p.tasks, p.n, act, nthreads, scratch, h);
  moe_plan_free(&p);
}

/* Causal attention of a prefill with no cached prefix (query i attends keys 0..i), as scaled dot-product
 * attention computes it for bf16: scores q.k in fp32, softmax in fp32, the unnormalized probabilities
 * rounded to bf16 for the P.V product (fp32 accumulation), divided by their fp32 sum at the end.
 * Both products are the prefill GEMM above: each (batch, kv head)'s keys are packed once as token
 * groups (lanes: keys) and its values as pairs of keys (lanes: value features); then query blocks of
 * 8 rows go to the threads as they come free, longest rows first (a causal row's cost grows with i).
 * q [B, H, T, hd] at strides (sqb, sqh, sqt, 1); k, v [B, Hkv, T, hd] at (skb, skh, skt, 1), the same
 * strides for both; out [B, T, H, hd] contiguous (what the o projection reads). */
#define AQ 8 /* query rows per work item */

/* Values j in [0, T) of one head as the P.V GEMM's packed groups: group dg (value features
 * [dg * GB, dg * GB + GB)) at p + dg * KP * GB, p[kp][l] = (v[2kp][f], v[2kp + 1][f]), f = dg * GB + l;
 * zero past T and past hd. KP = ceil(T / 2). */
static void pack_values(const uint16_t *v, int64_t ld, int64_t T, int64_t hd, uint32_t *p) {
  int64_t KP = (T + 1) / 2, ng = (hd + GB - 1) / GB;
  for (int64_t dg = 0; dg < ng; dg++)
    for (int64_t kp = 0; kp < KP; kp++) {
      uint32_t *d = p + (dg * KP + kp) * GB;
      const uint16_t *a = v + 2 * kp * ld, *b = 2 * kp + 1 < T ? a + ld : NULL;
      for (int64_t l = 0; l < GB; l++) {
        int64_t f = dg * GB + l;
        d[l] = f < hd ? (uint32_t)a[f] | (b ? (uint32_t)b[f] << 16 : 0u) : 0u;
      }
    }
}

void tm_attn_prefill_bf16(const uint16_t *q, int64_t sqb, int64_t sqh, int64_t sqt, const uint16_t *k,
                          const uint16_t *v, int64_t skb, int64_t skh, int64_t skt, uint16_t *out, int64_t B,
                          int64_t H, int64_t Hkv, int64_t T, int64_t hd, float scale, int nthreads) {
  int64_t ngk = task_groups(T), KPv = (T + 1) / 2, ngv = (hd + GB - 1) / GB, heads = B * Hkv;
  int64_t kwords = ngk * GB * (hd / 2), vwords = ngv * KPv * GB, qblocks = (T + AQ - 1) / AQ;
  uint32_t *pk = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (heads * (kwords + vwords) + 16));
  uint32_t *pv = pk + heads * kwords;
  int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (T + GB));
  for (int64_t j = 0; j < T + GB; j++) idx[j] = (int32_t)(j < T ? j : 0);
#pragma omp parallel num_threads(nthreads)
  {
    int *units = (int *)malloc(sizeof(int) * ngk);
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (ngk + 1));
    int ngr = plan_groups(T, units, first);
#pragma omp for schedule(dynamic, 1)
    for (int64_t hh = 0; hh < heads; hh++) {
      const uint16_t *kh = k + (hh / Hkv) * skb + (hh % Hkv) * skh, *vh = v + (hh / Hkv) * skb + (hh % Hkv) * skh;
      pack_span(kh, skt, idx, first, 0, ngr, hd, pk + hh * kwords);
      pack_values(vh, skt, T, hd, pv + hh * vwords);
    }
    int64_t ldp = 2 * KPv + 32; /* P rows, bf16, zero-padded to the even key count */
    float *s = (float *)aligned_alloc(64, sizeof(float) * (AQ * T + AQ * GB + 16));
    float *o = s + AQ * T;
    uint16_t *pr = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * AQ * ldp + 64);
    float sums[AQ];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < B * H * qblocks; it++) {
      int64_t qb = qblocks - 1 - it / (B * H), bh = it % (B * H), b = bh / H, h = bh % H;
      int64_t hh = b * Hkv + h / (H / Hkv), i0 = qb * AQ, R = T - i0 < AQ ? T - i0 : AQ, jend = i0 + R;
      const uint16_t *qr = q + b * sqb + h * sqh + i0 * sqt;
      for (int g = 0; g < ngr && first[g] < jend; g++) { /* scores of keys [0, jend) */
        gemm_rows(qr, sqt, (int)R, pk + hh * kwords + g * GB * (hd / 2), units[g], hd, o, NULL);
        int64_t n = first[g + 1] - first[g];
        for (int64_t r = 0; r < R; r++) memcpy(s + r * T + first[g], o + r * GB, sizeof(float) * n);
      }
      int64_t kpad = (jend + 1) / 2 * 2;
      for (int64_t r = 0; r < R; r++) { /* softmax of row i0 + r over keys 0..i0 + r */
        float *sr = s + r * T, m = -INFINITY;
        int64_t n = i0 + r + 1, j = 0;
        for (j = 0; j < n; j++) m = sr[j] > m ? sr[j] : m;
        __m512 mv = _mm512_set1_ps(m * scale), sc = _mm512_set1_ps(scale), acc = _mm512_setzero_ps();
        uint16_t *p = pr + r * ldp;
        for (j = 0; j + 16 <= n; j += 16) {
          __m512 e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), sc, mv));
          acc = _mm512_add_ps(acc, e);
          _mm256_storeu_si256((__m256i *)(p + j), _mm512_cvtepi32_epi16(f2bf16(e)));
        }
        float sum = _mm512_reduce_add_ps(acc);
        for (; j < n; j++) {
          float e = expf(sr[j] * scale - m * scale);
          sum += e;
          p[j] = f2bf(e);
        }
        for (; j < kpad; j++) p[j] = 0;
        sums[r] = sum;
      }
      uint16_t *orow = out + (b * T + i0) * H * hd + h * hd;
      for (int64_t dg = 0; dg < ngv; dg++) { /* out = P.V / sum */
        int64_t f0 = dg * GB, nf = hd - f0 < GB ? hd - f0 : GB;
        gemm_rows(pr, ldp, (int)R, pv + hh * vwords + dg * KPv * GB, (int)((nf + 7) / 8), kpad, o, NULL);
        for (int64_t r = 0; r < R; r++)
          for (int64_t f = 0; f < nf; f++) orow[r * H * hd + f0 + f] = f2bf(o[r * GB + f] / sums[r]);
      }
    }
    free(s);
    free(pr);
    free(units);
    free(first);
  }
  free(idx);
  free(pk);
}

/* RMSNorm of one row x [D] into y (y may be x): bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), the same
 * roundings as the torch module (fp32 statistics, cast back, then the weight product in the model dtype). */
static void rmsnorm_row(const uint16_t *x, int64_t D, const uint16_t *w, float eps, uint16_t *y) {
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

/* ---------------------------------------------------------------------------------------------- */
/* Decode attention: one new token per row, the whole block in one parallel region.               */

typedef struct {
  const uint16_t *wq, *wk, *wv, *wo;         /* [H*hd, D], [Hkv*hd, D] x2, [D, H*hd] */
  const uint16_t *bq, *bk, *bv, *bo;         /* biases or NULL */
  const uint16_t *q_norm, *k_norm;           /* [H*hd], [Hkv*hd] (qk_norm 1) or [hd] (2); else NULL */
  int32_t qk_norm, H, Hkv, hd;
  float eps, scale, clip;                    /* clip <= 0: none */
  int32_t fp32_rotate;                       /* cos/sin fp32 and the rotation in fp32 (else bf16 ops) */
  const tm_x12 *cq, *ck, *cv, *co;           /* the projections stored as x12 (then wq.. unused), or NULL */
} tm_attn_layer;

static inline uint16_t addb(uint16_t a, const uint16_t *b, int64_t i) { return b ? f2bf(bf2f(a) + bf2f(b[i])) : a; }

/* x [B, D] bf16 (normed hidden states) -> out [B, D] bf16: q/k/v projections (+bias, clip, q/k RMSNorm),
 * rotary embedding (halves layout) with cos/sin [B, hd], the new k/v written to the cache layer
 * kc/vc [S, Hkv, L, hd] at (slot[b], pos[b]), softmax attention over positions 0..pos[b], o projection.
 * ws: bf16 scratch of B * (2*H*hd + 2*Hkv*hd) elements; sc: fp32 scratch of nthreads * L. Run by every
 * thread of the enclosing parallel region; out is complete after the next barrier. */
static void attn_decode_body(const tm_attn_layer *a, const uint16_t *x, int64_t B, int64_t D, const void *cos,
                             const void *sin, uint16_t *kc, uint16_t *vc, int64_t L, const int64_t *slot,
                             const int64_t *pos, uint16_t *out, uint16_t *ws, float *sc) {
  const int64_t H = a->H, Hkv = a->Hkv, hd = a->hd, nq = H * hd, nk = Hkv * hd, nqkv = nq + 2 * nk;
  uint16_t *qkv = ws, *att = ws + B * nqkv; /* [B, nq | nk | nk], [B, nq] */
  int nt = omp_get_num_threads(), t = omp_get_thread_num();
  int64_t r0, r1;
  /* 1: projections, each matrix's rows split across threads */
  const uint16_t *w3[3] = {a->wq, a->wk, a->wv};
  const tm_x12 *c3[3] = {a->cq, a->ck, a->cv};
  const int64_t n3[3] = {nq, nk, nk}, o3[3] = {0, nq, nq + nk};
  for (int m = 0; m < 3; m++) {
    split(n3[m], nt, t, 4, &r0, &r1);
    linear_rows(x, B, D, D, w3[m], D, c3[m], r0, r1, qkv + o3[m], nqkv, 0);
  }
#pragma omp barrier
  /* 2: bias, q/k norms over all heads, clip (the torch module's order; a row's q, k or v at a time) */
#pragma omp for
  for (int64_t u = 0; u < 3 * B; u++) {
    int64_t b = u / 3, m = u % 3;
    uint16_t *v = qkv + b * nqkv + o3[m];
    const uint16_t *bias = m == 0 ? a->bq : m == 1 ? a->bk : a->bv;
    if (bias)
      for (int64_t i = 0; i < n3[m]; i++) v[i] = addb(v[i], bias, i);
    if (a->qk_norm == 1 && m < 2) rmsnorm_row(v, n3[m], m == 0 ? a->q_norm : a->k_norm, a->eps, v);
    if (a->clip > 0.f)
      for (int64_t i = 0; i < n3[m]; i++) {
        float f = bf2f(v[i]);
        v[i] = f > a->clip ? f2bf(a->clip) : f < -a->clip ? f2bf(-a->clip) : v[i];
      }
  }
  /* 3: per-head norm, rotation, cache write (a head of a row at a time) */
#pragma omp for
  for (int64_t u = 0; u < B * (H + Hkv); u++) {
    int64_t b = u / (H + Hkv), h = u % (H + Hkv);
    int isq = h < H;
    uint16_t *v = qkv + b * nqkv + (isq ? h * hd : nq + (h - H) * hd);
    if (a->qk_norm == 2) rmsnorm_row(v, hd, isq ? a->q_norm : a->k_norm, a->eps, v);
    int64_t half = hd / 2;
    uint16_t tmp[hd];
    for (int64_t i = 0; i < hd; i++) {
      int64_t j = i < half ? i + half : i - half;
      float rot = i < half ? -bf2f(v[j]) : bf2f(v[j]);
      if (a->fp32_rotate) {
        const float *c = (const float *)cos + b * hd, *s = (const float *)sin + b * hd;
        tmp[i] = f2bf(bf2f(v[i]) * c[i] + rot * s[i]);
      } else {
        const uint16_t *c = (const uint16_t *)cos + b * hd, *s = (const uint16_t *)sin + b * hd;
        tmp[i] = f2bf(bf2f(f2bf(bf2f(v[i]) * bf2f(c[i]))) + bf2f(f2bf(rot * bf2f(s[i]))));
      }
    }
    memcpy(v, tmp, sizeof(uint16_t) * hd);
    if (!isq) {
      int64_t g = h - H, at = ((slot[b] * Hkv + g) * L + pos[b]) * hd;
      memcpy(kc + at, v, sizeof(uint16_t) * hd);
      memcpy(vc + at, qkv + b * nqkv + nq + nk + g * hd, sizeof(uint16_t) * hd);
    }
  }
  /* 4: attention of each (row, query head) over its cached positions */
  float *p = sc + (int64_t)t * L;
#pragma omp for
  for (int64_t u = 0; u < B * H; u++) {
    int64_t b = u / H, h = u % H, g = h / (H / Hkv), n = pos[b] + 1;
    const uint16_t *q = qkv + b * nqkv + h * hd;
    const uint16_t *kb = kc + (slot[b] * Hkv + g) * L * hd, *vb = vc + (slot[b] * Hkv + g) * L * hd;
    float mx = -INFINITY;
    const uint16_t *xs[1] = {q};
    for (int64_t l = 0; l < n; l += 4) {
      int R = n - l < 4 ? (int)(n - l) : 4;
      float r[4][TB];
      dot_rows(kb + l * hd, hd, R, xs, 1, hd, r, 0);
      for (int i = 0; i < R; i++) {
        p[l + i] = r[i][0] * a->scale;
        mx = p[l + i] > mx ? p[l + i] : mx;
      }
    }
    /* like torch's CPU flash attention in bf16: fp32 exponentials summed, then rounded to bf16 for the
     * product with V (fp32 accumulation), divided by the sum at the end */
    float sum = 0.f;
    for (int64_t l = 0; l < n; l++) {
      float e = expf(p[l] - mx);
      sum += e;
      p[l] = bf2f(f2bf(e));
    }
    float acc[hd];
    for (int64_t i = 0; i < hd; i++) acc[i] = 0.f;
    for (int64_t l = 0; l < n; l++) {
      float w = p[l];
      const uint16_t *vr = vb + l * hd;
      int64_t i = 0;
      for (; i + 16 <= hd; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(_mm512_set1_ps(w), ld16f(vr + i), _mm512_loadu_ps(acc + i)));
      for (; i < hd; i++) acc[i] += w * bf2f(vr[i]);
    }
    for (int64_t i = 0; i < hd; i++) att[b * nq + h * hd + i] = f2bf(acc[i] / sum);
  }
  /* 5: o projection, rows split across threads (the implicit barrier above has every head done) */
  split(D, nt, t, 4, &r0, &r1);
  linear_rows(att, B, nq, nq, a->wo, nq, a->co, r0, r1, out, D, 0);
  if (a->bo)
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = r0; i < r1; i++) out[b * D + i] = addb(out[b * D + i], a->bo, i);
}

/* One decode attention step in its own parallel region (see attn_decode_body). */
void tm_attn_decode_bf16(const tm_attn_layer *a, const uint16_t *x, int64_t B, int64_t D, const void *cos,
                         const void *sin, uint16_t *kc, uint16_t *vc, int64_t L, const int64_t *slot,
                         const int64_t *pos, uint16_t *out, int nthreads, uint16_t *ws, float *sc) {
#pragma omp parallel num_threads(nthreads)
  attn_decode_body(a, x, B, D, cos, sin, kc, vc, L, slot, pos, out, ws, sc);
}

/* ---------------------------------------------------------------------------------------------- */
/* A whole MoE decoder layer for a decode step, in one parallel region.                            */

typedef struct {
  tm_attn_layer attn;
  const uint16_t *ln1, *ln2;          /* input and post-attention RMSNorm weights [D] */
  float eps;                          /* their epsilon */
  const uint16_t *router;             /* [E, D] */
  const int64_t *gate, *up, *down;    /* [E] expert data pointers, checkpoint layout */
  int32_t E, K, I, act;
  int32_t norm_topk, weights_bf16;    /* renormalize the top-k weights; round them to bf16 */
  float routed_scale;                 /* routed_scaling_factor */
  const int64_t *cgate, *cup, *cdown; /* [E] tm_x12 pointers of the experts, or NULL (bf16) */
} tm_decode_layer;

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
 * x is complete after the next barrier. Scratch as in tm_decode_layers_bf16; plan: shared by the threads. */
static void decode_layer_body(const tm_decode_layer *Ly, uint16_t *x, int64_t B, int64_t D, const void *cos,
                              const void *sin, uint16_t *kc, uint16_t *vc, int64_t L, const int64_t *slot,
                              const int64_t *pos, uint16_t *ws, float *sc, float *fs, uint16_t *h, int64_t *ids,
                              moe_plan *plan) {
  const int64_t E = Ly->E, K = Ly->K;
  uint16_t *xn = ws, *ao = ws + B * D, *logits = ws + 2 * B * D, *aws = logits + B * E; /* normed, attn out */
  float *mo = fs, *w = fs + B * D; /* routed sum [B, D], routing weights [B, K] */
  int nt = omp_get_num_threads(), t = omp_get_thread_num();
#pragma omp for
  for (int64_t b = 0; b < B; b++) rmsnorm_row(x + b * D, D, Ly->ln1, Ly->eps, xn + b * D);
  attn_decode_body(&Ly->attn, xn, B, D, cos, sin, kc, vc, L, slot, pos, ao, aws, sc);
#pragma omp barrier
#pragma omp for
  for (int64_t b = 0; b < B; b++) {
    for (int64_t d = 0; d < D; d++) x[b * D + d] = f2bf(bf2f(x[b * D + d]) + bf2f(ao[b * D + d]));
    rmsnorm_row(x + b * D, D, Ly->ln2, Ly->eps, xn + b * D);
  }
  int64_t r0, r1;
  split(E, nt, t, 4, &r0, &r1);
  linear_rows(xn, B, D, D, Ly->router, D, NULL, r0, r1, logits, E, 0);
#pragma omp barrier
#pragma omp single
  {
    for (int64_t b = 0; b < B; b++) route_row(Ly, logits + b * E, ids + b * K, w + b * K);
    memset(mo, 0, sizeof(float) * B * D);
    *plan = moe_plan_make(B, D, Ly->I, ids, w, K, E, Ly->gate, Ly->up, Ly->down, Ly->cgate, Ly->cup, Ly->cdown);
  }
  ffn_tasks_body(xn, mo, B, D, plan->tasks, plan->n, Ly->act, NULL, h);
#pragma omp barrier
#pragma omp for
  for (int64_t b = 0; b < B; b++)
    for (int64_t d = 0; d < D; d++) x[b * D + d] = f2bf(bf2f(x[b * D + d]) + bf2f(f2bf(mo[b * D + d])));
#pragma omp single
  moe_plan_free(plan);
}

/* n consecutive MoE decoder layers for one new token per row, in one parallel region: x [B, D] bf16, the
 * residual stream, is updated in place (see decode_layer_body). kc[l]/vc[l]: layer l's cache, the other
 * attention arguments as in tm_attn_decode_bf16. Scratch, sized for the largest layer: ws bf16 of
 * B * (2*D + E + 2*H*hd + 2*Hkv*hd) elements; sc fp32 of nthreads * L; fs fp32 of B * (D + K); h bf16 of
 * B * K * I. ids [n, B, K]: each layer's routed experts. */
void tm_decode_layers_bf16(const tm_decode_layer *layers, int64_t n, uint16_t *x, int64_t B, int64_t D,
                           const void *cos, const void *sin, uint16_t *const *kc, uint16_t *const *vc, int64_t L,
                           const int64_t *slot, const int64_t *pos, int nthreads, uint16_t *ws, float *sc,
                           float *fs, uint16_t *h, int64_t *ids) {
  moe_plan plan;
#pragma omp parallel num_threads(nthreads)
  for (int64_t l = 0; l < n; l++) {
    decode_layer_body(&layers[l], x, B, D, cos, sin, kc[l], vc[l], L, slot, pos, ws, sc, fs, h,
                      ids + l * B * layers[l].K, &plan);
  }
}
