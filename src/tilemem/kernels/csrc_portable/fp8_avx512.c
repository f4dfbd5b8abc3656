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
 */
#include "fp8.h"
#include "fp8_internal.h"
#include "fp8_bf16.h"

#include <stdlib.h>

#ifndef PARTS
#define PARTS 3 /* bf16 parts of xs multiplied (3: exact products; 2 drops the lowest 8 bits of xs) */
#endif

/* -1: not decided yet; 0: off; 1: on (the CPU has avx512bf16 and TILEMEM_FP8_BF16 is not 0). */
static int bf16_state = -1;

static int bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

int fp8_bf16_on(void) {
    int s = __atomic_load_n(&bf16_state, __ATOMIC_RELAXED);
    if (s < 0) {
        const char *env = getenv("TILEMEM_FP8_BF16");
        s = bf16_supported() && !(env && env[0] == '0' && env[1] == 0);
        __atomic_store_n(&bf16_state, s, __ATOMIC_RELAXED);
    }
    return s;
}

int tmp_fp8_bf16_path(int set) {
    if (set >= 0) __atomic_store_n(&bf16_state, set && bf16_supported(), __ATOMIC_RELAXED);
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

/* Per-thread scratch for the split xs, grown as needed (never freed: a few KB a thread). */
static __thread uint16_t *scratch;
static __thread int64_t scratch_len;

TARGET int fp8_bf16_rows1(const uint8_t *w, int64_t ldw, int64_t nrows, const float *xs, int64_t Cp, int64_t C,
                          float *y) {
    const int64_t Cp32 = (C + 31) & ~(int64_t)31;
    if (scratch_len < 3 * Cp32) {
        uint16_t *p = aligned_alloc(64, (size_t)(3 * Cp32) * sizeof(uint16_t));
        if (p == NULL) return 0;
        free(scratch);
        scratch = p;
        scratch_len = 3 * Cp32;
    }
    split_xs(xs, Cp, Cp32, scratch);
    const __m512i sub = _mm512_load_si512((const __m512i *)SUBNORMAL);
    for (int64_t i = 0; i < nrows; i++) row1(w + i * ldw, scratch, C, y + i, sub);
    return 1;
}
