/* The prefill fp8 GEMM on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids): y = x @ W^T with exact products.
 *
 * Why exact: e4m3 -> bf16 is exact (fp8_bf16.h), and the activations entering a linear layer or an expert of a
 * bf16 model are bf16 values (the Python side widens them to fp32), so VDPBF16PS multiplies them exactly and
 * accumulates in fp32, as the fp32 FMA paths do: only the summation order differs; so are an FFN's hidden
 * activations in a bf16 model (bf16_h: rounded to bf16 as the bf16 kernels round them, stored as bf16). x that is
 * not all bf16 values (an fp32 model's activations, hidden ones too) multiplies the same decoded weights in fp32
 * FMAs instead, each bf16 pair widened to two fp32 vectors by a shift and a mask (4 FMAs where VDPBF16PS takes 2;
 * three bf16 parts, hi + mid + lo, as fp8_avx512.c splits x, take 6: measured 1.5x slower); the caller says whether
 * it takes that (`fp32_x`) or keeps its own path. (VDPBF16PS reads a bf16 denormal h, below 2^-126, as zero.)
 *
 * Layout: each thread owns a range of 32-row panels of W (one 128-row scale block holds four). A panel is
 * decoded once into bf16 pairs laid out for VDPBF16PS, pan[kp][32]: lane i of vector (kp, h) is row 16h + i's
 * columns 2kp, 2kp + 1 (16 rows x 16 column pairs of e4m3 transposed in registers, then decoded); x is copied
 * once per call to rows of Cp + 32 values (Cp = C rounded up to even, zero-padded; the 32 more keep a tile's rows
 * off one L1 set where Cp is a multiple of 2048), bf16 or fp32, whose pairs are broadcast. A register tile is 32
 * rows x NT tokens (2 NT accumulators); per 128-column block its sums are scaled by the block's scale (times 256:
 * the decoded weights are e4m3 / 256) into y, fp32, in column-block order.
 *
 * Shapes: N tokens, W [R, C], x [N, C], y [N, R]; KP = Cp / 2 column pairs.
 */
#include "fp8.h"
#include "fp8_bf16.h"
#include "fp8_internal.h"
#include "torch_rows.h"

#include <omp.h>
#include <stdlib.h>

#include "ffn_common.h"

#define PANEL 32 /* rows of W a panel: two 16-lane vectors */
#define GT 8     /* tokens a register tile: 2 x 8 accumulators, 2 weight vectors, a broadcast */

/* a[i][k] -> b[k][i] for a 16 x 16 block of 16-bit elements (e4m3 column pairs of 16 rows), in registers: 64
 * 256-bit shuffles, a third of the 512-bit ones a transpose of the decoded pairs (32-bit) takes. */
TARGET static inline void transpose16x16_epi16(const __m256i a[16], __m256i b[16]) {
    __m256i p[8], q[8], v[4][4];
    for (int i = 0; i < 8; i++) { /* lane L: (row 2i, row 2i + 1) of elements 0..3 (p), 4..7 (q), + 8L */
        p[i] = _mm256_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        q[i] = _mm256_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
    }
    for (int j = 0; j < 4; j++) { /* v[j][m], lane L: rows 4j..4j+3 of elements 2m, 2m + 1 (+ 8L) */
        v[j][0] = _mm256_unpacklo_epi32(p[2 * j], p[2 * j + 1]);
        v[j][1] = _mm256_unpackhi_epi32(p[2 * j], p[2 * j + 1]);
        v[j][2] = _mm256_unpacklo_epi32(q[2 * j], q[2 * j + 1]);
        v[j][3] = _mm256_unpackhi_epi32(q[2 * j], q[2 * j + 1]);
    }
    for (int m = 0; m < 4; m++) { /* rows 8o..8o+7 of element e in lane 0, of e + 8 in lane 1 */
        const __m256i w00 = _mm256_unpacklo_epi64(v[0][m], v[1][m]), w01 = _mm256_unpackhi_epi64(v[0][m], v[1][m]);
        const __m256i w10 = _mm256_unpacklo_epi64(v[2][m], v[3][m]), w11 = _mm256_unpackhi_epi64(v[2][m], v[3][m]);
        b[2 * m] = _mm256_permute2x128_si256(w00, w10, 0x20);
        b[2 * m + 8] = _mm256_permute2x128_si256(w00, w10, 0x31);
        b[2 * m + 1] = _mm256_permute2x128_si256(w01, w11, 0x20);
        b[2 * m + 9] = _mm256_permute2x128_si256(w01, w11, 0x31);
    }
}

/* pan[kp][32] (KP16 = KP rounded up to 16 pairs) = rows [0, nrows) of w as bf16 pairs (e4m3 / 256); rows past
 * nrows and columns past C are zero (masked loads: no byte past a row is read). The bytes are transposed by
 * column pairs first, then decoded: each 32 decoded bf16 are then one panel vector, in place. */
TARGET static void pack_panel(const uint8_t *w, int64_t ldw, int64_t nrows, int64_t C, int64_t KP16, uint32_t *pan) {
    const __m512i sub = _mm512_load_si512((const __m512i *)SUBNORMAL);
    for (int64_t kp0 = 0; kp0 < KP16; kp0 += 16) {
        const int64_t c0 = 2 * kp0, left = C - c0;
        const __mmask32 m = left >= 32 ? ~(__mmask32)0 : left <= 0 ? 0 : (((__mmask32)1 << left) - 1);
        for (int h = 0; h < 2; h++) {
            __m256i a[16], b[16];
            for (int i = 0; i < 16; i++) {
                const int64_t row = 16 * h + i;
                a[i] = row < nrows ? _mm256_maskz_loadu_epi8(m, w + row * ldw + c0) : _mm256_setzero_si256();
            }
            transpose16x16_epi16(a, b);
            for (int k = 0; k < 16; k++)
                _mm512_store_si512((__m512i *)(pan + (kp0 + k) * PANEL + 16 * h), decode32_bf16(b[k], sub));
        }
    }
}

/* y[n, 0:32] = sum over column blocks kb of s_kb * sum_{kp in kb} pan[kp] . xr[n][2kp:2kp+2] for NT tokens (xr[n]:
 * token n's row, bf16, or fp32 where F32); m0, m1: the rows of the panel's two halves that exist; pf: the next
 * panel's rows (row stride pfld) to prefetch, or NULL. */
TARGET static inline __attribute__((always_inline)) void gemm_tile(const int NT, const int F32, const uint32_t *pan,
                                                                  int64_t KP, const void *const *xr, const float *sr,
                                                                  float *y, int64_t ldy, __mmask16 m0, __mmask16 m1,
                                                                  const uint8_t *pf, int64_t pfld) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t kb = 0; kb * (BLOCK / 2) < KP; kb++) {
        __m512 a[GT][2];
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) a[n][0] = a[n][1] = _mm512_setzero_ps();
        const int64_t k1 = min64(KP, (kb + 1) * (BLOCK / 2));
        for (int64_t kp = kb * (BLOCK / 2); kp < k1; kp++) {
            if (pf) /* the next panel into L2, a line a step: row kp % 32, bytes 64 (kp / 32) on (KP lines in all) */
                _mm_prefetch((const char *)(pf + (kp % PANEL) * pfld + (kp / PANEL) * 64), _MM_HINT_T1);
            const __m512i w0 = _mm512_load_si512((const __m512i *)(pan + kp * PANEL));
            const __m512i w1 = _mm512_load_si512((const __m512i *)(pan + kp * PANEL + 16));
            if (F32) { /* columns 2kp (the pair's low bf16) and 2kp + 1 (high) as fp32 */
                const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16));
                const __m512 o0 = _mm512_castsi512_ps(_mm512_and_si512(w0, high));
                const __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16));
                const __m512 o1 = _mm512_castsi512_ps(_mm512_and_si512(w1, high));
#pragma GCC unroll 8
                for (int n = 0; n < NT; n++) {
                    const float *xn = (const float *)xr[n] + 2 * kp;
                    const __m512 xe = _mm512_set1_ps(xn[0]), xo = _mm512_set1_ps(xn[1]);
                    a[n][0] = _mm512_fmadd_ps(xo, o0, _mm512_fmadd_ps(xe, e0, a[n][0]));
                    a[n][1] = _mm512_fmadd_ps(xo, o1, _mm512_fmadd_ps(xe, e1, a[n][1]));
                }
            } else {
#pragma GCC unroll 8
                for (int n = 0; n < NT; n++) {
                    uint32_t pair;
                    memcpy(&pair, (const uint16_t *)xr[n] + 2 * kp, 4);
                    const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
                    a[n][0] = _mm512_dpbf16_ps(a[n][0], (__m512bh)w0, xv);
                    a[n][1] = _mm512_dpbf16_ps(a[n][1], (__m512bh)w1, xv);
                }
            }
        }
        const __m512 s = _mm512_set1_ps(sr[kb] * 256.0f);
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) {
            float *o = y + n * ldy;
            if (kb == 0) {
                _mm512_mask_storeu_ps(o, m0, _mm512_mul_ps(a[n][0], s));
                _mm512_mask_storeu_ps(o + 16, m1, _mm512_mul_ps(a[n][1], s));
            } else {
                _mm512_mask_storeu_ps(o, m0, _mm512_fmadd_ps(a[n][0], s, _mm512_maskz_loadu_ps(m0, o)));
                _mm512_mask_storeu_ps(o + 16, m1, _mm512_fmadd_ps(a[n][1], s, _mm512_maskz_loadu_ps(m1, o + 16)));
            }
        }
    }
}

#define GEMM_TILE(NT)                                                                                              \
    case NT:                                                                                                       \
        if (f32)                                                                                                   \
            gemm_tile(NT, 1, pan, KP, xr, sr, y, ldy, m0, m1, pf, pfld);                                           \
        else                                                                                                       \
            gemm_tile(NT, 0, pan, KP, xr, sr, y, ldy, m0, m1, pf, pfld);                                           \
        break;

TARGET static void gemm_tiles(int nt, int f32, const uint32_t *pan, int64_t KP, const void *const *xr, const float *sr,
                              float *y, int64_t ldy, __mmask16 m0, __mmask16 m1, const uint8_t *pf, int64_t pfld) {
    switch (nt) {
        GEMM_TILE(1)
        GEMM_TILE(2)
        GEMM_TILE(3)
        GEMM_TILE(4)
        GEMM_TILE(5)
        GEMM_TILE(6)
        GEMM_TILE(7)
        GEMM_TILE(8)
    }
}

/* Rows of x as the tiles read them: bf16 or fp32 (f32) values, row r at base + r * ld (in values). */
typedef struct {
    const void *base;
    int64_t ld;
    int f32;
} xrows;

static inline const void *xrow(xrows x, int64_t r) {
    if (x.f32) return (const float *)x.base + r * x.ld;
    return (const uint16_t *)x.base + r * x.ld;
}

/* y[j, 0:32] (row stride ldy) for the ntok tokens of a packed panel: token j's row of x is tok[j] (or j without
 * tok); the 32 rows (row stride pfld) of the panel packed next from pf on (NULL: none) are prefetched meanwhile:
 * 32 rows are more streams than the hardware follows (measured: packing from DRAM stalled on its loads). */
TARGET static void panel_tokens(const uint32_t *pan, int64_t KP, xrows x, const int32_t *tok, int64_t ntok,
                                const float *sr, float *y, int64_t ldy, __mmask16 m0, __mmask16 m1, const uint8_t *pf,
                                int64_t pfld) {
    for (int64_t n0 = 0; n0 < ntok; n0 += GT) {
        const void *xr[GT];
        const int nt = (int)min64(GT, ntok - n0);
        for (int j = 0; j < nt; j++) xr[j] = xrow(x, tok ? (int64_t)tok[n0 + j] : n0 + j);
        gemm_tiles(nt, x.f32, pan, KP, xr, sr, y + n0 * ldy, ldy, m0, m1, n0 == 0 ? pf : NULL, pfld);
    }
}

/* The masks of a panel's two 16-row halves for its nrows (<= 32) rows. */
static inline void panel_masks(int64_t nrows, __mmask16 *m0, __mmask16 *m1) {
    *m0 = nrows >= 16 ? 0xFFFF : (__mmask16)((1u << nrows) - 1);
    *m1 = nrows >= 32 ? 0xFFFF : nrows <= 16 ? 0 : (__mmask16)((1u << (nrows - 16)) - 1);
}

/* A row of C floats into Cp (even, >= C) values at o, zero from C on: bf16 (its high halves: x is bf16-valued) or,
 * f32, fp32. */
TARGET static void copy_row(const float *xr, int64_t C, int64_t Cp, int f32, void *o) {
    for (int64_t c = 0; c < Cp; c += 16) {
        const __mmask16 m = C - c >= 16 ? (__mmask16)0xFFFF : C - c <= 0 ? 0 : (__mmask16)((1u << (C - c)) - 1);
        const __mmask16 mo = Cp - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (Cp - c)) - 1);
        const __m512i v = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, xr + c));
        if (f32)
            _mm512_mask_storeu_epi32((float *)o + c, mo, v);
        else
            _mm256_mask_storeu_epi16((uint16_t *)o + c, mo, _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
    }
}

/* *buf with room for `bytes` (grown as needed, never freed: per-thread scratch), or NULL. */
static void *grow(void **buf, size_t *len, size_t bytes) {
    bytes = (bytes + 63) & ~(size_t)63;
    if (*len < bytes) {
        void *p = aligned_alloc(64, bytes);
        if (p == NULL) return NULL;
        free(*buf);
        *buf = p;
        *len = bytes;
    }
    return *buf;
}

/* The calling thread's copy of x and FFN activations, each worker's panel (the caller is also worker 0). Kept from
 * call to call: a fresh malloc of MBs is fresh pages, and zeroing them took a fifth of an FFN call's time. */
static __thread void *xb_buf, *h_buf, *panel_buf;
static __thread size_t xb_len, h_len, panel_len;

/* x [N, C] copied (by the threads of the enclosing region: an orphaned `omp for`) as the tiles read it. */
static void copy_rows(const float *x, int64_t ldx, int64_t N, int64_t C, xrows xc) {
    const int64_t Cp = (C + 1) & ~(int64_t)1;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) copy_row(x + n * ldx, C, Cp, xc.f32, (void *)xrow(xc, n));
}

TARGET int tmp_fp8_gemm_nt(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                           int64_t C, const float *scale, int64_t lds, float *y, int64_t ldy, int fp32_x,
                           int nthreads) {
    if (!fp8_bf16_on()) return TMP_EUNSUPPORTED;
    if (N <= 0 || R <= 0 || C <= 0) return TMP_OK;
    const int f32 = !bf16_valued(x, ldx, N, C);
    if (f32 && !fp32_x) return TMP_EUNSUPPORTED;
    const int64_t Cp = (C + 1) & ~(int64_t)1, KP = Cp / 2, KP16 = (KP + 15) & ~(int64_t)15, ldc = Cp + 32;
    void *xc = grow(&xb_buf, &xb_len, (size_t)(N * ldc) * (f32 ? 4 : 2));
    if (xc == NULL) return TMP_ENOMEM;
    const xrows rows = {xc, ldc, f32};
    const int64_t units = (R + PANEL - 1) / PANEL;
    const int threads = nthreads < units ? nthreads : (int)units;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        copy_rows(x, ldx, N, C, rows);
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t ua = units * t / T, ub = units * (t + 1) / T;
        uint32_t *pan = ua < ub ? grow(&panel_buf, &panel_len, (size_t)(KP16 * PANEL) * sizeof(uint32_t)) : NULL;
        if (ua < ub && pan == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t u = ua; pan != NULL && u < ub; u++) {
            const int64_t r0 = u * PANEL, nrows = min64(PANEL, R - r0);
            __mmask16 m0, m1;
            panel_masks(nrows, &m0, &m1);
            pack_panel(w + r0 * ldw, ldw, nrows, C, KP16, pan);
            const uint8_t *pf = u + 1 < ub ? w + (r0 + PANEL) * ldw : NULL;
            panel_tokens(pan, KP, rows, NULL, N, scale + (r0 / BLOCK) * lds, y + r0, ldy, m0, m1, pf, ldw);
        }
    }
    return failed ? TMP_ENOMEM : TMP_OK;
}

/* ---- gated FFN tasks by the GEMM (prefill-sized tasks, checkpoint-layout downs) ---- */

/* Row j's value i of h = v: fp32, or bf16 (rounded to nearest even, as torch rounds) where h is not f32. */
static inline void h_store(xrows h, int64_t j, int64_t i, float v) {
    if (h.f32)
        ((float *)xrow(h, j))[i] = v;
    else
        ((uint16_t *)xrow(h, j))[i] = bf16_bits(v);
}

/* Phase 1 of task tk, neuron panels [ua, ub): h[j, i] = act(gate x_j)[i] * (up x_j)[i] (row stride hs values; the
 * column past an odd n zero, for the down's pairs): fp32, or bf16 (rounded to nearest even) where h.f32 is 0; g, u:
 * [ntok, 32] scratch. */
TARGET static void ffn_gate_up(const tmp_fp8_ffn_task *tk, xrows x, int64_t D, int act, int64_t ua, int64_t ub,
                               uint32_t *pan, float *g, float *u, xrows h) {
    const int64_t KP = (D + 1) / 2, KP16 = (KP + 15) & ~(int64_t)15, n = tk->n;
    for (int64_t p = ua; p < ub; p++) {
        const int64_t r0 = p * PANEL, nrows = min64(PANEL, n - r0);
        __mmask16 m0, m1;
        panel_masks(nrows, &m0, &m1);
        pack_panel(tk->gate.w + r0 * tk->gate.ldw, tk->gate.ldw, nrows, D, KP16, pan);
        panel_tokens(pan, KP, x, tk->tok, tk->ntok, tk->gate.scale + (r0 / BLOCK) * tk->gate.lds, g, PANEL, m0, m1,
                     tk->up.w + r0 * tk->up.ldw, tk->up.ldw);
        pack_panel(tk->up.w + r0 * tk->up.ldw, tk->up.ldw, nrows, D, KP16, pan);
        const uint8_t *pf = p + 1 < ub ? tk->gate.w + (r0 + PANEL) * tk->gate.ldw : NULL;
        panel_tokens(pan, KP, x, tk->tok, tk->ntok, tk->up.scale + (r0 / BLOCK) * tk->up.lds, u, PANEL, m0, m1, pf,
                     tk->gate.ldw);
        for (int64_t j = 0; j < tk->ntok; j++) {
            for (int64_t i = 0; i < nrows; i++)
                h_store(h, j, r0 + i, ffn_act(act, g[j * PANEL + i]) * u[j * PANEL + i]);
            if (r0 + nrows == n && (n & 1)) h_store(h, j, n, 0.0f);
        }
    }
}

/* Phase 2 of task tk, output panels [ua, ub) of D: out[tok[j], d] += weight[j] * (down h_j)[d] (fp32 h: FMAs, bf16
 * h: VDPBF16PS); y: [ntok, 32] scratch. */
TARGET static void ffn_down(const tmp_fp8_ffn_task *tk, xrows hr, int64_t D, int64_t ua, int64_t ub, uint32_t *pan,
                            float *y, float *out, int64_t ldo) {
    const int64_t KP = (tk->n + 1) / 2, KP16 = (KP + 15) & ~(int64_t)15;
    for (int64_t p = ua; p < ub; p++) {
        const int64_t r0 = p * PANEL, nrows = min64(PANEL, D - r0);
        __mmask16 m0, m1;
        panel_masks(nrows, &m0, &m1);
        pack_panel(tk->down.w + r0 * tk->down.ldw, tk->down.ldw, nrows, tk->n, KP16, pan);
        const uint8_t *pf = p + 1 < ub ? tk->down.w + (r0 + PANEL) * tk->down.ldw : NULL;
        panel_tokens(pan, KP, hr, NULL, tk->ntok, tk->down.scale + (r0 / BLOCK) * tk->down.lds, y, PANEL, m0, m1, pf,
                     tk->down.ldw);
        for (int64_t j = 0; j < tk->ntok; j++) {
            float *o = out + (int64_t)tk->tok[j] * ldo + r0;
            const __m512 wt = _mm512_set1_ps(tk->weight[j]);
            _mm512_mask_storeu_ps(o, m0,
                                  _mm512_fmadd_ps(wt, _mm512_loadu_ps(y + j * PANEL), _mm512_maskz_loadu_ps(m0, o)));
            _mm512_mask_storeu_ps(o + 16, m1, _mm512_fmadd_ps(wt, _mm512_loadu_ps(y + j * PANEL + 16),
                                                              _mm512_maskz_loadu_ps(m1, o + 16)));
        }
    }
}

/* Row stride of a task's h: n rounded up to even, 16 more (off one L1 set). */
static inline int64_t h_stride(int64_t n) { return ((n + 1) & ~(int64_t)1) + 16; }

TARGET int tmp_fp8_ffn_gemm(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t T, int64_t D,
                            const tmp_fp8_ffn_task *tasks, int64_t ntasks, int act, int bf16_h, int nthreads) {
    if (!fp8_bf16_on()) return TMP_EUNSUPPORTED;
    if (act < TMP_ACT_SILU || act > TMP_ACT_RELU) return TMP_EINVAL;
    int64_t htotal = 0, nmax = 0, tmax = 0;
    for (int64_t q = 0; q < ntasks; q++) {
        const tmp_fp8_ffn_task *tk = &tasks[q];
        if (tk->down_t) return TMP_EINVAL;
        for (int64_t j = 0; j < tk->ntok; j++)
            if (tk->tok[j] < 0 || tk->tok[j] >= T) return TMP_EINVAL;
        if (tk->n <= 0 || tk->ntok <= 0) continue;
        htotal += tk->ntok * h_stride(tk->n);
        nmax = tk->n > nmax ? tk->n : nmax;
        tmax = tk->ntok > tmax ? tk->ntok : tmax;
    }
    if (htotal == 0 || D <= 0) return TMP_OK;
    const int f32 = !bf16_valued(x, ldx, T, D);
    const int64_t Dp = (D + 1) & ~(int64_t)1, ldc = Dp + 32;
    const int64_t KPmax = ((D > nmax ? D : nmax) + 1) / 2, KP16 = (KPmax + 15) & ~(int64_t)15;
    void *xc = grow(&xb_buf, &xb_len, (size_t)(T * ldc) * (f32 ? 4 : 2));
    const size_t hsize = bf16_h ? sizeof(uint16_t) : sizeof(float); /* bytes of an h value */
    char *h = grow(&h_buf, &h_len, hsize * (size_t)htotal);
    if (!xc || !h) return TMP_ENOMEM;
    const xrows rows = {xc, ldc, f32};
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nth = omp_get_num_threads();
        uint32_t *pan = grow(&panel_buf, &panel_len, (size_t)(KP16 * PANEL + 2 * tmax * PANEL) * sizeof(uint32_t));
        float *g = (float *)(pan + KP16 * PANEL), *u = g + tmax * PANEL; /* the down's y is g */
        if (pan == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        copy_rows(x, ldx, T, D, rows);
        int64_t ho = 0;
        for (int64_t q = 0; q < ntasks; q++) { /* phase 1: every task's neurons, split by panels */
            const tmp_fp8_ffn_task *tk = &tasks[q];
            if (tk->n <= 0 || tk->ntok <= 0) continue;
            const int64_t units = (tk->n + PANEL - 1) / PANEL;
            const xrows hr = {h + ho * hsize, h_stride(tk->n), !bf16_h};
            if (pan) ffn_gate_up(tk, rows, D, act, units * t / nth, units * (t + 1) / nth, pan, g, u, hr);
            ho += tk->ntok * h_stride(tk->n);
        }
#pragma omp barrier
        const int64_t units = (D + PANEL - 1) / PANEL;
        ho = 0;
        for (int64_t q = 0; q < ntasks; q++) { /* phase 2: every task's down, split by output panels */
            const tmp_fp8_ffn_task *tk = &tasks[q];
            if (tk->n <= 0 || tk->ntok <= 0) continue;
            const xrows hr = {h + ho * hsize, h_stride(tk->n), !bf16_h};
            if (pan) ffn_down(tk, hr, D, units * t / nth, units * (t + 1) / nth, pan, g, out, ldo);
            ho += tk->ntok * h_stride(tk->n);
        }
    }
    return failed ? TMP_ENOMEM : TMP_OK;
}
