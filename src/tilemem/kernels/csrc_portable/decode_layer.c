/* A decode step's run of MoE decoder layers in one call, on AVX2 + FMA + F16C: for B rows of one new token each,
 * the residual stream x [B, D] (bf16) goes through every layer of the run:
 *   x += o_proj(block(q_proj(n), k_proj(n), v_proj(n))),  n = rmsnorm(x)  (block: paged_decode.c)
 *   x += bf16(sum_k w[k] * FFN_{id[k]}(n)),               n = rmsnorm(x), ids and w from a softmax top-k router
 * and, with shared experts, x += bf16(bf16(routed) + bf16(sigmoid(gate(n))) * bf16(FFN_shared(n))) instead (no gate:
 * the shared FFN's output alone), as `layers.moe.MoEBlock` rounds them; a DeepSeek layer's attention is MLA instead
 * (mla_decode.c) and its router's logits stay fp32,
 * with the other portable kernels doing the work (norm math of torch_rows.h, the linears of bf16.c, fp8.c and
 * ggml_quant.c, the fused FFNs of bf16_ffn.c, fp8_ffn.c and ggml_quant_ffn.c), so that a step costs one call from
 * Python instead of a dozen per layer.
 *
 * Numerics: the torch modules' (`models.model.DecoderLayer` on a CPU without the AVX512 library) op by op: the
 * norms bit for bit, each linear on the bf16 input widened to fp32 and its fp32 output (+ bias) rounded to bf16,
 * the residual adds rounded to bf16, the routed sum rounded to bf16 before its add, the FFN tasks in the order
 * `portable.RoutedTable.tasks` makes them. The router as the AVX512 library's route_row: fp32 softmax of the bf16
 * logits, the K largest in torch.topk's order (ties too: see topk), optional renormalization, scale and rounding
 * to bf16.
 *
 * Shapes: B rows, D hidden, H / Hkv heads of hd, E experts, K routed per row, W int64 words of an expert's packed
 * FFN weights (the kernel's task struct less its ntok, tok and weight).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16_ffn.h"
#include "decode_layer.h"
#include "fp8.h"
#include "ggml_quant.h"
#include "paged.h"
#include "torch_rows.h"

/* One MoE decoder layer. Attention: q/k/v/o linears, H, Hkv, hd, q/k norm (0 none, 1 full, 2 head; weights qw, kw
 * bf16, epsilon qk_eps), clip (bound already rounded to bf16), softmax scale. Norms ln1, ln2 bf16 [D] (epsilon eps).
 * Router: a bf16 linear [E, D]; K, norm_topk, routed_scale, weights_bf16 as the torch Router. Experts: `ffn` (a
 * LIN_* format) selects the fused FFN kernel, `experts` [E, words] their packed words, act a tmp_act. Shared experts
 * (shared_ffn a LIN_* format, -1: none): their packed words (shared_words of them) through that format's kernel, and
 * with shared_gate_on, the [1, D] linear shared_gate whose sigmoid scales them. router_fp32: the router's logits stay
 * fp32 (DeepSeek's), else rounded to bf16. mla: the attention is MLA (`m`, mla_decode.c; q the q_proj where there is
 * no q_a, k and v unused, o [D, H * dv]; the pools one latent head), else GQA. */
typedef struct {
    tmp_linear q, k, v, o, router;
    const uint16_t *ln1, *ln2;
    double eps;
    int64_t H, Hkv, hd, qk_norm;
    const uint16_t *qw, *kw;
    double qk_eps;
    int64_t clip_on;
    double clip, scale;
    int64_t E, K, norm_topk, weights_bf16;
    double routed_scale;
    int64_t ffn;
    const int64_t *experts;
    int64_t words, act, exact;
    int64_t shared_ffn;
    const int64_t *shared;
    int64_t shared_words, shared_gate_on;
    tmp_linear shared_gate;
    int64_t router_fp32, mla;
    tmp_mla m;
} tmp_decode_layer;

TMP_API int64_t tmp_decode_layer_size(void) { return (int64_t)sizeof(tmp_decode_layer); }

int tmp_dl_linear(const tmp_linear *L, const float *x, int64_t B, float *y, int nthreads) {
    int st = TMP_EINVAL;
    if (L->kind == LIN_BF16) {
        st = tmp_bf16_matmul_nt((const uint16_t *)L->w, L->ldw, L->R, L->C, x, L->C, B, y, L->R, nthreads);
    } else if (L->kind == LIN_FP8) {
        memset(y, 0, sizeof(float) * (size_t)(B * L->R));
        st = tmp_fp8_matmul_nt(x, L->C, B, (const uint8_t *)L->w, L->ldw, L->R, L->C, L->scale, L->lds, y, L->R,
                               nthreads);
    } else if (L->kind == LIN_GGML) {
        st = tmg_matmul_nt((int)L->type, (int)L->exact, x, L->C, B, (const uint8_t *)L->w, L->ldw, L->R, L->C, y, L->R,
                           nthreads);
    }
    if (st == TMP_OK && L->bias)
        for (int64_t b = 0; b < B; b++)
            for (int64_t r = 0; r < L->R; r++) y[b * L->R + r] += load1(L->bias, r, 1);
    return st;
}

/* fp32 values rounded to bf16, in place (as fp32) or into bf16 bits (dst). */
static void round_rows(float *y, int64_t n, uint16_t *dst) {
    for (int64_t i = 0; i < n; i++) {
        y[i] = rnd(y[i], 1);
        if (dst) dst[i] = bf16_bits(y[i]);
    }
}

/* torch.topk's choice among equal scores: CPU topk (ATen's topk_impl_loop) runs libstdc++'s std::nth_element on
 * (score, expert) pairs for the K-th largest, then std::sort on the K-1 before it, both by score alone; a tie goes
 * where those algorithms leave it. Reproduced step for step below (introselect: median-of-3 pivot, unguarded
 * partition, insertion sort of the last <= 3; the sort of <= 16 pairs is an insertion sort). Where torch takes
 * another way (K * 64 <= E: std::partial_sort; more than 17 experts routed; introselect's depth limit), ties go
 * to the lower expert, which is torch's choice for K = 1. */
typedef struct {
    float v;
    int64_t i;
} scored;

#define GT(a, b) ((a).v > (b).v)
#define SWAP(a, b) do { scored t_ = (a); (a) = (b); (b) = t_; } while (0)

static void insertion_sort(scored *f, scored *l) {
    if (f == l) return;
    for (scored *i = f + 1; i < l; i++) {
        scored val = *i;
        if (GT(val, *f)) {
            memmove(f + 1, f, sizeof(scored) * (size_t)(i - f));
            *f = val;
        } else {
            scored *j = i;
            for (; GT(val, j[-1]); j--) *j = j[-1];
            *j = val;
        }
    }
}

static void median_to_first(scored *r, scored *a, scored *b, scored *c) {
    if (GT(*a, *b)) {
        if (GT(*b, *c)) SWAP(*r, *b);
        else if (GT(*a, *c)) SWAP(*r, *c);
        else SWAP(*r, *a);
    } else if (GT(*a, *c)) SWAP(*r, *a);
    else if (GT(*b, *c)) SWAP(*r, *c);
    else SWAP(*r, *b);
}

static scored *unguarded_partition(scored *f, scored *l, const scored *pivot) {
    for (;;) {
        while (GT(*f, *pivot)) f++;
        l--;
        while (GT(*pivot, *l)) l--;
        if (!(f < l)) return f;
        SWAP(*f, *l);
        f++;
    }
}

/* Whether the introselect put the K-th largest at q + nth (0: it hit its depth limit). */
static int nth_element(scored *f, scored *nth, scored *l) {
    int depth = 0;
    for (int64_t n = l - f; n > 1; n >>= 1) depth += 2; /* 2 * floor(log2(n)) */
    while (l - f > 3) {
        if (depth-- == 0) return 0;
        median_to_first(f, f + 1, f + (l - f) / 2, l - 1);
        scored *cut = unguarded_partition(f + 1, l, f);
        if (cut <= nth) f = cut;
        else l = cut;
    }
    insertion_sort(f, l);
    return 1;
}

/* The K largest of p [E] as torch.topk orders them -> ids [K]; q: scratch [E]. */
static void topk(const float *p, int64_t E, int64_t K, scored *q, int64_t *ids) {
    for (int64_t e = 0; e < E; e++) q[e] = (scored){p[e], e};
    if (K * 64 > E && K <= 17 && nth_element(q, q + K - 1, q + E)) {
        insertion_sort(q, q + K - 1);
        for (int64_t k = 0; k < K; k++) ids[k] = q[k].i;
        return;
    }
    for (int64_t k = 0; k < K; k++) { /* the largest left, the lower expert first */
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t j = 0; j < k; j++) taken |= ids[j] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[k] = best;
    }
}

/* The softmax router of one row: logits [E] (bf16 values) -> the K largest probabilities in torch.topk's order,
 * renormalized, scaled and rounded to bf16 as the layer asks. p, q: scratch [E]. */
static void route_row(const tmp_decode_layer *L, const float *logits, int64_t *ids, float *w, float *p, scored *q) {
    float mx = -INFINITY, sum = 0.f, picked = 0.f;
    for (int64_t e = 0; e < L->E; e++) mx = logits[e] > mx ? logits[e] : mx;
    for (int64_t e = 0; e < L->E; e++) sum += expf(logits[e] - mx);
    for (int64_t e = 0; e < L->E; e++) p[e] = expf(logits[e] - mx) / sum;
    topk(p, L->E, L->K, q, ids);
    for (int64_t k = 0; k < L->K; k++) {
        w[k] = p[ids[k]];
        picked += w[k];
    }
    for (int64_t k = 0; k < L->K; k++) {
        if (L->norm_topk) w[k] /= picked;
        if (L->routed_scale != 1.0) w[k] *= (float)L->routed_scale;
        if (L->weights_bf16) w[k] = rnd(w[k], 1);
    }
}

/* The routing's FFN tasks (each the expert's words, then ntok and pointers into tok and wt), in the order of
 * `portable.RoutedTable.tasks`: one a slot for one row, else one an expert in expert order, its rows ascending.
 * Returns the number of tasks. */
static int64_t make_tasks(const tmp_decode_layer *L, const int64_t *ids, const float *w, int64_t B, int64_t *tasks,
                          int32_t *tok, float *wt) {
    const int64_t K = L->K, W = L->words;
    int64_t n = 0, at = 0;
    for (int64_t e = 0; e < (B == 1 ? K : L->E); e++) {
        const int64_t start = at;
        for (int64_t b = 0; b < B; b++)
            for (int64_t k = 0; k < K; k++)
                if (B == 1 ? k == e : ids[b * K + k] == e) {
                    tok[at] = (int32_t)b;
                    wt[at++] = w[b * K + k];
                }
        if (at == start) continue;
        int64_t *t = tasks + n++ * (W + 3);
        memcpy(t, L->experts + (B == 1 ? ids[e] : e) * W, sizeof(int64_t) * (size_t)W);
        t[W] = at - start;
        t[W + 1] = (int64_t)(intptr_t)(tok + start);
        t[W + 2] = (int64_t)(intptr_t)(wt + start);
    }
    return n;
}

/* out [B, D] fp32 += the FFN tasks (packed words) on xn [B, D] fp32 through the fused FFN kernel of `kind`. */
static int ffn(int64_t kind, const tmp_decode_layer *L, const float *xn, float *out, int64_t B, int64_t D,
               const int64_t *tasks, int64_t n, int nthreads) {
    if (kind == LIN_BF16)
        return tmp_bf16_ffn_tasks(xn, D, out, D, B, D, (const tmp_bf16_ffn_task *)tasks, n, (int)L->act, nthreads);
    if (kind == LIN_FP8) /* h rounded to bf16 (bf16_h): the layers run in bf16, as `kernels.fp8.ffn_routed` there */
        return tmp_fp8_ffn_tasks(xn, D, out, D, B, D, (const tmp_fp8_ffn_task *)tasks, n, (int)L->act, 1, nthreads);
    if (kind == LIN_GGML)
        return tmg_ffn_tasks(xn, D, out, D, B, D, (const tmg_ffn_task *)tasks, n, (int)L->act, (int)L->exact, nthreads);
    return TMP_EINVAL;
}

/* out [B, D] (bf16 values, fp32) += the shared experts' contribution as MoEBlock adds it: s = bf16(FFN(xn)), times
 * bf16(sigmoid(gate xn)) rounded where there is a gate; out = bf16(out + s). sh [B, D], g [B], tok [B], one [B]:
 * scratch; task [shared_words + 3]. */
static int shared(const tmp_decode_layer *L, const float *xn, float *out, int64_t B, int64_t D, float *sh, float *g,
                  int32_t *tok, float *one, int64_t *task, int nthreads) {
    const int64_t W = L->shared_words;
    for (int64_t b = 0; b < B; b++) tok[b] = (int32_t)b, one[b] = 1.f;
    memcpy(task, L->shared, sizeof(int64_t) * (size_t)W);
    task[W] = B, task[W + 1] = (int64_t)(intptr_t)tok, task[W + 2] = (int64_t)(intptr_t)one;
    memset(sh, 0, sizeof(float) * (size_t)(B * D));
    int st = ffn(L->shared_ffn, L, xn, sh, B, D, task, 1, nthreads);
    if (st == TMP_OK && L->shared_gate_on) st = tmp_dl_linear(&L->shared_gate, xn, B, g, nthreads);
    if (st) return st;
    for (int64_t b = 0; b < B; b++) {
        const float gate = L->shared_gate_on ? rnd(1.f / (1.f + expf(-rnd(g[b], 1))), 1) : 1.f;
        for (int64_t d = 0; d < D; d++) {
            const float s = L->shared_gate_on ? rnd(gate * rnd(sh[b * D + d], 1), 1) : rnd(sh[b * D + d], 1);
            out[b * D + d] = rnd(out[b * D + d] + s, 1);
        }
    }
    return TMP_OK;
}

/* Whether the layer's shapes and formats hold together for hidden size D. */
static int layer_ok(const tmp_decode_layer *L, int64_t D) {
    const int64_t nq = L->H * L->hd, nk = L->Hkv * L->hd, no = L->mla ? L->H * L->m.dv : nq;
    const tmp_linear *lin[5] = {&L->o, &L->router, &L->q, &L->k, &L->v};
    const int64_t shape[5][2] = {{D, no}, {L->E, D}, {nq, D}, {nk, D}, {nk, D}};
    if (L->mla && !tmp_mla_ok(&L->m, &L->q, L->H, D)) return 0;
    for (int i = 0; i < (L->mla ? 2 : 5); i++)
        if (lin[i]->kind < LIN_BF16 || lin[i]->kind > LIN_GGML || lin[i]->R != shape[i][0] || lin[i]->C != shape[i][1])
            return 0;
    const int64_t task_bytes[3] = {tmp_bf16_ffn_task_size(), tmp_fp8_ffn_task_size(), tmg_ffn_task_size()};
    if (L->ffn < LIN_BF16 || L->ffn > LIN_GGML || 8 * (L->words + 3) != task_bytes[L->ffn]) return 0;
    if (L->shared_ffn != -1) {
        if (L->shared_ffn < LIN_BF16 || L->shared_ffn > LIN_GGML || !L->shared) return 0;
        if (8 * (L->shared_words + 3) != task_bytes[L->shared_ffn]) return 0;
        const tmp_linear *g = &L->shared_gate;
        if (L->shared_gate_on && (g->kind < LIN_BF16 || g->kind > LIN_GGML || g->R != 1 || g->C != D)) return 0;
    }
    return L->E > 0 && L->K > 0 && L->K <= L->E && L->hd > 0 && L->Hkv > 0 && L->H % L->Hkv == 0 && L->ln1 && L->ln2;
}

/* n consecutive decoder layers for one new token per row, x [B, D] bf16 updated in place (see the top of this
 * file). cos, sin [B, hd] at row stride scs (fp32 when rot32, else bf16); kc[l], vc[l]: layer l's key and value
 * pools [N, Hkv, bs, hd] bf16 at element strides (skn, skh, skt, 1) and (svn, svh, svt, 1); table [B, M] block
 * tables, pos [B] the rows' new positions. ids [n, B, K] (K the largest of the layers'): each layer's routed experts
 * (a layer of fewer fills the first B * its K of its [B, K]). Returns TMP_EINVAL (nothing
 * written) for a layer that does not fit D or whose block tables do not fit the pools, TMP_ENOMEM without scratch
 * memory; a kernel's failure midway stops the run with its status (x then holds the layers before). */
TMP_API int tmp_decode_layers(const tmp_decode_layer *layers, int64_t n, uint16_t *x, int64_t B, int64_t D,
                              const void *cos, const void *sin, int64_t scs, int rot32, void *const *kc,
                              void *const *vc, int64_t skn, int64_t skh, int64_t skt, int64_t svn, int64_t svh,
                              int64_t svt, int64_t N, int64_t bs, const int64_t *table, int64_t M, const int64_t *pos,
                              int64_t *ids, int nthreads) {
    int64_t nq = 0, nk = 0, E = 0, K = 0, W = 0;
    for (int64_t l = 0; l < n; l++) {
        const tmp_decode_layer *L = &layers[l];
        if (!layer_ok(L, D)) return TMP_EINVAL;
        const int64_t lq = L->mla ? L->H * L->m.dv : L->H * L->hd; /* the o linear's input */
        nq = lq > nq ? lq : nq;
        nk = L->Hkv * L->hd > nk ? L->Hkv * L->hd : nk;
        E = L->E > E ? L->E : E, K = L->K > K ? L->K : K, W = L->words > W ? L->words : W;
        W = L->shared_ffn != -1 && L->shared_words > W ? L->shared_words : W;
    }
    for (int64_t b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] >= M * bs) return TMP_EINVAL;
        for (int64_t j = 0; j <= pos[b] / bs; j++)
            if (table[b * M + j] < 0 || table[b * M + j] >= N) return TMP_EINVAL;
    }
    if (n == 0 || B == 0) return TMP_OK;
    const int64_t wide = D > nq ? D : nq;
    /* fp32: xn [B, D], y [B, max(D, nq)] (a linear's output, also o as fp32), q [B, nq], k and v [B, nk], logits
     * [B, E], out [B, D], w [B, K], wt [B * K], p [E], g and one [B]; bf16: qb [B, nq], kb, vb [B, nk], ob [B, nq];
     * tasks (B * K, or 1 for the shared experts), tok [B * K]; the router's pairs [E]. The shared experts' output
     * goes to y. */
    const size_t nf = (size_t)(B * (2 * D + wide + nq + 2 * nk + E + 2 * K + 2) + E);
    float *f = malloc(sizeof(float) * nf);
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)(B * (2 * nq + 2 * nk)));
    int64_t *tasks = malloc(sizeof(int64_t) * (size_t)(B * K * (W + 3)));
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(B * K));
    scored *pairs = malloc(sizeof(scored) * (size_t)E);
    int st = !f || !h || !tasks || !tok || !pairs ? TMP_ENOMEM : TMP_OK;
    float *xn = f, *y = xn + B * D, *q = y + B * wide, *k = q + B * nq, *v = k + B * nk, *lg = v + B * nk;
    float *out = lg + B * E, *w = out + B * D, *wt = w + B * K, *p = wt + B * K, *g = p + E, *one = g + B;
    uint16_t *qb = h, *kb = qb + B * nq, *vb = kb + B * nk, *ob = vb + B * nk;
    for (int64_t l = 0; l < n && st == TMP_OK; l++) {
        const tmp_decode_layer *L = &layers[l];
        const int64_t lq = L->H * L->hd, lk = L->Hkv * L->hd;
        int64_t *lids = ids + l * B * K; /* [B, L->K] at the start of layer l's [B, K] (K: the run's widest) */
        for (int64_t b = 0; b < B; b++) {
            load_row(xn + b * D, x, b * D, D, 1);
            rms_norm(xn + b * D, D, L->ln1, (float)L->eps, 1);
        }
        if (L->mla) {
            st = tmp_mla_attention(&L->m, &L->q, L->H, (float)L->scale, xn, B, D, cos, sin, scs, rot32, kc[l], skn,
                                   skh, skt, N, bs, table, M, pos, q, nthreads);
            if (st) break;
        } else {
            if ((st = tmp_dl_linear(&L->q, xn, B, q, nthreads)) || (st = tmp_dl_linear(&L->k, xn, B, k, nthreads)) ||
                (st = tmp_dl_linear(&L->v, xn, B, v, nthreads)))
                break;
            round_rows(q, B * lq, qb);
            round_rows(k, B * lk, kb);
            round_rows(v, B * lk, vb);
            st = tmp_paged_decode_block(qb, lq, kb, lk, vb, lk, 1, B, L->H, L->Hkv, L->hd, (int)L->qk_norm, L->qw,
                                        L->kw, (float)L->qk_eps, (int)L->clip_on, (float)L->clip, cos, sin, scs, rot32,
                                        kc[l], skn, skh, skt, vc[l], svn, svh, svt, N, bs, table, M, pos,
                                        (float)L->scale, ob, nthreads);
            if (st) break;
            load_row(q, ob, 0, B * lq, 1); /* o as fp32 */
        }
        if ((st = tmp_dl_linear(&L->o, q, B, y, nthreads))) break;
        for (int64_t i = 0; i < B * D; i++) x[i] = bf16_bits(load1(x, i, 1) + rnd(y[i], 1));
        for (int64_t b = 0; b < B; b++) {
            load_row(xn + b * D, x, b * D, D, 1);
            rms_norm(xn + b * D, D, L->ln2, (float)L->eps, 1);
        }
        if ((st = tmp_dl_linear(&L->router, xn, B, lg, nthreads))) break;
        if (!L->router_fp32) round_rows(lg, B * L->E, NULL);
        for (int64_t b = 0; b < B; b++) route_row(L, lg + b * L->E, lids + b * L->K, w + b * L->K, p, pairs);
        const int64_t nt = make_tasks(L, lids, w, B, tasks, tok, wt);
        memset(out, 0, sizeof(float) * (size_t)(B * D));
        if ((st = ffn(L->ffn, L, xn, out, B, D, tasks, nt, nthreads))) break;
        round_rows(out, B * D, NULL);
        if (L->shared_ffn != -1 && (st = shared(L, xn, out, B, D, y, g, tok, one, tasks, nthreads))) break;
        for (int64_t i = 0; i < B * D; i++) x[i] = bf16_bits(load1(x, i, 1) + out[i]);
    }
    free(f);
    free(h);
    free(tasks);
    free(tok);
    free(pairs);
    return st;
}
