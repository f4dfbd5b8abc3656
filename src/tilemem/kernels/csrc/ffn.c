/* Gated FFN tasks: out[tok] += scale * down(act(gate x) * up x) over a neuron range, fused: decode-sized
 * tasks by register-blocked dot products, prefill-sized ones (GEMM_MIN tokens or more) by the GEMM. */
#include "dot.h"
#include "internal.h"

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
    int fused = tk->cdown && tk->ntok <= TB; /* a few tokens: x12 rows decoded in registers */
    const uint16_t *dw = fused ? NULL : rows_of(tk->down, tk->cdown, d, R, &ld, wb);
    for (int64_t j0 = 0; j0 < tk->ntok; j0 += TB) {
      int mt = tk->ntok - j0 < TB ? (int)(tk->ntok - j0) : TB;
      const uint16_t *hs[TB];
      for (int j = 0; j < mt; j++) hs[j] = hq + (j0 + j) * tk->n;
      if (fused && mt == 1)
        dot_1_x12(tk->cdown, d, R, hs[0], res);
      else if (fused)
        dot_n_x12(tk->cdown, d, R, hs, mt, res);
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

/* The plan of no tasks (nothing to free). */
void ffn_plan_none(ffn_plan *fp, int64_t D) {
  memset(fp, 0, sizeof(*fp));
  fp->offs = fp->poff = fp->ioff = fp->nextp = fp->none;
  fp->kmax = D;
}

/* Plans tasks for ffn_tasks_body; on TM_ENOMEM, fp is the plan of no tasks (free it all the same). */
int ffn_plan_make(const tm_ffn_task *tasks, int64_t ntasks, int64_t D, ffn_plan *fp) {
  ffn_plan_none(fp, D);
  int64_t *offs = (int64_t *)malloc(sizeof(int64_t) * (ntasks + 1) * 4);
  if (!offs) return TM_ENOMEM;
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
  fp->offs = offs, fp->poff = poff, fp->ioff = ioff, fp->nextp = nextp;
  fp->any_t = any_t, fp->any_c = any_c, fp->kmax = kmax, fp->gmax = gmax;
  return TM_OK;
}

void ffn_plan_free(ffn_plan *fp) {
  if (fp->offs != fp->none) free(fp->offs);
  fp->offs = fp->poff = fp->ioff = fp->nextp = fp->none;
}

/* The tasks' FFNs, run by every thread of the enclosing parallel region (see tm_ffn_tasks_bf16); fp: the
 * tasks' plan (ffn_plan_make), shared. Tasks of GEMM_MIN tokens or more (checkpoint layout) go through the
 * GEMMs as work items, with the gate/up output packed straight into the down GEMM's layout; the others
 * split by a static row range. A thread without memory for its buffers sets *err (see set_failed) and
 * computes nothing, but meets every barrier and work-sharing loop, so the others finish the call. */
void ffn_tasks_body(const uint16_t *x, float *out, int64_t T, int64_t D, const tm_ffn_task *tasks, int64_t ntasks,
                    int act, const ffn_plan *fp, float *scratch, uint16_t *h, int *err) {
  const int64_t *offs = fp->offs, *poff = fp->poff, *ioff = fp->ioff, *nextp = fp->nextp;
  const int any_t = fp->any_t, any_c = fp->any_c;
  const int64_t kmax = fp->kmax, gmax = fp->gmax;
  int nt = omp_get_num_threads(), t = omp_get_thread_num();
  float *yp = t == 0 ? out : scratch + (int64_t)(t - 1) * T * D; /* partial sums (transposed down) */
  if (t && any_t) memset(yp, 0, sizeof(float) * T * D);
  float res[4][TB], res2[4][TB];
  /* GEMM buffers only where a task takes the GEMM (gmax > 0): decode calls this once per layer */
  float *go = gmax ? (float *)aligned_alloc(64, sizeof(float) * 2 * GEMM_ROWS_MAX * GB) : NULL;
  float *uo = go ? go + GEMM_ROWS_MAX * GB : NULL;
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
  /* without its buffers a thread skips its work (the call fails), but not the barriers and shared loops */
  const int bad = (gmax && (!go || !pk || !units || !first)) || (any_c && !wb) || (ioff[ntasks] && !ph);
  if (bad) set_failed(err);
  /* phase 1a: the other tasks, each thread its neuron range: gate/up, activation, transposed downs */
  for (int64_t q = 0; q < ntasks && !bad; q++) {
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
        int fused = tk->cgate && tk->ntok <= TB; /* a few tokens: x12 rows decoded in registers */
        const uint16_t *gw = fused ? NULL : rows_of(tk->gate, tk->cgate, i, R, &ld, wb);
        const uint16_t *uw = fused ? NULL : rows_of(tk->up, tk->cup, i, R, &ldu, wb + 4 * D);
        for (int64_t j0 = 0; j0 < tk->ntok; j0 += TB) {
          int mt = tk->ntok - j0 < TB ? (int)(tk->ntok - j0) : TB;
          const uint16_t *xs[TB];
          for (int j = 0; j < mt; j++) xs[j] = x + (int64_t)tk->tok[j0 + j] * D;
          if (fused && mt == 1) {
            gu_pair_x12(tk->cgate, tk->cup, i, R, xs[0], res, res2);
          } else if (fused) {
            dot_n_x12(tk->cgate, i, R, xs, mt, res);
            dot_n_x12(tk->cup, i, R, xs, mt, res2);
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
      if (bad) continue;
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
      if (bad) continue;
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
  } else if (!bad) {
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
  if (amx_ready) amx_release();
}

/* h: per task, ntok x n bf16 activations (the caller sizes it: sum of n * ntok). scratch: (threads-1) x T x D
 * fp32 per-thread partial sums for transposed-down tasks. out [T, D] fp32 is accumulated into. */
int tm_ffn_tasks_bf16(const uint16_t *x, float *out, int64_t T, int64_t D, const tm_ffn_task *tasks,
                      int64_t ntasks, int act, int nthreads, float *scratch, uint16_t *h) {
  ffn_plan fp;
  int err = ffn_plan_make(tasks, ntasks, D, &fp);
  if (err == TM_OK) {
#pragma omp parallel num_threads(nthreads)
    ffn_tasks_body(x, out, T, D, tasks, ntasks, act, &fp, scratch, h, &err);
  }
  ffn_plan_free(&fp);
  return err;
}
