/* TESTS ONLY, never used for a real run: AVX512 intrinsics emulated by SIMDe (Debian: libsimde-dev) so
 * the kernels' tests run on a CPU without AVX512 (`make test-kernels-emulated`; TILEMEM_EMULATE_AVX512=1 in
 * tests/conftest.py puts this directory first on the include path). It includes the compiler's own
 * immintrin.h, then SIMDe's AVX512 under the native names, then replaces the few intrinsics SIMDe 0.7.4
 * lacks or sums in another order than GCC (the tests expect GCC's order). */
#ifndef TM_SHIM_IMMINTRIN
#define TM_SHIM_IMMINTRIN
#include_next <immintrin.h>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <string.h>
static inline simde__m512i tm_shim_maskz_loadu_epi16(uint32_t k, const void *p) {
  int16_t v[32];
  for (int i = 0; i < 32; i++) {
    v[i] = 0;
    if ((k >> i) & 1) memcpy(&v[i], (const char *)p + 2 * i, 2);
  }
  return simde_mm512_loadu_si512(v);
}
static inline simde__m256i tm_shim_cvtepi32_epi16(simde__m512i a) {
  simde__m512i_private x = simde__m512i_to_private(a);
  simde__m256i_private r;
  for (int i = 0; i < 16; i++) r.i16[i] = (int16_t)x.i32[i];
  return simde__m256i_from_private(r);
}
static inline simde__m512i tm_shim_cvtepu16_epi32(simde__m256i a) {
  simde__m256i_private x = simde__m256i_to_private(a);
  simde__m512i_private r;
  for (int i = 0; i < 16; i++) r.i32[i] = (int32_t)x.u16[i];
  return simde__m512i_from_private(r);
}
static inline simde__m512i tm_shim_mask_srli_epi16(simde__m512i src, uint32_t k, simde__m512i a, unsigned imm) {
  simde__m512i_private s = simde__m512i_to_private(src), x = simde__m512i_to_private(a), r;
  for (int i = 0; i < 32; i++) r.u16[i] = (k >> i) & 1 ? (imm > 15 ? 0 : (uint16_t)(x.u16[i] >> imm)) : s.u16[i];
  return simde__m512i_from_private(r);
}
static inline float tm_shim_reduce_add_ps(simde__m512 a) { /* GCC's order */
  simde__m512_private x = simde__m512_to_private(a);
  float t3[8], t6[4];
  for (int i = 0; i < 8; i++) t3[i] = x.f32[8 + i] + x.f32[i];
  for (int i = 0; i < 4; i++) t6[i] = t3[4 + i] + t3[i];
  float t80 = t6[0] + t6[2], t81 = t6[1] + t6[3];
  return t80 + t81;
}
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16(k, p) tm_shim_maskz_loadu_epi16((uint32_t)(k), (p))
#define _mm512_cvtepi32_epi16(a) tm_shim_cvtepi32_epi16(a)
#define _mm512_cvtepu16_epi32(a) tm_shim_cvtepu16_epi32(a)
#define _mm512_mask_srli_epi16(s, k, a, i) tm_shim_mask_srli_epi16((s), (uint32_t)(k), (a), (i))
#define _mm512_reduce_add_ps(a) tm_shim_reduce_add_ps(a)
#endif
