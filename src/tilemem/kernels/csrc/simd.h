/* bf16 conversions and AVX512 helpers every kernel file uses, inline (internal: not part of the ABI). */
#ifndef TILEMEM_SIMD_H
#define TILEMEM_SIMD_H

#include <immintrin.h>
#include <stdint.h>

#define TB 4 /* tokens per register block */

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

/* 16 fp32 lanes rounded to bf16 like f2bf, each in the low half of its 32-bit lane. */
static inline __m512i f2bf16(__m512 f) {
  __m512i u = _mm512_castps_si512(f), one = _mm512_set1_epi32(1);
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one))),
      16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

#endif
