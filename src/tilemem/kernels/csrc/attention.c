/* Attention: a decode step's whole attention block in one parallel region (projections, norms, rotary
 * embedding, cache write, softmax attention, o projection), and a prefill's causal attention on the
 * prefill GEMM. */
#include "dot.h"
#include "internal.h"

/* Causal attention of a prefill with no cached prefix (query i attends keys 0..i), as scaled dot-product
 * attention computes it for bf16: scores q.k in fp32, softmax in fp32, the unnormalized probabilities
 * rounded to bf16 for the P.V product (fp32 accumulation), divided by their fp32 sum at the end.
 * Both products are the prefill GEMM (gemm.c): each (batch, kv head)'s keys are packed once as token
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

int tm_attn_prefill_bf16(const uint16_t *q, int64_t sqb, int64_t sqh, int64_t sqt, const uint16_t *k,
                         const uint16_t *v, int64_t skb, int64_t skh, int64_t skt, uint16_t *out, int64_t B,
                         int64_t H, int64_t Hkv, int64_t T, int64_t hd, float scale, int nthreads) {
  int64_t ngk = task_groups(T), KPv = (T + 1) / 2, ngv = (hd + GB - 1) / GB, heads = B * Hkv;
  int64_t kwords = ngk * GB * (hd / 2), vwords = ngv * KPv * GB, qblocks = (T + AQ - 1) / AQ;
  uint32_t *pk = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (heads * (kwords + vwords) + 16));
  int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (T + GB));
  if (!pk || !idx) {
    free(idx);
    free(pk);
    return TM_ENOMEM;
  }
  uint32_t *pv = pk + heads * kwords;
  int err = TM_OK;
  for (int64_t j = 0; j < T + GB; j++) idx[j] = (int32_t)(j < T ? j : 0);
#pragma omp parallel num_threads(nthreads)
  {
    int *units = (int *)malloc(sizeof(int) * ngk);
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (ngk + 1));
    int64_t ldp = 2 * KPv + 32; /* P rows, bf16, zero-padded to the even key count */
    float *s = (float *)aligned_alloc(64, sizeof(float) * (AQ * T + AQ * GB + 16));
    float *o = s ? s + AQ * T : NULL;
    uint16_t *pr = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * AQ * ldp + 64);
    /* without its buffers a thread skips its work (the call fails), but not the shared loops */
    const int bad = !units || !first || !s || !pr;
    if (bad) set_failed(&err);
    int ngr = bad ? 0 : plan_groups(T, units, first);
#pragma omp for schedule(dynamic, 1)
    for (int64_t hh = 0; hh < heads; hh++) {
      if (bad) continue;
      const uint16_t *kh = k + (hh / Hkv) * skb + (hh % Hkv) * skh, *vh = v + (hh / Hkv) * skb + (hh % Hkv) * skh;
      pack_span(kh, skt, idx, first, 0, ngr, hd, pk + hh * kwords);
      pack_values(vh, skt, T, hd, pv + hh * vwords);
    }
    float sums[AQ];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < B * H * qblocks; it++) {
      if (bad) continue;
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
  return err;
}


static inline uint16_t addb(uint16_t a, const uint16_t *b, int64_t i) { return b ? f2bf(bf2f(a) + bf2f(b[i])) : a; }

/* x [B, D] bf16 (normed hidden states) -> out [B, D] bf16: q/k/v projections (+bias, clip, q/k RMSNorm),
 * rotary embedding (halves layout) with cos/sin [B, hd], the new k/v written to the paged cache layer
 * kc/vc [N, Hkv, bs, hd] at position pos[b] of row b, softmax attention over positions 0..pos[b], o
 * projection. Position p of row b lives in block table[b * M + p / bs] at offset p % bs (table [B, M]; the
 * slot cache [S, Hkv, L, hd] is bs = L, M = 1, table = slots). ws: bf16 scratch of
 * B * (2*H*hd + 2*Hkv*hd) elements; sc: fp32 scratch of nthreads * M * bs. Run by every thread of the
 * enclosing parallel region; out is complete after the next barrier. err: as in linear_rows. */
void attn_decode_body(const tm_attn_layer *a, const uint16_t *x, int64_t B, int64_t D, const void *cos,
                      const void *sin, uint16_t *kc, uint16_t *vc, int64_t bs, const int64_t *table, int64_t M,
                      const int64_t *pos, uint16_t *out, uint16_t *ws, float *sc, int *err) {
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
    linear_rows(x, B, D, D, w3[m], D, c3[m], r0, r1, qkv + o3[m], nqkv, 0, err);
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
      int64_t g = h - H, at = ((table[b * M + pos[b] / bs] * Hkv + g) * bs + pos[b] % bs) * hd;
      memcpy(kc + at, v, sizeof(uint16_t) * hd);
      memcpy(vc + at, qkv + b * nqkv + nq + nk + g * hd, sizeof(uint16_t) * hd);
    }
  }
  /* 4: attention of each (row, query head) over its cached positions */
  float *p = sc + (int64_t)t * M * bs;
#pragma omp for
  for (int64_t u = 0; u < B * H; u++) {
    int64_t b = u / H, h = u % H, g = h / (H / Hkv), n = pos[b] + 1;
    const int64_t *tb = table + b * M;
    const uint16_t *q = qkv + b * nqkv + h * hd;
    float mx = -INFINITY;
    const uint16_t *xs[1] = {q};
    for (int64_t l0 = 0; l0 < n; l0 += bs) { /* block by block: positions l0 .. l0 + bs - 1 */
      const uint16_t *kb = kc + (tb[l0 / bs] * Hkv + g) * bs * hd;
      int64_t nb = n - l0 < bs ? n - l0 : bs;
      for (int64_t l = 0; l < nb; l += 4) {
        int R = nb - l < 4 ? (int)(nb - l) : 4;
        float r[4][TB];
        dot_rows(kb + l * hd, hd, R, xs, 1, hd, r, 0);
        for (int i = 0; i < R; i++) {
          p[l0 + l + i] = r[i][0] * a->scale;
          mx = p[l0 + l + i] > mx ? p[l0 + l + i] : mx;
        }
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
      const uint16_t *vr = vc + ((tb[l / bs] * Hkv + g) * bs + l % bs) * hd; /* in block l / bs */
      int64_t i = 0;
      for (; i + 16 <= hd; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(_mm512_set1_ps(w), ld16f(vr + i), _mm512_loadu_ps(acc + i)));
      for (; i < hd; i++) acc[i] += w * bf2f(vr[i]);
    }
    for (int64_t i = 0; i < hd; i++) att[b * nq + h * hd + i] = f2bf(acc[i] / sum);
  }
  /* 5: o projection, rows split across threads (the implicit barrier above has every head done) */
  split(D, nt, t, 4, &r0, &r1);
  linear_rows(att, B, nq, nq, a->wo, nq, a->co, r0, r1, out, D, 0, err);
  if (a->bo)
    for (int64_t b = 0; b < B; b++)
      for (int64_t i = r0; i < r1; i++) out[b * D + i] = addb(out[b * D + i], a->bo, i);
}

int tables_ok(const int64_t *table, int64_t B, int64_t M, int64_t bs, int64_t N, const int64_t *pos) {
  for (int64_t b = 0; b < B; b++) {
    if (pos[b] < 0 || pos[b] >= M * bs) return 0;
    for (int64_t j = 0; j <= pos[b] / bs; j++)
      if (table[b * M + j] < 0 || table[b * M + j] >= N) return 0;
  }
  return 1;
}

/* One decode attention step in its own parallel region (see attn_decode_body); TM_EINVAL, nothing done,
 * where the block tables do not fit the pool of N blocks (tables_ok). */
int tm_attn_decode_bf16(const tm_attn_layer *a, const uint16_t *x, int64_t B, int64_t D, const void *cos,
                        const void *sin, uint16_t *kc, uint16_t *vc, int64_t N, int64_t bs, const int64_t *table,
                        int64_t M, const int64_t *pos, uint16_t *out, int nthreads, uint16_t *ws, float *sc) {
  if (!tables_ok(table, B, M, bs, N, pos)) return TM_EINVAL;
  int err = TM_OK;
#pragma omp parallel num_threads(nthreads)
  attn_decode_body(a, x, B, D, cos, sin, kc, vc, bs, table, M, pos, out, ws, sc, &err);
  return err;
}
