/* e4m3 -> bf16 in AVX512 registers, shared by the AVX512-BF16 fp8 kernels (fp8_avx512.c: 1 token; fp8_gemm.c:
 * prefill). Functions carry their own target (the library is built for AVX2): call them only where
 * fp8_bf16_on() says the CPU has avx512bf16. Not part of the library's interface. */
#ifndef TILEMEM_FP8_BF16_H
#define TILEMEM_FP8_BF16_H

#include <immintrin.h>
#include <stdint.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

/* bf16 bits of m * 2^-17 (an e4m3 subnormal / 256) at index m < 8 */
static const uint16_t SUBNORMAL[32] __attribute__((aligned(64))) = {
    0x0000, 0x3700, 0x3780, 0x37C0, 0x3800, 0x3820, 0x3840, 0x3860,
};

/* 32 e4m3 bytes (already loaded) -> 32 bf16 (each e4m3 / 256) in natural order. */
TARGET static inline __m512i decode32_bf16(__m256i raw, __m512i sub) {
    const __m512i v = _mm512_cvtepi8_epi16(raw); /* sign in bits 7..15, eeee at 3..6, mmm at 0..2 */
    /* (v << 4 & 0x07F0) | 0x3800: 0|0111eeee|mmm0000 */
    __m512i r = _mm512_ternarylogic_epi32(_mm512_slli_epi16(v, 4), _mm512_set1_epi16(0x07F0),
                                          _mm512_set1_epi16(0x3800), 0xEA); /* (A & B) | C */
    /* e = 0: the table by v's low 5 bits (0 0 m m m there) */
    r = _mm512_mask_permutexvar_epi16(r, _mm512_testn_epi16_mask(v, _mm512_set1_epi16(0x78)), v, sub);
    return _mm512_ternarylogic_epi32(r, v, _mm512_set1_epi16((short)0x8000), 0xF8); /* r | (v & 0x8000) */
}

/* Whether every value of x [N, C] is a bf16 number: low 16 bits zero, and not a denormal (VDPBF16PS reads those
 * as zero). */
static inline int bf16_valued(const float *x, int64_t ldx, int64_t N, int64_t C) {
    for (int64_t n = 0; n < N; n++) {
        const uint32_t *row = (const uint32_t *)(x + n * ldx);
        uint32_t low = 0;
        for (int64_t c = 0; c < C; c++) {
            const uint32_t b = row[c];
            low |= (b & 0xFFFFu) | (uint32_t)(!(b & 0x7F800000u) && (b & 0x7FFFFFFFu));
        }
        if (low) return 0;
    }
    return 1;
}

#endif
