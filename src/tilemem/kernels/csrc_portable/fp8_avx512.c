/* The 1-token fp8 row path on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids): e4m3 bytes become bf16 in
 * registers and VDPBF16PS multiplies them, 32 weights an instruction. The library is built for AVX2; these
 * functions carry their own target and run only where the CPU reports avx512bf16 (fp8_bf16_on).
 *
 * Weights: e4m3 s|eeee|mmm -> bf16 s|0111eeee|mmm0000 (exponent 112 + e), exactly e4m3 / 256 for e >= 1;
 * subnormals (e = 0, m * 2^-9) are normal bf16 numbers m * 2^-17 from a table of 8 (VPERMW, only where e = 0):
 * every byte decodes to fp8_internal.h's value, bit for bit (tests/test_fp8_kernels.py checks all 256).
 * Activations: xs (fp32: x times the block scale times 256, fill_xs of the callers) as the sum of three bf16
 * (hi = bf16(xs), mid = bf16(xs - hi), lo = bf16(xs - hi - mid): each difference exact, 8 + 8 + 8 bits), so
 * the three VDPBF16PS products are exact and only the fp32 sums round, as in the FMA path (VDPBF16PS flushes
 * denormal inputs and outputs: only |xs| below ~2^-110 differs).
 *
 * Measured on Zen 4 (EPYC, 2 cores; matmul_nt, 1 token, 2048 columns, A/B rounds in one process, median of 5):
 * 1 thread 10.2 -> 13.2 G weights/s from DRAM, 9.4 -> 12.2 from L2; 2 threads 16.8 -> 17.3 (DRAM, within the
 * spread) and 17.7 -> 19.4 (L2); the OLMoE FP8 decode's one-call layers (2 threads) unchanged (~40 ms a token
 * either way): there the bytes, not the decoding, bound it. Two parts (hi, lo) instead of three: 7% faster
 * (1 thread) with 2.5e-6 relative error against 2e-7: not taken.
 *
 * A bf16-valued x (a bf16 model's activations and, with bf16_h, its FFN's h: every decode step there) needs no
 * parts and no xs (fp8_bf16_xprep once a call, then fp8_bf16_rows_prepped a row block, 1-8 tokens): x's own bf16
 * bits, one VDPBF16PS per token and 32 weights (exact products), each 128-column block's fp32 sums times the
 * block's scale, a routing weight on the row's sum (as fp8_gemm.c does it). Zen 4, 2 threads, matmul_nt from DRAM, 1 token (/tmp A/B of bf16-valued and other x in
 * one process, median of 6): 20.9 -> 27.4 GB/s; 4 tokens 9.0 -> 10.4 (compute: VDPBF16PS on zmm issues every
 * other cycle there). With three parts the 1-token rows were compute bound too, not bandwidth bound. At 3+ tokens
 * a row's compute and its DRAM reads add up rather than overlap: a prefetch 2 KB ahead (OLMoE expert FFNs of 3 / 4 /
 * 6 tokens, 2 threads, A/B in one process: 20.6 / 18.0 / 12.5 -> 22.6 / 21.2 / 16.3 G weights/s; 1-2 tokens and
 * 256-8192 B: no gain). Where the CPU has AVX512-VBMI those rows decode e4m3 by byte tables (decode64_lut: 6
 * instructions per 64 weights against 12; the same bits and sums): one thread from L2, 1 / 2 / 4 tokens 22.7 / 17.0 /
 * 13.1 -> 31.7 / 22.0 / 15.6 G weights/s (a C loop over the rows); from DRAM at the time 1 token unchanged
 * (the reads bound it), 4 tokens +8%.
 */
#include "fp8.h"
#include "fp8_internal.h"
#include "fp8_bf16.h"

#include <stdlib.h>

#ifndef PARTS
#define PARTS 3 /* bf16 parts of xs multiplied (3: exact products; 2 drops the lowest 8 bits of xs) */
#endif

/* A path's switch (state): -1 not decided yet, 0 off, 1 on where supported() and the environment variable env is not
 * "0"; set >= 0 sets it (on only where supported). */
static int path_on(int *state, const char *env, int (*supported)(void)) {
    int s = __atomic_load_n(state, __ATOMIC_RELAXED);
    if (s < 0) {
        const char *v = getenv(env);
        s = supported() && !(v && v[0] == '0' && v[1] == 0);
        __atomic_store_n(state, s, __ATOMIC_RELAXED);
    }
    return s;
}

static void path_set(int *state, int set, int (*supported)(void)) {
    if (set >= 0) __atomic_store_n(state, set && supported(), __ATOMIC_RELAXED);
}

static int bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

static int bf16_state = -1; /* the AVX512-BF16 path (TILEMEM_FP8_BF16) */

int fp8_bf16_on(void) { return path_on(&bf16_state, "TILEMEM_FP8_BF16", bf16_supported); }

int tmp_fp8_bf16_path(int set) {
    path_set(&bf16_state, set, bf16_supported);
    return fp8_bf16_on();
}

/* The bf16 bits of 32 floats (RNE) as one vector of 32 lanes, and the floats they stand for. */
TARGET static inline __m512i split32(__m512 *a, __m512 *b) {
    const __m256bh ha = _mm512_cvtneps_pbh(*a), hb = _mm512_cvtneps_pbh(*b);
    const __m512i wa = _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)ha), 16);
    const __m512i wb = _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)hb), 16);
    *a = _mm512_sub_ps(*a, _mm512_castsi512_ps(wa)); /* exact: the remainder */
    *b = _mm512_sub_ps(*b, _mm512_castsi512_ps(wb));
    return _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)ha), (__m256i)hb, 1);
}

/* xb[3 * 32 * k + 32 * part + j] = part (hi, mid, lo) of xs[32 * k + j], for the Cp32 / 32 chunks (xs is zero
 * from C on; read only below Cp, the rest zero). */
TARGET static void split_xs(const float *xs, int64_t Cp, int64_t Cp32, uint16_t *xb) {
    for (int64_t c = 0; c < Cp32; c += 32) {
        __m512 a = c < Cp ? _mm512_loadu_ps(xs + c) : _mm512_setzero_ps();
        __m512 b = c + 16 < Cp ? _mm512_loadu_ps(xs + c + 16) : _mm512_setzero_ps();
        uint16_t *o = xb + 3 * c;
        for (int part = 0; part < 3; part++) _mm512_store_si512((__m512i *)(o + 32 * part), split32(&a, &b));
    }
}

/* y[0] = sum_c xs[c] * w[c] for one row: 64 columns a step, 6 accumulators (2 chunks x 3 parts). */
TARGET static inline void row1(const uint8_t *w, const uint16_t *xb, int64_t C, float *y, __m512i sub) {
    __m512 a[2][3];
    for (int u = 0; u < 2; u++)
        for (int p = 0; p < 3; p++) a[u][p] = _mm512_setzero_ps();
    const int64_t C64 = C & ~(int64_t)63;
    int64_t c = 0;
    for (; c < C64; c += 64) {
#pragma GCC unroll 2
        for (int u = 0; u < 2; u++) {
            const __m512i wb = decode32_bf16(_mm256_loadu_si256((const __m256i *)(w + c + 32 * u)), sub);
            const uint16_t *xc = xb + 3 * (c + 32 * u);
#pragma GCC unroll 4
            for (int p = 0; p < PARTS; p++)
                a[u][p] = _mm512_dpbf16_ps(a[u][p], (__m512bh)wb, (__m512bh)_mm512_load_si512(xc + 32 * p));
        }
    }
    for (; c < C; c += 32) { /* the last 32 columns, then the row's last C % 32 bytes (masked load: zeros) */
        const __mmask32 m = C - c >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << (C - c)) - 1);
        const __m512i wb = decode32_bf16(_mm256_maskz_loadu_epi8(m, w + c), sub);
        const uint16_t *xc = xb + 3 * c;
        for (int p = 0; p < PARTS; p++)
            a[0][p] = _mm512_dpbf16_ps(a[0][p], (__m512bh)wb, (__m512bh)_mm512_load_si512(xc + 32 * p));
    }
    const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a[0][0], a[1][0]), _mm512_add_ps(a[0][1], a[1][1])),
                                   _mm512_add_ps(a[0][2], a[1][2]));
    y[0] = _mm512_reduce_add_ps(s);
}

#define PF_AHEAD 2048 /* bytes of W prefetched ahead at 3+ tokens */
#define MAXU 4          /* accumulators a token (rows_u) */
#define ALWAYS __attribute__((always_inline))

/* Accumulators a token of a row of NT tokens: 4 independent chains at 1 token, 8 at 2-8 tokens. */
static inline int rows_u(const int NT) { return NT >= 8 ? 1 : NT >= 4 ? 2 : 4; }

/* The block's accumulators zeroed; at 3+ tokens and a whole block, W prefetched 2 KB ahead (a row at D = 2048: 3-6
 * tokens 10-30% faster from DRAM, 1-2 unchanged). */
TARGET static inline ALWAYS void block_start(const int NT, __m512 a[MAXU][MAXT], const uint8_t *wc, int whole) {
#pragma GCC unroll 4
    for (int u = 0; u < rows_u(NT); u++)
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) a[u][n] = _mm512_setzero_ps();
    if (NT >= 3 && whole) {
        _mm_prefetch((const char *)(wc + PF_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(wc + PF_AHEAD + 64), _MM_HINT_T0);
    }
}

/* tot[n] += (the block's accumulators of token n, summed) * the block's scale s. */
TARGET static inline ALWAYS void block_end(const int NT, __m512 a[MAXU][MAXT], float s, __m512 *tot) {
    const __m512 sv = _mm512_set1_ps(s);
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) {
        __m512 b = a[0][n];
#pragma GCC unroll 4
        for (int u = 1; u < rows_u(NT); u++) b = _mm512_add_ps(b, a[u][n]);
        tot[n] = _mm512_fmadd_ps(b, sv, tot[n]);
    }
}

/* y[n * ldy] = sum over 128-column blocks cb of sc[cb] * (sum_{c in cb} x_n[c] * w[c]) for one row and NT tokens,
 * x_n in bf16 (xb + n * ldxb, zero from C on): a 32-weight chunk decoded once, one VDPBF16PS per token (exact
 * products), each block's fp32 sums times its scale (as fp8_gemm.c sums a block). rows_u accumulators a token (the
 * chunks of a block round robin), one total a token. */
TARGET static inline void rowN_bf16x(const int NT, const uint8_t *w, const uint16_t *xb, int64_t ldxb, int64_t C,
                                     const float *sc, float *y, int64_t ldy, __m512i sub) {
    const int U = rows_u(NT);
    __m512 tot[MAXT];
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) tot[n] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 128) {
        __m512 a[MAXU][MAXT];
        const int64_t end = C - c < 128 ? C - c : 128;
        block_start(NT, a, w + c, end == 128);
        if (end == 128) {
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) {
                const __m512i wb = decode32_bf16(_mm256_loadu_si256((const __m256i *)(w + c + 32 * q)), sub);
#pragma GCC unroll 8
                for (int n = 0; n < NT; n++)
                    a[q % U][n] = _mm512_dpbf16_ps(a[q % U][n], (__m512bh)wb,
                                                   (__m512bh)_mm512_load_si512(xb + n * ldxb + c + 32 * q));
            }
        } else { /* the last block: 32 columns a step, the row's last C % 32 bytes by a masked load (zeros) */
            for (int64_t q = 0; q < end; q += 32) {
                const __mmask32 m = end - q >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << (end - q)) - 1);
                const __m512i wb = decode32_bf16(_mm256_maskz_loadu_epi8(m, w + c + q), sub);
#pragma GCC unroll 8
                for (int n = 0; n < NT; n++)
                    a[0][n] = _mm512_dpbf16_ps(a[0][n], (__m512bh)wb, (__m512bh)_mm512_load_si512(xb + n * ldxb + c + q));
            }
        }
        block_end(NT, a, sc[c >> 7], tot);
    }
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) y[n * ldy] = _mm512_reduce_add_ps(tot[n]);
}

/* ---- e4m3 -> bf16 by byte tables (AVX512-VBMI: Zen 4, Sapphire Rapids) ----
 * A bf16 weight's two bytes from the e4m3 byte's low 7 bits by two 128-entry VPERMI2B tables (subnormals and zero
 * included: the tables hold decode32_bf16's values), the sign ORed into the high byte, the bytes interleaved into
 * words: 6 instructions per 64 weights where decode32_bf16 takes 12, the same bits (tests check all 256 bytes). */
#define TARGET_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")))

static const uint8_t LUT_HI[128] __attribute__((aligned(64))) = {
    0x00, 0x37, 0x37, 0x37, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38, 0x38,
    0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39, 0x39,
    0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A, 0x3A,
    0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B, 0x3B,
    0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C, 0x3C,
    0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D, 0x3D,
    0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E, 0x3E,
    0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F, 0x3F,
};
static const uint8_t LUT_LO[128] __attribute__((aligned(64))) = {
    0x00, 0x00, 0x80, 0xC0, 0x00, 0x20, 0x40, 0x60, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0,
#define LO16 0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0
    LO16, LO16, LO16, LO16, LO16, LO16, LO16,
#undef LO16
};
/* byte k of 128-bit lane L <- weight 8L + k (k < 8) or 32 + 8L + k - 8: the interleave then gives weights 0-31,
 * 32-63 in order */
static const uint8_t LUT_ORDER[64] __attribute__((aligned(64))) = {
    0,  1,  2,  3,  4,  5,  6,  7,  32, 33, 34, 35, 36, 37, 38, 39, 8,  9,  10, 11, 12, 13, 14, 15, 40, 41, 42, 43,
    44, 45, 46, 47, 16, 17, 18, 19, 20, 21, 22, 23, 48, 49, 50, 51, 52, 53, 54, 55, 24, 25, 26, 27, 28, 29, 30, 31,
    56, 57, 58, 59, 60, 61, 62, 63,
};

typedef struct {
    __m512i order, h0, h1, l0, l1, sign;
} lut_regs;

TARGET_VBMI static inline lut_regs lut_load(void) {
    lut_regs t;
    t.order = _mm512_load_si512((const __m512i *)LUT_ORDER);
    t.h0 = _mm512_load_si512((const __m512i *)LUT_HI);
    t.h1 = _mm512_load_si512((const __m512i *)(LUT_HI + 64));
    t.l0 = _mm512_load_si512((const __m512i *)LUT_LO);
    t.l1 = _mm512_load_si512((const __m512i *)(LUT_LO + 64));
    t.sign = _mm512_set1_epi8((char)0x80);
    return t;
}

/* 64 e4m3 bytes (already loaded) -> weights 0-31 (*w0) and 32-63 (*w1) as bf16 (each e4m3 / 256). */
TARGET_VBMI static inline void decode64_lut(__m512i raw, const lut_regs *t, __m512i *w0, __m512i *w1) {
    const __m512i b = _mm512_permutexvar_epi8(t->order, raw);
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t->h0, b, t->h1), b, t->sign, 0xF8);
    const __m512i lo = _mm512_permutex2var_epi8(t->l0, b, t->l1);
    *w0 = _mm512_unpacklo_epi8(lo, hi);
    *w1 = _mm512_unpackhi_epi8(lo, hi);
}

/* rowN_bf16x with decode64_lut: xb rows zero up to a multiple of 64 columns. */
TARGET_VBMI static inline void rowN_lut(const int NT, const uint8_t *w, const uint16_t *xb, int64_t ldxb, int64_t C,
                                        const float *sc, float *y, int64_t ldy, const lut_regs *t) {
    const int U = rows_u(NT);
    __m512 tot[MAXT];
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) tot[n] = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 128) {
        __m512 a[MAXU][MAXT];
        const int64_t end = C - c < 128 ? C - c : 128;
        block_start(NT, a, w + c, end == 128);
        if (end == 128) { /* rowN_bf16x's accumulators: the block's 32-column chunks round robin (the same sums) */
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m512i w0, w1;
                decode64_lut(_mm512_loadu_si512(w + c + 64 * h), t, &w0, &w1);
#pragma GCC unroll 8
                for (int n = 0; n < NT; n++) {
                    const uint16_t *xc = xb + n * ldxb + c + 64 * h;
                    a[(2 * h) % U][n] = _mm512_dpbf16_ps(a[(2 * h) % U][n], (__m512bh)w0, (__m512bh)_mm512_load_si512(xc));
                    a[(2 * h + 1) % U][n] =
                        _mm512_dpbf16_ps(a[(2 * h + 1) % U][n], (__m512bh)w1, (__m512bh)_mm512_load_si512(xc + 32));
                }
            }
        } else { /* the last block: all into a[0], as rowN_bf16x; the row's last C % 64 bytes by a masked load */
            for (int64_t q = 0; q < end; q += 64) {
                const __mmask64 m = end - q >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (end - q)) - 1);
                __m512i w0, w1;
                decode64_lut(_mm512_maskz_loadu_epi8(m, w + c + q), t, &w0, &w1);
#pragma GCC unroll 8
                for (int n = 0; n < NT; n++) {
                    const uint16_t *xc = xb + n * ldxb + c + q;
                    a[0][n] = _mm512_dpbf16_ps(a[0][n], (__m512bh)w0, (__m512bh)_mm512_load_si512(xc));
                    a[0][n] = _mm512_dpbf16_ps(a[0][n], (__m512bh)w1, (__m512bh)_mm512_load_si512(xc + 32));
                }
            }
        }
        block_end(NT, a, sc[c >> 7], tot);
    }
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) y[n * ldy] = _mm512_reduce_add_ps(tot[n]);
}

static int vbmi_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi");
}

static int lut_state = -1; /* the byte-table decode (TILEMEM_FP8_LUT) */

static int lut_on(void) { return path_on(&lut_state, "TILEMEM_FP8_LUT", vbmi_supported); }

int tmp_fp8_lut_path(int set) {
    path_set(&lut_state, set, vbmi_supported);
    return lut_on();
}

TARGET_VBMI static void rows_lut(int nt, const uint8_t *w, int64_t ldw, int64_t nrows, const uint16_t *xb,
                                 int64_t ldxb, int64_t C, const float *sc, float *y, int64_t ldy) {
    const lut_regs t = lut_load();
#define ROWS(NT)                                                                                                   \
    case NT:                                                                                                       \
        for (int64_t i = 0; i < nrows; i++) rowN_lut(NT, w + i * ldw, xb, ldxb, C, sc, y + i, ldy, &t);             \
        break;
    switch (nt) {
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
    }
#undef ROWS
}

/* Per-thread scratch for the split xs, grown as needed (never freed: a few KB a thread). */
static __thread uint16_t *scratch;
static __thread int64_t scratch_len;

/* At least len uint16 of scratch (64-byte aligned); 0 if it could not be allocated. */
static int grow_scratch(int64_t len) {
    if (scratch_len >= len) return 1;
    uint16_t *p = aligned_alloc(64, (size_t)len * sizeof(uint16_t));
    if (p == NULL) return 0;
    free(scratch);
    scratch = p;
    scratch_len = len;
    return 1;
}

TARGET int fp8_bf16_rows1(const uint8_t *w, int64_t ldw, int64_t nrows, const float *xs, int64_t Cp, int64_t C,
                          float *y) {
    const int64_t Cp32 = (C + 31) & ~(int64_t)31;
    if (!grow_scratch(3 * Cp32)) return 0;
    split_xs(xs, Cp, Cp32, scratch);
    const __m512i sub = _mm512_load_si512((const __m512i *)SUBNORMAL);
    for (int64_t i = 0; i < nrows; i++) row1(w + i * ldw, scratch, C, y + i, sub);
    return 1;
}

/* fp8_bf16_xprep's x: its rows' bf16 bits in scratch (row stride prep_ld, zero from C to a multiple of 64). */
static __thread int prep_nt;
static __thread int64_t prep_C, prep_ld;

TARGET int fp8_bf16_xprep(int nt, const float *const *xr, int64_t C) {
    const int64_t Cp64 = (C + 63) & ~(int64_t)63, Cb = (C + 127) / 128;
    prep_nt = 0;
    if (nt < 1 || nt > MAXT) return 0;
    for (int n = 0; n < nt; n++)
        if (!bf16_valued(xr[n], C, 1, C)) return 0;
    if (!grow_scratch(nt * Cp64 + 2 * Cb + 32)) return 0; /* then the scale row's Cb floats */
    for (int n = 0; n < nt; n++)
        for (int64_t c = 0; c < Cp64; c += 16) {
            const __mmask16 m = C - c >= 16 ? 0xFFFF : C > c ? (__mmask16)((1u << (C - c)) - 1) : 0;
            const __m512i v = _mm512_srli_epi32(_mm512_castps_si512(_mm512_maskz_loadu_ps(m, xr[n] + c)), 16);
            _mm256_store_si256((__m256i *)(scratch + n * Cp64 + c), _mm512_cvtepi32_epi16(v));
        }
    prep_nt = nt, prep_C = C, prep_ld = Cp64;
    return 1;
}

TARGET void fp8_bf16_rows_prepped(const uint8_t *w, int64_t ldw, int64_t nrows, const float *sr, const float *mul,
                                  float *y, int64_t ldy) {
    const int nt = prep_nt;
    const int64_t C = prep_C, ld = prep_ld, Cb = (C + 127) / 128;
    const uint16_t *xb = scratch;
    float *sc = (float *)(scratch + nt * ld); /* a multiple of 64 uint16: 64-byte aligned */
    for (int64_t cb = 0; cb < Cb; cb++) sc[cb] = sr[cb] * 256.0f;
    if (lut_on()) {
        rows_lut(nt, w, ldw, nrows, xb, ld, C, sc, y, ldy);
    } else {
        const __m512i sub = _mm512_load_si512((const __m512i *)SUBNORMAL);
#define ROWS(NT)                                                                                                   \
    case NT:                                                                                                       \
        for (int64_t i = 0; i < nrows; i++) rowN_bf16x(NT, w + i * ldw, xb, ld, C, sc, y + i, ldy, sub);            \
        break;
        switch (nt) {
            ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
        }
#undef ROWS
    }
    if (mul)
        for (int n = 0; n < nt; n++)
            for (int64_t i = 0; i < nrows; i++) y[n * ldy + i] *= mul[n];
}
