/* Prefill-sized matmuls on K-quant weights (Q4_K, Q5_K, Q6_K) and Q8_0 (its own section below) with 8-bit integer
 * products: y = x @ W^T, the activations quantized as the fast path quantizes them (tmg_quantize_rows: int8 per
 * 256 with d and sums per 16; Q8_0: per 32).
 *
 * Why not the fast path's row kernel: there each maddubs (32 products into 16 int16 pair sums) is followed by one
 * madd applying the sub-block's scale, and Zen 1 runs both on its one vector-multiply pipe: 40.6 G products/s on
 * 2 threads (benchmarks/cpu_peak.py, a 2-core Zen 1), about the fp32 FMA ceiling of tmg_matmul_dq. Here a 32-byte weight vector
 * holds RP = 8 rows x 4 consecutive k (row r in bytes 4r..4r+3), times one token's 4 int8 activations broadcast:
 * its 16 int16 pair sums are 2 per row, so the vectors of a sub-block (same scale, same rows) add in int16 before
 * the one madd by the scales (lanes 2r, 2r + 1: row r's), whose int32 lane r is row r's scaled sub-block dot.
 * int16 bounds (a lane sums 2 products per vector, |x| <= 127):
 *   Q4_K (q 0..15): the 8 vectors of a 32-weight sub-block, 16 x 15 x 127 = 30480: 8 maddubs a madd;
 *   Q5_K (q 0..31): 4 vectors, 8 x 31 x 127 = 31496 (8 would overflow): 4 maddubs a madd;
 *   Q6_K (q - 32 in -32..31, signed, times x + 128 in 1..255 unsigned): 2 vectors, 4 x 32 x 255 = 32640: 2 a madd,
 *        and the + 128 taken back per row and block: -128 sum_s scale_s sum_k (q_k - 32), from the weights alone.
 * Q4_K and Q5_K's mins: dmin * sum_g min_g * (sum of x over group g), 4 madds a block and token.
 *
 * Each thread decodes a panel of RP rows at a time into its buffer in that layout (the blocks' 32-byte chunks of 8
 * rows transposed by 4-byte words, then group_q's decoding), with the scales laid out to match the lanes, then
 * multiplies it by every token, TQ tokens a register block: acc[n] (fp32, lane r = row r) += d_r * dx_n * (int32
 * lane r) per block. The fp32 accumulators' lanes are the panel's rows: the output is 8 contiguous floats.
 *
 * Shapes: N tokens, W [R, C] (nb = C / 256 blocks a row), x [N, C], y [N, R]; a panel: q [nb, 64, 32] (vector
 * 8g + j of block b: rows' weights 32g + 4j .. + 3), sc [nb, NS, 16] int16 (NS sub-blocks: 8, or 16 for Q6_K),
 * mn [nb, 4, 16] int16 (lanes 2r + e of vector m: row r's min of group 2m + e), d, dmin [nb, 8] fp32, corr [nb, 8]
 * int32 (Q6_K's + 128 taken back).
 */
#include "ggml_quant.h"
#include "ggml_quant_internal.h"

#include <omp.h>
#include <stdlib.h>

#define RP 8 /* rows a panel: one int32 / fp32 lane each */
#define TQ 4 /* tokens a register block: 4 int16 sums + 4 int32 + 4 fp32 accumulators + weight, x, scales */

typedef struct {
    uint8_t *q;
    int16_t *sc, *mn;
    float *d, *dmin;
    int32_t *corr;
} q8_panel;

INLINE int subs_of(const int TY) { return TY == T_Q6_K ? 16 : 8; }

/* The 32-byte chunks at `off` of 8 blocks (rows) transposed by 4-byte words: tb + ts j + off gets word j of each
 * row (row r in bytes 4r..4r+3). Unpacks within 128-bit lanes, then the halves exchanged by inserts (Zen 1's
 * vperm2i128 is 8 uops). */
INLINE void transpose_chunk(const uint8_t *const blk[RP], int off, uint8_t *tb, const int ts) {
    __m256i a[RP];
    for (int h = 0; h < RP; h += 4) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(blk[h] + off));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(blk[h + 1] + off));
        const __m256i v2 = _mm256_loadu_si256((const __m256i *)(blk[h + 2] + off));
        const __m256i v3 = _mm256_loadu_si256((const __m256i *)(blk[h + 3] + off));
        const __m256i t0 = _mm256_unpacklo_epi32(v0, v1), t1 = _mm256_unpackhi_epi32(v0, v1);
        const __m256i t2 = _mm256_unpacklo_epi32(v2, v3), t3 = _mm256_unpackhi_epi32(v2, v3);
        a[h] = _mm256_unpacklo_epi64(t0, t2); /* rows h..h+3: word 0 | word 4 */
        a[h + 1] = _mm256_unpackhi_epi64(t0, t2);
        a[h + 2] = _mm256_unpacklo_epi64(t1, t3);
        a[h + 3] = _mm256_unpackhi_epi64(t1, t3);
    }
    for (int j = 0; j < 4; j++) {
        const __m256i lo = _mm256_inserti128_si256(a[j], _mm256_castsi256_si128(a[4 + j]), 1);
        const __m256i hi = _mm256_inserti128_si256(a[4 + j], _mm256_extracti128_si256(a[j], 1), 0);
        _mm256_storeu_si256((__m256i *)(tb + ts * j + off), lo);
        _mm256_storeu_si256((__m256i *)(tb + ts * (j + 4) + off), hi);
    }
}

/* Block b of rows blk[0..7] into the panel P. */
INLINE void unpack_block(const int TY, const uint8_t *const blk[RP], int64_t b, const q8_panel *P) {
    uint8_t tb[RP * 256] __attribute__((aligned(32))); /* 8 word-transposed blocks: group_q reads them as blocks */
    static const int chunks_q4[] = {16, 48, 80, 112}, chunks_q5[] = {16, 48, 80, 112, 144};
    static const int chunks_q6[] = {0, 32, 64, 96, 128, 160};
    const int *ch = TY == T_Q4_K ? chunks_q4 : TY == T_Q5_K ? chunks_q5 : chunks_q6;
    const int nch = TY == T_Q4_K ? 4 : TY == T_Q5_K ? 5 : 6;
    for (int c = 0; c < nch; c++) transpose_chunk(blk, ch[c], tb, 256);
    uint8_t *q = P->q + b * 2048;
    const int NS = subs_of(TY);
    int16_t *sc = P->sc + b * NS * 16;
    __m256i corr = _mm256_setzero_si256();
    for (int r = 0; r < RP; r++) {
        if (TY == T_Q6_K) {
            P->d[b * RP + r] = f16(blk[r] + 208);
            for (int s = 0; s < 16; s++) sc[s * 16 + 2 * r] = sc[s * 16 + 2 * r + 1] = (int8_t)blk[r][192 + s];
        } else {
            P->d[b * RP + r] = f16(blk[r]), P->dmin[b * RP + r] = f16(blk[r] + 2);
            uint32_t u[4];
            unpack_k4(blk[r] + 4, u);
            const uint8_t *su = (const uint8_t *)u; /* 8 scales, 8 mins */
            for (int g = 0; g < 8; g++) sc[g * 16 + 2 * r] = sc[g * 16 + 2 * r + 1] = su[g];
            for (int g = 0; g < 8; g++) P->mn[(b * 4 + g / 2) * 16 + 2 * r + (g & 1)] = su[8 + g];
        }
    }
#pragma GCC unroll 8
    for (int g = 0; g < 8; g++) {
        __m256i ones_sum = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            __m256i v = group_q(TY, tb + 256 * j, g);
            if (TY == T_Q6_K) { /* signed q - 32, and its sums per sub-block (of 4 vectors) for corr */
                v = _mm256_sub_epi8(v, _mm256_set1_epi8(32));
                ones_sum = _mm256_add_epi16(ones_sum, _mm256_maddubs_epi16(_mm256_set1_epi8(1), v));
                if ((j & 3) == 3) {
                    const __m256i s = _mm256_loadu_si256((const __m256i *)(sc + (2 * g + j / 4) * 16));
                    corr = _mm256_add_epi32(corr, _mm256_madd_epi16(ones_sum, s));
                    ones_sum = _mm256_setzero_si256();
                }
            }
            _mm256_storeu_si256((__m256i *)(q + 32 * (8 * g + j)), v);
        }
    }
    if (TY == T_Q6_K) /* -128 * corr */
        _mm256_storeu_si256((__m256i *)(P->corr + b * RP), _mm256_sub_epi32(_mm256_setzero_si256(),
                                                                           _mm256_slli_epi32(corr, 7)));
}

INLINE void unpack_q8_0(const uint8_t *const blk[RP], int64_t b, const q8_panel *P); /* below, with Q8_0 */

/* Panel p of W (rows p * RP .. p * RP + RP of R rows of ldw bytes, nb blocks of TY each; past R the last row
 * again, unused) unpacked into P block by block; returns how many rows are real. */
INLINE int unpack_panel(const int TY, const uint8_t *w, int64_t ldw, int64_t R, int64_t nb, int64_t p,
                        const q8_panel *P) {
    const int64_t r0 = p * RP, BB = bb_of(TY);
    const int nr = (int)gmin64(RP, R - r0);
    const uint8_t *rows[RP];
    for (int r = 0; r < RP; r++) rows[r] = w + (r0 + (r < nr ? r : nr - 1)) * ldw;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk[RP];
        for (int r = 0; r < RP; r++) blk[r] = rows[r] + b * BB;
        if (TY == T_Q8_0)
            unpack_q8_0(blk, b, P);
        else
            unpack_block(TY, blk, b, P);
    }
    return nr;
}

/* A panel's outputs for NT tokens: acc[n]'s first nr lanes (nr <= RP rows) to y[n * ldy + 0..nr). */
INLINE void store_panel(const int NT, const __m256 *acc, int nr, float *y, int64_t ldy) {
    for (int n = 0; n < NT; n++) {
        if (nr == RP) {
            _mm256_storeu_ps(y + n * ldy, acc[n]);
        } else {
            float out[RP];
            _mm256_storeu_ps(out, acc[n]);
            for (int r = 0; r < nr; r++) y[n * ldy + r] = out[r];
        }
    }
}

/* One block b of the panel P for NT tokens: xq[n] (int8, or uint8 x + 128 for Q6_K) and xs[n] (int16 sums per 32)
 * point at the block's start in token n's rows, dx[n] its scale. */
INLINE void block_dot(const int TY, const int NT, const q8_panel *P, int64_t b, const uint8_t *const xq[TQ],
                      const int16_t *const xs[TQ], const float dx[TQ], __m256 acc[TQ]) {
    const int NS = subs_of(TY), VS = 64 / NS; /* sub-blocks, vectors a sub-block */
    const int AD = TY == T_Q6_K ? 2 : 4; /* vectors summed in int16 before a madd (Q4_K: 8 fit, 4 measured faster) */
    const uint8_t *wq = P->q + b * 2048;
    __m256i ia[TQ];
#pragma GCC unroll 4
    for (int n = 0; n < NT; n++) ia[n] = _mm256_setzero_si256();
    for (int s = 0; s < NS; s++) {
        const __m256i sc = _mm256_loadu_si256((const __m256i *)(P->sc + (b * NS + s) * 16));
#pragma GCC unroll 8
        for (int a = 0; a < VS; a += AD) {
            __m256i s16[TQ];
#pragma GCC unroll 8
            for (int v = a; v < a + AD; v++) {
                const int jv = s * VS + v; /* vector of the block: weights 4 jv .. 4 jv + 3 */
                const __m256i w = _mm256_loadu_si256((const __m256i *)(wq + 32 * jv));
#pragma GCC unroll 4
                for (int n = 0; n < NT; n++) {
                    int32_t x4;
                    memcpy(&x4, xq[n] + 4 * jv, 4);
                    const __m256i xb = _mm256_set1_epi32(x4);
                    const __m256i p = TY == T_Q6_K ? _mm256_maddubs_epi16(xb, w) : _mm256_maddubs_epi16(w, xb);
                    s16[n] = v == a ? p : _mm256_add_epi16(s16[n], p);
                }
            }
#pragma GCC unroll 4
            for (int n = 0; n < NT; n++) ia[n] = _mm256_add_epi32(ia[n], _mm256_madd_epi16(s16[n], sc));
        }
    }
    const __m256 dw = _mm256_loadu_ps(P->d + b * RP);
#pragma GCC unroll 4
    for (int n = 0; n < NT; n++) {
        const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(dx[n]));
        if (TY == T_Q6_K) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)(P->corr + b * RP));
            acc[n] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(_mm256_add_epi32(ia[n], c)), acc[n]);
        } else {
            __m256i mi = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int m = 0; m < 4; m++) { /* lanes 2r + e: row r's min of group 2m + e times that group's x sum */
                int32_t s2;
                memcpy(&s2, xs[n] + 2 * m, 4);
                const __m256i mv = _mm256_loadu_si256((const __m256i *)(P->mn + (b * 4 + m) * 16));
                mi = _mm256_add_epi32(mi, _mm256_madd_epi16(mv, _mm256_set1_epi32(s2)));
            }
            acc[n] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(ia[n]), acc[n]);
            const __m256 dm = _mm256_mul_ps(_mm256_loadu_ps(P->dmin + b * RP), _mm256_set1_ps(dx[n]));
            acc[n] = _mm256_fnmadd_ps(dm, _mm256_cvtepi32_ps(mi), acc[n]);
        }
    }
}

/* Tokens n0 .. n0 + NT of the panel (rows r0 .. r0 + nr) into y. */
INLINE void panel_tokens(const int TY, const int NT, const q8_panel *P, int64_t nb, const uint8_t *xq, int64_t ldq,
                         const int16_t *xs, int64_t lds, const float *xd, int64_t ldd, int64_t n0, float *y,
                         int64_t ldy, int64_t r0, int nr) {
    __m256 acc[TQ];
#pragma GCC unroll 4
    for (int n = 0; n < NT; n++) acc[n] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xqb[TQ] = {0};
        const int16_t *xsb[TQ] = {0};
        float dx[TQ] = {0};
        for (int n = 0; n < NT; n++) {
            xqb[n] = xq + (n0 + n) * ldq + 256 * b;
            xsb[n] = xs + (n0 + n) * lds + 8 * b;
            dx[n] = xd[(n0 + n) * ldd + b];
        }
        block_dot(TY, NT, P, b, xqb, xsb, dx, acc);
    }
    store_panel(NT, acc, nr, y + n0 * ldy + r0, ldy);
}

/* Rows of W in panels of RP (panels [p0, p1)), every token. */
INLINE void panels(const int TY, const uint8_t *w, int64_t ldw, int64_t R, int64_t nb, int64_t p0, int64_t p1,
                   const q8_panel *P, const uint8_t *xq, int64_t ldq, const int16_t *xs, int64_t lds, const float *xd,
                   int64_t ldd, int64_t N, float *y, int64_t ldy) {
    for (int64_t p = p0; p < p1; p++) {
        const int64_t r0 = p * RP;
        const int nr = unpack_panel(TY, w, ldw, R, nb, p, P);
        int64_t n0 = 0;
        for (; n0 + TQ <= N; n0 += TQ) panel_tokens(TY, TQ, P, nb, xq, ldq, xs, lds, xd, ldd, n0, y, ldy, r0, nr);
        switch (N - n0) {
        case 1: panel_tokens(TY, 1, P, nb, xq, ldq, xs, lds, xd, ldd, n0, y, ldy, r0, nr); break;
        case 2: panel_tokens(TY, 2, P, nb, xq, ldq, xs, lds, xd, ldd, n0, y, ldy, r0, nr); break;
        case 3: panel_tokens(TY, 3, P, nb, xq, ldq, xs, lds, xd, ldd, n0, y, ldy, r0, nr); break;
        }
    }
}

#define PANELS(NAME, TY)                                                                                           \
    static void panels_##NAME(const uint8_t *w, int64_t ldw, int64_t R, int64_t nb, int64_t p0, int64_t p1,        \
                              const q8_panel *P, const uint8_t *xq, int64_t ldq, const int16_t *xs, int64_t lds,   \
                              const float *xd, int64_t ldd, int64_t N, float *y, int64_t ldy) {                    \
        panels(TY, w, ldw, R, nb, p0, p1, P, xq, ldq, xs, lds, xd, ldd, N, y, ldy);                                \
    }
PANELS(q4_k, T_Q4_K)
PANELS(q5_k, T_Q5_K)
PANELS(q6_k, T_Q6_K)

/* ---- Q8_0: blocks of 32 int8 weights, one fp16 scale d; x quantized per 32 ----
 * A block's 8 vectors (8 rows x 4 weights each) times one token's int8 x: the products of a block cannot add in
 * int16 (one maddubs pair sum of s8 x s8 reaches 2 x 128 x 127), so each vector's products go into int32 lanes:
 *   VNNI (AVX512-VL + VNNI, chosen at run time): one vpdpbusd a vector, x + 128 (u8) times w (s8), the int32 lanes
 *     started at -128 x the row's sum of w in the block (the + 128 taken back; panel corr);
 *   AVX2: maddubs(|w|, x with w's sign), then madd by ones, then an int32 add (3 multiply-pipe ops, not 1).
 * The int32 lanes are the same integers either way (exact dot products), and the fp32 operations the same: the
 * same bits. Per block: acc (lane r = row r) += (d_w * d_x) * (float)int_dot. TILEMEM_GGML_AVX2=1 in the
 * environment picks the AVX2 kernel on a VNNI CPU too (tests compare the two).
 * Panel: q [nb, 8, 32] (vector j of block b: the rows' weights 4j .. 4j + 3), d [nb, 8], corr [nb, 8]. */

#define TQ8 8 /* tokens a register block with VNNI (32 ymm registers); AVX2: TQ */

static int q8_0_vnni(void) {
    static int ok = -1;
    if (ok < 0)
        ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    const char *off = getenv("TILEMEM_GGML_AVX2"); /* read each call: the tests set it */
    return ok && !(off != NULL && off[0] == '1');
}

/* Block b of rows blk[0..7] into the panel P. */
INLINE void unpack_q8_0(const uint8_t *const blk[RP], int64_t b, const q8_panel *P) {
    const uint8_t *qs[RP];
    for (int r = 0; r < RP; r++) qs[r] = blk[r] + 2, P->d[b * RP + r] = f16(blk[r]);
    uint8_t *q = P->q + b * 256;
    transpose_chunk(qs, 0, q, 32);
    __m256i s16 = _mm256_setzero_si256(); /* lanes 2r, 2r + 1: row r's pair sums, |.| <= 8 x 256 */
    for (int j = 0; j < 8; j++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(q + 32 * j));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_set1_epi8(1), w));
    }
    const __m256i sum = _mm256_madd_epi16(s16, _mm256_set1_epi16(1)); /* lane r: row r's sum of w */
    const __m256i corr = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum, 7));
    _mm256_storeu_si256((__m256i *)(P->corr + b * RP), corr);
}

/* Block b of the panel for NT tokens: xq[n] the block's x in token n's row (u8 x + 128 with VNNI, else s8). */
INLINE void block_dot_q8_0(const int VNNI, const int NT, const q8_panel *P, int64_t b, const uint8_t *const xq[TQ8],
                           const float dx[TQ8], __m256 acc[TQ8]) {
    const uint8_t *wq = P->q + b * 256;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i ia[TQ8];
    const __m256i c0 = VNNI ? _mm256_loadu_si256((const __m256i *)(P->corr + b * RP)) : _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) ia[n] = c0;
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(wq + 32 * j));
        const __m256i aw = _mm256_sign_epi8(w, w); /* |w| (u8: -128 -> 128) */
#pragma GCC unroll 8
        for (int n = 0; n < NT; n++) {
            int32_t x4;
            memcpy(&x4, xq[n] + 4 * j, 4);
            const __m256i xb = _mm256_set1_epi32(x4);
            if (VNNI)
                ia[n] = _mm256_dpbusd_epi32(ia[n], xb, w);
            else
                ia[n] = _mm256_add_epi32(
                    ia[n], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xb, w)), ones));
        }
    }
    const __m256 dw = _mm256_loadu_ps(P->d + b * RP);
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++)
        acc[n] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(dx[n])), _mm256_cvtepi32_ps(ia[n]), acc[n]);
}

/* Tokens n0 .. n0 + NT of the panel (rows r0 .. r0 + nr) into y. */
INLINE void panel_tokens_q8_0(const int VNNI, const int NT, const q8_panel *P, int64_t nb, const uint8_t *xq,
                              int64_t ldq, const float *xd, int64_t ldd, int64_t n0, float *y, int64_t ldy, int64_t r0,
                              int nr) {
    __m256 acc[TQ8];
#pragma GCC unroll 8
    for (int n = 0; n < NT; n++) acc[n] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *xqb[TQ8] = {0};
        float dx[TQ8] = {0};
        for (int n = 0; n < NT; n++) xqb[n] = xq + (n0 + n) * ldq + 32 * b, dx[n] = xd[(n0 + n) * ldd + b];
        block_dot_q8_0(VNNI, NT, P, b, xqb, dx, acc);
    }
    store_panel(NT, acc, nr, y + n0 * ldy + r0, ldy);
}

#define TOKENS_Q8_0(V, NT) panel_tokens_q8_0(V, NT, P, nb, xq, ldq, xd, ldd, n0, y, ldy, r0, nr)

/* Panels [p0, p1) of W's rows, every token. */
INLINE void panels_q8_0(const int VNNI, const uint8_t *w, int64_t ldw, int64_t R, int64_t nb, int64_t p0, int64_t p1,
                        const q8_panel *P, const uint8_t *xq, int64_t ldq, const float *xd, int64_t ldd, int64_t N,
                        float *y, int64_t ldy) {
    const int T = VNNI ? TQ8 : TQ;
    for (int64_t p = p0; p < p1; p++) {
        const int64_t r0 = p * RP;
        const int nr = unpack_panel(T_Q8_0, w, ldw, R, nb, p, P);
        int64_t n0 = 0;
        for (; n0 + T <= N; n0 += T) {
            if (VNNI) TOKENS_Q8_0(1, TQ8);
            else TOKENS_Q8_0(0, TQ);
        }
        switch (N - n0) {
        case 1: TOKENS_Q8_0(VNNI, 1); break;
        case 2: TOKENS_Q8_0(VNNI, 2); break;
        case 3: TOKENS_Q8_0(VNNI, 3); break;
        case 4: TOKENS_Q8_0(VNNI, 4); break;
        case 5: TOKENS_Q8_0(VNNI, 5); break;
        case 6: TOKENS_Q8_0(VNNI, 6); break;
        case 7: TOKENS_Q8_0(VNNI, 7); break;
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) static void
panels_q8_0_vnni(const uint8_t *w, int64_t ldw, int64_t R, int64_t nb, int64_t p0, int64_t p1, const q8_panel *P,
                 const uint8_t *xq, int64_t ldq, const float *xd, int64_t ldd, int64_t N, float *y, int64_t ldy) {
    panels_q8_0(1, w, ldw, R, nb, p0, p1, P, xq, ldq, xd, ldd, N, y, ldy);
}

static void panels_q8_0_avx2(const uint8_t *w, int64_t ldw, int64_t R, int64_t nb, int64_t p0, int64_t p1,
                             const q8_panel *P, const uint8_t *xq, int64_t ldq, const float *xd, int64_t ldd,
                             int64_t N, float *y, int64_t ldy) {
    panels_q8_0(0, w, ldw, R, nb, p0, p1, P, xq, ldq, xd, ldd, N, y, ldy);
}

static int matmul_q8_0(const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R, int64_t C,
                       float *y, int64_t ldy, int nthreads) {
    const int64_t nb = C / 32;
    tmg_xq X;
    int status = tmg_quantize_rows(T_Q8_0, x, ldx, N, C, &X, nthreads);
    if (status != TMG_OK) return status;
    const int vnni = q8_0_vnni();
    uint8_t *xq = (uint8_t *)X.q; /* ours: x + 128 written over it for VNNI */
    const int64_t panels_n = (R + RP - 1) / RP, most = (panels_n + 3) / 4; /* at least 4 panels a thread */
    const int threads = nthreads < most ? nthreads : (int)most;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        if (vnni) {
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++)
                for (int64_t c = 0; c < C; c += 32) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(xq + n * X.ldq + c));
                    _mm256_storeu_si256((__m256i *)(xq + n * X.ldq + c),
                                        _mm256_xor_si256(v, _mm256_set1_epi8(-128)));
                }
        }
        /* one allocation: q, then d and corr (4-byte) */
        uint8_t *buf = aligned_alloc(64, (size_t)nb * (256 + 2 * RP * 4));
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            const q8_panel P = {buf,  NULL, NULL, (float *)(buf + nb * 256),
                                NULL, (int32_t *)(buf + nb * (256 + RP * 4))};
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t per = (panels_n + T - 1) / T;
            const int64_t p0 = gmin64(panels_n, t * per), p1 = gmin64(panels_n, p0 + per);
            if (vnni) panels_q8_0_vnni(w, ldw, R, nb, p0, p1, &P, xq, X.ldq, X.d, X.ldd, N, y, ldy);
            else panels_q8_0_avx2(w, ldw, R, nb, p0, p1, &P, xq, X.ldq, X.d, X.ldd, N, y, ldy);
            free(buf);
        }
    }
    free((void *)X.q);
    return failed ? TMG_ENOMEM : TMG_OK;
}

int tmg_matmul_q8(int type, const float *x, int64_t ldx, int64_t N, const uint8_t *w, int64_t ldw, int64_t R,
                  int64_t C, float *y, int64_t ldy, int nthreads) {
    if (type == T_Q8_0 && C % 32 == 0)
        return N <= 0 || R <= 0 || C <= 0 ? TMG_OK : matmul_q8_0(x, ldx, N, w, ldw, R, C, y, ldy, nthreads);
    if ((type != T_Q4_K && type != T_Q5_K && type != T_Q6_K) || C % 256) return TMG_EINVAL;
    if (N <= 0 || R <= 0 || C <= 0) return TMG_OK;
    const int64_t nb = C / 256;
    tmg_xq X;
    int status = tmg_quantize_rows(type, x, ldx, N, C, &X, nthreads);
    if (status != TMG_OK) return status;
    int16_t *xs = malloc((size_t)(N * (C / 32)) * sizeof(int16_t)); /* [N, C / 32]: sums per group of 32 */
    if (xs == NULL) {
        free((void *)X.q);
        return TMG_ENOMEM;
    }
    uint8_t *xq = (uint8_t *)X.q; /* ours: Q6_K's x + 128 written over it */
    const int64_t panels_n = (R + RP - 1) / RP, most = (panels_n + 3) / 4; /* at least 4 panels a thread */
    const int threads = nthreads < most ? nthreads : (int)most;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (type == T_Q6_K) {
                for (int64_t c = 0; c < C; c += 32) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(xq + n * C + c));
                    _mm256_storeu_si256((__m256i *)(xq + n * C + c), _mm256_xor_si256(v, _mm256_set1_epi8(-128)));
                }
            } else {
                for (int64_t g = 0; g < C / 32; g++)
                    xs[n * (C / 32) + g] = (int16_t)(X.s[n * X.lds + 2 * g] + X.s[n * X.lds + 2 * g + 1]);
            }
        }
        const int NS = type == T_Q6_K ? 16 : 8;
        /* one allocation: q, sc, mn (int16), then d, dmin, corr (4-byte) */
        const size_t bytes = (size_t)nb * (2048 + (size_t)(NS + 4) * 32 + 3 * RP * 4);
        uint8_t *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
            const q8_panel P = {buf,
                                (int16_t *)(buf + nb * 2048),
                                (int16_t *)(buf + nb * 2048 + nb * NS * 32),
                                (float *)(buf + nb * (2048 + (NS + 4) * 32)),
                                (float *)(buf + nb * (2048 + (NS + 4) * 32 + RP * 4)),
                                (int32_t *)(buf + nb * (2048 + (NS + 4) * 32 + 2 * RP * 4))};
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            const int64_t per = (panels_n + T - 1) / T;
            const int64_t p0 = gmin64(panels_n, t * per), p1 = gmin64(panels_n, p0 + per);
            const int16_t *xsp = type == T_Q6_K ? X.s : xs; /* (Q6_K reads no sums) */
            switch (type) {
            case T_Q4_K: panels_q4_k(w, ldw, R, nb, p0, p1, &P, xq, X.ldq, xsp, C / 32, X.d, X.ldd, N, y, ldy); break;
            case T_Q5_K: panels_q5_k(w, ldw, R, nb, p0, p1, &P, xq, X.ldq, xsp, C / 32, X.d, X.ldd, N, y, ldy); break;
            case T_Q6_K: panels_q6_k(w, ldw, R, nb, p0, p1, &P, xq, X.ldq, xsp, C / 32, X.d, X.ldd, N, y, ldy); break;
            }
            free(buf);
        }
    }
    free(xs);
    free((void *)X.q);
    return failed ? TMG_ENOMEM : TMG_OK;
}
