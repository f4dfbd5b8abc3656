/* x12 tiles (portable, AVX2): encode a bf16 matrix [R, D] into its x12 payload and decode rows of one, byte for
 * byte and bit for bit as the torch reference (`layers/x12.py`) does. The layout: x12.h, x12_internal.h.
 *
 * Encoding: a histogram of the high bytes (scalar, threads over rows), the table (count descending, ties by
 * byte ascending, unused bytes ascending after), then each row's chunks (AVX2: packs put the low and high
 * bytes in chunk order, 16 compares find the codes) with its exceptions counted; then the rows' exception
 * offsets, and the exceptions of the rows that have any (a scalar scan of those rows).
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "x12_internal.h"

int64_t tmp_x12_payload_bytes(int64_t R, int64_t D) {
    if (!x12_shape_ok(R, D)) return -1;
    return x12_tab_offset(R, D) + 64 + 4 * (R + 1) + 4 * x12_cap(R, D);
}

/* Weight of a chunk that byte (and nibble) p holds. */
static inline int chunk_weight(int p) { return (p % 16 < 8 ? 0 : 32) + 8 * (p / 16) + p % 8; }

/* The codes of 32 high bytes h (0 where h is not in the table, found: 0xFF where it is). */
static inline __m256i codes32(__m256i h, const uint8_t table[16], __m256i *found) {
    __m256i code = _mm256_setzero_si256(), f = code;
    for (int c = 0; c < 16; c++) {
        const __m256i e = _mm256_cmpeq_epi8(h, _mm256_set1_epi8((char)table[c]));
        code = _mm256_or_si256(code, _mm256_and_si256(e, _mm256_set1_epi8((char)c)));
        f = _mm256_or_si256(f, e);
    }
    *found = f;
    return code;
}

/* Row w [D] into its low bytes lo [KP] and codes hc [KP / 2]; returns its exceptions. */
static int64_t encode_row(const uint16_t *w, int64_t D, const uint8_t table[16], const int8_t lut[256], uint8_t *lo,
                          uint8_t *hc) {
    const __m256i m = _mm256_set1_epi16(0x00FF);
    int64_t nx = 0, k = 0;
    for (; k + X12_CHUNK <= D; k += X12_CHUNK) {
        __m256i v[4], f0, f1;
        for (int q = 0; q < 4; q++) v[q] = _mm256_loadu_si256((const __m256i *)(w + k + 16 * q));
        /* packus per lane: [v0 lane, v2 lane] = weights {0-7, 32-39 | 8-15, 40-47}: chunk bytes 0-31 */
        const __m256i l0 = _mm256_packus_epi16(_mm256_and_si256(v[0], m), _mm256_and_si256(v[2], m));
        const __m256i l1 = _mm256_packus_epi16(_mm256_and_si256(v[1], m), _mm256_and_si256(v[3], m));
        const __m256i h0 = _mm256_packus_epi16(_mm256_srli_epi16(v[0], 8), _mm256_srli_epi16(v[2], 8));
        const __m256i h1 = _mm256_packus_epi16(_mm256_srli_epi16(v[1], 8), _mm256_srli_epi16(v[3], 8));
        const __m256i c0 = codes32(h0, table, &f0), c1 = codes32(h1, table, &f1);
        _mm256_storeu_si256((__m256i *)(lo + k), l0);
        _mm256_storeu_si256((__m256i *)(lo + k + 32), l1);
        _mm256_storeu_si256((__m256i *)(hc + k / 2), _mm256_or_si256(c0, _mm256_slli_epi16(c1, 4)));
        nx += 64 - __builtin_popcount((unsigned)_mm256_movemask_epi8(f0)) -
              __builtin_popcount((unsigned)_mm256_movemask_epi8(f1));
    }
    if (k < D) { /* D % 64 == 32: the last chunk's weights 32-63 are padding (low byte 0, code 0) */
        uint8_t nib[X12_CHUNK];
        for (int p = 0; p < X12_CHUNK; p++) {
            const int j = chunk_weight(p);
            const int c = j < 32 ? lut[w[k + j] >> 8] : 0;
            lo[k + p] = j < 32 ? (uint8_t)w[k + j] : 0;
            nib[p] = (uint8_t)(c < 0 ? 0 : c);
            nx += c < 0;
        }
        for (int p = 0; p < 32; p++) hc[k / 2 + p] = (uint8_t)(nib[p] | nib[p + 32] << 4);
    }
    return nx;
}

int tmp_x12_encode(const uint16_t *w, int64_t ldw, int64_t R, int64_t D, uint8_t *payload, int64_t *nexc,
                   int nthreads) {
    if (!x12_shape_ok(R, D) || ldw < D) return TMP_EINVAL;
    *nexc = 0;
    const int64_t KP = x12_kp(D), cap = x12_cap(R, D), a = x12_tab_offset(R, D);
    int64_t count[256] = {0};
    int32_t *xrow = (int32_t *)(payload + a + 64);
    uint32_t *xval = (uint32_t *)(payload + a + 64 + 4 * (R + 1));
#pragma omp parallel num_threads(nthreads)
    { /* 4 histograms: weights crowd few bins, and one bin's increments would wait on each other */
        int64_t mine[4][256] = {{0}};
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < D; c += 4) /* D % 32 == 0 */
                for (int i = 0; i < 4; i++) mine[i][w[r * ldw + c + i] >> 8]++;
#pragma omp critical
        for (int b = 0; b < 256; b++) count[b] += mine[0][b] + mine[1][b] + mine[2][b] + mine[3][b];
    }
    uint8_t table[16], taken[256] = {0};
    int8_t lut[256];
    memset(lut, -1, sizeof(lut));
    for (int c = 0; c < 16; c++) { /* count descending, ties (unused bytes included) by byte ascending */
        int best = -1;
        for (int b = 0; b < 256; b++)
            if (!taken[b] && (best < 0 || count[b] > count[best])) best = b;
        taken[best] = 1;
        table[c] = (uint8_t)best;
        lut[best] = (int8_t)c;
    }
    for (int i = 0; i < 64; i++) payload[a + i] = table[i % 16];
    /* padding between the codes and the table: zero, as the reference's zeroed payload */
    memset(payload + R * KP * 3 / 2, 0, (size_t)(a - R * KP * 3 / 2));
    int64_t total = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : total)
    for (int64_t r = 0; r < R; r++) {
        const int64_t nx = encode_row(w + r * ldw, D, table, lut, payload + r * KP, payload + R * KP + r * (KP / 2));
        xrow[r + 1] = (int32_t)(nx < cap ? nx : cap + 1); /* a count for now; offsets below */
        total += nx;
    }
    *nexc = total;
    if (total > cap) return TMP_X12_OVERFLOW;
    xrow[0] = 0;
    for (int64_t r = 0; r < R; r++) xrow[r + 1] += xrow[r];
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16)
    for (int64_t r = 0; r < R; r++) {
        if (xrow[r + 1] == xrow[r]) continue;
        uint32_t *o = xval + xrow[r];
        for (int64_t c = 0; c < D; c++) {
            const uint16_t b = w[r * ldw + c];
            if (lut[b >> 8] < 0) *o++ = (uint32_t)c << 16 | b;
        }
    }
    memset(xval + total, 0, (size_t)(4 * (cap - total)));
    return TMP_OK;
}

/* Row r of v into d [D], bit for bit. */
static void decode_row(const x12_view *v, int64_t r, __m256i tab, uint16_t *d) {
    const uint8_t *lo = v->lo + r * v->KP, *hc = v->hc + r * (v->KP / 2);
    int64_t k = 0;
    for (; k < v->D; k += X12_CHUNK) {
        __m256i w[4];
        x12_chunk(lo + k, hc + k / 2, tab, w);
        _mm256_storeu_si256((__m256i *)(d + k), w[0]);
        _mm256_storeu_si256((__m256i *)(d + k + 16), w[1]);
        if (k + X12_CHUNK <= v->D) { /* else D % 64 == 32: weights 32-63 of the last chunk are padding */
            _mm256_storeu_si256((__m256i *)(d + k + 32), w[2]);
            _mm256_storeu_si256((__m256i *)(d + k + 48), w[3]);
        }
    }
    for (int32_t i = v->xrow[r]; i < v->xrow[r + 1]; i++) d[v->xval[i] >> 16] = (uint16_t)v->xval[i];
}

int tmp_x12_decode(const uint8_t *payload, int64_t R, int64_t D, int64_t r0, int64_t nrows, uint16_t *dst,
                   int64_t ldd, int nthreads) {
    if (!x12_shape_ok(R, D) || r0 < 0 || nrows < 0 || r0 + nrows > R || ldd < D) return TMP_EINVAL;
    const x12_view v = x12_view_of(payload, R, D);
    if (!x12_valid(&v, r0, r0 + nrows)) return TMP_EINVAL;
    const __m256i tab = _mm256_loadu_si256((const __m256i *)v.tab);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < nrows; i++) decode_row(&v, r0 + i, tab, dst + i * ldd);
    return TMP_OK;
}
