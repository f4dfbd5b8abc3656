"""Native bf16 kernels against fp32 torch references (bf16 rounding tolerance), and their wiring."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tilemem import kernels
from tilemem.config import ModelConfig, RopeConfig

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs AVX512-BF16 and a C compiler")

TOL = 1e-2  # relative (Frobenius) error allowed: bf16 inputs, fp32 accumulation, bf16 activations


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def experts(e: int, i: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(torch.bfloat16)  # noqa: E731
    return [mk(i, d) for _ in range(e)], [mk(i, d) for _ in range(e)], [mk(d, i) for _ in range(e)]


def reference(x, weights, ids, gate, up, down, act=F.silu):
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e, xt = ids[t, k], x[t : t + 1].float()
            y = F.linear(act(F.linear(xt, gate[e].float())) * F.linear(xt, up[e].float()), down[e].float())
            out[t] += weights[t, k] * y[0]
    return out


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 9, 33, 300])  # 300: > 64 tokens per expert
@pytest.mark.parametrize("d,i", [(256, 96), (200, 70), (130, 69)])  # not multiples of 32; odd I
def test_moe_matches_fp32_reference(t, d, i):
    e, k = 8, 2
    gate, up, down = experts(e, i, d)
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, d, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen)
    out = kernels.moe(x, w, ids, kernels.ExpertTable(gate, up, down), "silu", kernels.Workspace())
    assert out.dtype == torch.float32 and out.shape == (t, d)
    assert rel(out, reference(x, w, ids, gate, up, down)) < TOL


@pytest.mark.parametrize("n", [8, 9, 16, 17, 24, 33, 40, 48, 49, 100, 200, 400])
def test_prefill_gemm_matches_the_reference_for_every_group_shape(n):
    """n tokens on one expert: every count of 8-token units in a packed group (1 to 6, 16- and 8-lane
    vectors), several groups per weight block (49 and more), more groups than one pass packs (400),
    and 8/4/1-row blocks (I = 70)."""
    d, i = 200, 70
    gate, up, down = experts(1, i, d, seed=n)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    ids = torch.zeros(n, 1, dtype=torch.long)
    w = torch.rand(n, 1, generator=gen)
    out = kernels.moe(x, w, ids, kernels.ExpertTable(gate, up, down), "silu", kernels.Workspace())
    ref = reference(x, w, ids, gate, up, down)
    assert rel(out, ref) < TOL
    assert max(rel(out[j], ref[j]) for j in range(n)) < 3 * TOL  # no token left out or misplaced


@pytest.mark.skipif(not kernels.amx_supported(), reason="needs a CPU with AMX-BF16")
@pytest.mark.parametrize("n", [8, 16, 24, 33, 48, 100])
def test_amx_prefill_gemm_matches_the_reference_and_the_avx512_path(n):
    """AMX tiles take the prefill GEMMs of whole 16-row blocks (K a multiple of 32): one to three
    16-token vectors per group (two row blocks per pass up to 32 tokens), a trailing 16-row block
    (I = 112), several groups. They must agree with the fp32 reference and with the AVX512 GEMM, and
    give the same bits on any number of threads."""
    d, i = 256, 112
    gate, up, down = experts(2, i, d, seed=n)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.arange(2)] * n)
    w = torch.rand(n, 2, generator=gen)
    table, before, amx = kernels.ExpertTable(gate, up, down), torch.get_num_threads(), kernels.amx_enabled()
    outs = {}
    try:
        for amx, threads in ((False, 2), (True, 1), (True, 2)):
            assert kernels.set_amx(amx) == amx
            torch.set_num_threads(threads)
            outs[amx, threads] = kernels.moe(x, w, ids, table, "silu", kernels.Workspace())
    finally:
        kernels.set_amx(amx)
        torch.set_num_threads(before)
    ref = reference(x, w, ids, gate, up, down)
    assert rel(outs[True, 2], ref) < TOL
    assert max(rel(outs[True, 2][j], ref[j]) for j in range(n)) < 3 * TOL  # no token left out or misplaced
    assert rel(outs[True, 2], outs[False, 2]) < TOL / 10  # fp32 accumulation order only
    assert torch.equal(outs[True, 1], outs[True, 2])


def test_prefill_experts_give_the_same_bits_on_any_number_of_threads():
    """Prefill tasks go to the threads as work items in whatever order the threads come free; each
    output must still be computed by one thread in one order. Experts from 1 to ~100 tokens (dot-product
    and GEMM tasks mixed), more neurons and hidden rows than one work item takes."""
    d, i, e, t = 520, 300, 12, 160
    gate, up, down = experts(e, i, d, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(t, d, generator=gen).to(torch.bfloat16)
    probs = torch.tensor([2.0**-j for j in range(e)])  # skewed: the last experts get a few tokens
    ids = torch.stack([torch.multinomial(probs, 3, generator=gen) for _ in range(t)])
    w = torch.rand(t, 3, generator=gen)
    counts = torch.bincount(ids.flatten(), minlength=e)
    assert counts.max() > 64 and 0 < counts[counts > 0].min() < 8
    table, before = kernels.ExpertTable(gate, up, down), torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(kernels.moe(x, w, ids, table, "silu", kernels.Workspace()))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert rel(outs[0], reference(x, w, ids, gate, up, down)) < TOL


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_ffn_tasks_over_neuron_ranges_sum_to_the_whole_expert(act):
    """Tiles in the store layout ([3, n, D], down transposed) over uneven ranges add up to the expert."""
    d, i, t = 192, 100, 6
    gate, up, down = experts(2, i, d, seed=1)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    tok = torch.tensor([0, 2, 5], dtype=torch.int32)
    scale = torch.tensor([0.5, 1.0, 2.0])
    tasks = []
    for a, b in [(0, 16), (16, 57), (57, 100)]:
        block = torch.stack([gate[0][a:b], up[0][a:b], down[0][:, a:b].t()]).contiguous()
        tasks.append((block, tok, scale))
    out = torch.zeros(t, d)
    kernels.ffn_tasks(x, tasks, act, kernels.Workspace(), out)
    ids = torch.zeros(t, 1, dtype=torch.long)
    w = torch.zeros(t, 1)
    w[tok.long(), 0] = scale
    fn = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act]
    assert out[[1, 3, 4]].abs().max() == 0  # untouched tokens stay zero
    assert rel(out, reference(x, w, ids, gate, up, down, fn)) < TOL


@pytest.mark.parametrize("m", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("n,k", [(70, 256), (33, 100)])
def test_linear_matches_fp32_reference(m, n, k):
    gen = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    y = kernels.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel(y, F.linear(x.float(), w.float())) < TOL


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEMEM_CACHE", str(tmp_path))
    lib = kernels.build()
    assert lib.parent == tmp_path / "kernels" and lib.exists()
    mtime = lib.stat().st_mtime_ns
    assert kernels.build() == lib and lib.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temp files left behind


def test_kernels_can_be_switched_off():
    code = "from tilemem import kernels; print(kernels.available())"
    env = dict(os.environ, TILEMEM_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bf16_engine_runs_experts_and_linears_natively(make_ckpt):
    """The bf16 parity tests against transformers go through the kernels, not around them."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    llm = LLM(make_ckpt("olmoe", "bf16"), dtype="bf16")
    calls = {"moe": 0, "linear": 0, "decode_layers": 0}
    orig_moe, orig_linear, orig_layers = kernels.moe, kernels.linear, kernels.decode_layers

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)

        return wrapped

    try:
        kernels.moe, kernels.linear = count("moe", orig_moe), count("linear", orig_linear)
        kernels.decode_layers = count("decode_layers", orig_layers)
        llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0))
    finally:
        kernels.moe, kernels.linear, kernels.decode_layers = orig_moe, orig_linear, orig_layers
    assert calls["moe"] > 0 and calls["linear"] > 0  # prefill's experts; the LM head
    assert calls["decode_layers"] == 2  # the 2 decode steps after the first token: all layers in one call each


@pytest.mark.parametrize(
    "b,h,hkv,t,hd",
    [(1, 4, 4, 1, 128), (2, 8, 2, 37, 64), (3, 6, 3, 101, 96), (1, 2, 1, 300, 128), (2, 2, 2, 49, 34)],
)
def test_prefill_attention_matches_causal_sdpa(b, h, hkv, t, hd):
    """Causal attention over keys and values in cache slices (strided, GQA, odd lengths, key groups cut
    anywhere): as close to the fp32 result as torch's own bf16 SDPA, and laid out [B, T, H, hd]."""
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(b, t, h, hd, generator=gen).to(torch.bfloat16).transpose(1, 2)  # [B, H, T, hd], strided
    cache = torch.randn(2, b + 1, hkv, t + 7, hd, generator=gen).to(torch.bfloat16)
    keys, values = cache[0, 1:, :, :t], cache[1, 1:, :, :t]  # not the cache's first rows, not its full length
    scale = hd**-0.5
    args = dict(is_causal=True, scale=scale, enable_gqa=h != hkv)
    exact = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), **args).transpose(1, 2)
    torch_bf16 = F.scaled_dot_product_attention(q, keys, values, **args).transpose(1, 2)
    ours = kernels.attn_prefill(q, keys, values, scale)
    assert ours.shape == (b, t, h, hd) and ours.is_contiguous()
    assert rel(ours, exact) <= 1.5 * rel(torch_bf16, exact) + 1e-4
    assert (ours.float() - exact).abs().max() <= 1.5 * (torch_bf16.float() - exact).abs().max() + 1e-3


def test_bf16_prefill_attention_runs_natively_without_a_cached_prefix(make_ckpt, monkeypatch):
    """A prefill pass with no cached prefix goes through the native causal attention (unless AMX is on:
    then SDPA's AMX tiles are faster), later chunks of a prompt (a cached prefix) through SDPA with the
    mask; the tokens are those of SDPA everywhere."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [list(range(40, 71)), [5, 9, 200, 31, 7]]
    llm = LLM(make_ckpt("olmoe", "bf16"), dtype="bf16", prefill_chunk=16)
    shapes = []
    native = kernels.attn_prefill
    monkeypatch.setattr(kernels, "attn_prefill", lambda q, *a: shapes.append(tuple(q.shape)) or native(q, *a))
    amx = kernels.amx_enabled()
    try:
        kernels.set_amx(False)
        got = llm.generate(prompts, params)
        if kernels.amx_supported():
            kernels.set_amx(True)
            before = len(shapes)
            assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in got]
            assert len(shapes) == before  # SDPA with AMX
    finally:
        kernels.set_amx(amx)
    layers = llm.config.num_layers
    # The first chunk only, and not in the last layer, where only the token whose logits are read queries.
    assert shapes == [(1, llm.config.num_heads, 16, llm.config.head_dim)] * (layers - 1)

    def sdpa(q, keys, values, scale):  # what the layer computes without the kernel
        o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        return o.transpose(1, 2).contiguous()

    monkeypatch.setattr(kernels, "attn_prefill", sdpa)
    assert [o.token_ids for o in llm.generate(prompts, params)] == [o.token_ids for o in got]


@pytest.mark.parametrize("d", [64, 100])
@pytest.mark.parametrize("rows", [(3, 2), (2, 350)])  # decode rows; a prefill (rows split over threads)
def test_rms_norm_matches_the_torch_module(d, rows):
    from tilemem.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(d)
    x = (torch.randn(*rows, d, generator=gen) * 3).to(torch.bfloat16)
    norm = RMSNorm(d, 1e-6)
    norm.weight = torch.nn.Parameter((torch.rand(d, generator=gen) + 0.5).to(torch.bfloat16), requires_grad=False)
    ref = norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    y = kernels.rms_norm(x, norm.weight, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert (y.float() - ref.float()).abs().max() <= 2**-7 * ref.float().abs().max()  # one bf16 ulp at most
    assert torch.equal(norm(x), y)  # the module takes the kernel for bf16 on the CPU


def test_prefill_sized_batches_match_the_reference():
    """Many tokens per expert take the 4-row x 4-token path; the leftovers take the row path."""
    d, i, e, t = 128, 96, 2, 37
    gate, up, down = experts(e, i, d, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(t, d, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(e, generator=gen) for _ in range(t)])
    w = torch.rand(t, e, generator=gen)
    out = kernels.moe(x, w, ids, kernels.ExpertTable(gate, up, down), "silu", kernels.Workspace())
    assert rel(out, reference(x, w, ids, gate, up, down)) < TOL
    wl = torch.randn(50, d, generator=gen).to(torch.bfloat16)
    assert rel(kernels.linear(x[:16], wl), F.linear(x[:16].float(), wl.float())) < TOL


ATTN_CASES = {
    "plain gqa": dict(num_heads=4, num_kv_heads=2),
    "olmoe: full q/k norm, clip": dict(qk_norm="full", clip_qkv=0.3),
    "qwen3: per-head q/k norm": dict(qk_norm="head", num_kv_heads=1),
    "qwen2: q/k/v and o bias": dict(attention_bias=True, o_bias=True),
    "fp32 rotation": dict(rope=RopeConfig(fp32_rotate=True)),
}


@pytest.mark.parametrize("case", ATTN_CASES)
def test_decode_attention_kernel_matches_the_torch_path(case, monkeypatch):
    """One decode step of rows at different positions, in non-contiguous cache slots: the fused native
    attention gives the torch path's output and writes the same keys and values into the cache."""
    from dataclasses import replace

    from tilemem.layers.attention import Attention
    from tilemem.layers.kv_cache import ForwardContext, KVCache
    from tilemem.layers.rope import RotaryEmbedding

    base = dict(family="olmoe", architecture="x", vocab_size=8, hidden_size=96, num_layers=1, num_heads=4)
    base.update(num_kv_heads=4, head_dim=32, intermediate_size=8, moe_intermediate_size=8, num_experts=2, top_k=1)
    cfg = replace(ModelConfig(**base), **ATTN_CASES[case])
    attn = Attention(cfg, 0)
    gen = torch.Generator().manual_seed(3)
    for name, p in list(attn.named_parameters()):
        mod, attr = attn.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        scale = 1.0 if "norm" in name else 0.2
        value = 1 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name else torch.randn(p.shape, generator=gen)
        setattr(mod, attr, torch.nn.Parameter((value * scale).to(torch.bfloat16), requires_grad=False))
    rope = RotaryEmbedding(cfg.rope, cfg.head_dim, 64)
    cache = KVCache.allocate(1, 4, 64, cfg.num_kv_heads, 32, 32, torch.bfloat16)
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=gen))
    slots, starts = [3, 0, 2], [5, 17, 1]
    ctx = ForwardContext.build(cache, slots, starts, [1, 1, 1])
    x = torch.randn(3, 1, 96, generator=gen).to(torch.bfloat16)
    cos, sin = rope.table(ctx.positions, x.dtype)
    before = [t.clone() for t in (*cache.keys, *cache.values)]

    calls = []
    monkeypatch.setattr(kernels, "attn_decode", lambda *a, _f=kernels.attn_decode: calls.append(1) or _f(*a))
    native = attn(x, ctx, rope, cos, sin)
    written = [t.clone() for t in (*cache.keys, *cache.values)]
    for t, b in zip((*cache.keys, *cache.values), before, strict=True):
        t.copy_(b)
    monkeypatch.setattr(Attention, "native", lambda self: None)
    ref = attn(x, ctx, rope, cos, sin)
    assert calls == [1] and native.shape == ref.shape == (3, 1, 96)
    assert rel(native, ref) < TOL
    for got, want, old in zip(written, (*cache.keys, *cache.values), before, strict=True):
        assert rel(got, want) < TOL
        changed = (got != old).any(-1)  # [S, Hkv, L]: only each row's new position
        assert torch.equal(changed, (want != old).any(-1)) and changed.sum() == 3 * cfg.num_kv_heads


def _paged_copy(contiguous: torch.Tensor, slots: list[int], tables: torch.Tensor, blocks: int) -> torch.Tensor:
    """The rows `slots` of a slot cache [S, Hkv, L, hd] in a pool [blocks, Hkv, bs, hd] at their block tables
    [B, M] (entries < 0: no block; the rest of the pool random)."""
    bs = contiguous.shape[2] // tables.shape[1]
    pool = torch.randn(blocks, *contiguous.shape[1:2], bs, contiguous.shape[3]).to(contiguous.dtype)
    for b, slot in enumerate(slots):
        for j, blk in enumerate(tables[b].tolist()):
            if blk >= 0:
                pool[blk] = contiguous[slot, :, j * bs : (j + 1) * bs]
    return pool


def _gathered(pool: torch.Tensor, tables: torch.Tensor, j: int) -> torch.Tensor:
    """Row j's blocks of a pool [N, Hkv, bs, hd] laid end to end: [Hkv, M * bs, hd] (missing blocks zero)."""
    blocks = [pool[k] if k >= 0 else torch.zeros_like(pool[0]) for k in tables[j].tolist()]
    return torch.cat(blocks, dim=1)


PAGED_SLOTS, PAGED_POSITIONS, PAGED_BS, PAGED_M = [2, 0, 3], [5, 40, 17], 16, 3  # rows of 1, 3 and 2 blocks


def _shuffled_tables(blocks: int, seed: int) -> torch.Tensor:
    """Block tables [3, M] of distinct shuffled blocks for PAGED_POSITIONS, the entries past a row's last
    block -1 (never read)."""
    gen = torch.Generator().manual_seed(seed)
    tables = torch.randperm(blocks, generator=gen)[: 3 * PAGED_M].view(3, PAGED_M)
    for b, pos in enumerate(PAGED_POSITIONS):
        tables[b, pos // PAGED_BS + 1 :] = -1
    return tables


def test_decode_attention_reads_and_writes_a_paged_cache_as_the_slot_cache():
    """The decode attention kernel on a paged cache (blocks of 16 positions, shuffled non-contiguous block
    tables, rows of 6, 41 and 18 positions, unused table entries -1) gives the same bits as on the slot
    cache holding the same data ([S, Hkv, L, hd] with tables = slots.view(B, 1)), and writes each row's new
    key and value at the same place of its blocks; tables that do not fit the pool raise KernelError."""
    from dataclasses import replace

    from tilemem.errors import KernelError
    from tilemem.layers.attention import Attention
    from tilemem.layers.rope import RotaryEmbedding

    base = dict(family="olmoe", architecture="x", vocab_size=8, hidden_size=96, num_layers=1, num_heads=4)
    base.update(num_kv_heads=2, head_dim=32, intermediate_size=8, moe_intermediate_size=8, num_experts=2, top_k=1)
    cfg = replace(ModelConfig(**base), qk_norm="head")
    attn = Attention(cfg, 0)
    gen = torch.Generator().manual_seed(7)
    for name, p in list(attn.named_parameters()):
        mod, attr = attn.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        value = torch.randn(p.shape, generator=gen)
        value = 1 + 0.1 * value if "norm" in name else 0.2 * value
        setattr(mod, attr, torch.nn.Parameter(value.to(torch.bfloat16), requires_grad=False))
    layer = attn.native()
    rope = RotaryEmbedding(cfg.rope, cfg.head_dim, 64)
    L, blocks = PAGED_BS * PAGED_M, 20
    slot_k, slot_v = (torch.randn(4, 2, L, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    tables = _shuffled_tables(blocks, seed=1)
    pool_k, pool_v = (_paged_copy(c, PAGED_SLOTS, tables, blocks) for c in (slot_k, slot_v))
    positions = torch.tensor(PAGED_POSITIONS)
    x = torch.randn(3, 96, generator=gen).to(torch.bfloat16)
    cos, sin = (t.reshape(3, -1) for t in rope.table(positions.view(3, 1), torch.bfloat16))
    ws = kernels.Workspace()
    slots = torch.tensor(PAGED_SLOTS)
    want = kernels.attn_decode(layer, x, cos, sin, slot_k, slot_v, slots.view(-1, 1), positions, ws)
    got = kernels.attn_decode(layer, x, cos, sin, pool_k, pool_v, tables, positions, ws)
    assert torch.equal(got, want)
    for b, (slot, pos) in enumerate(zip(PAGED_SLOTS, PAGED_POSITIONS, strict=True)):
        for pool, contiguous in ((pool_k, slot_k), (pool_v, slot_v)):
            assert torch.equal(_gathered(pool, tables, b)[:, : pos + 1], contiguous[slot, :, : pos + 1])
    assert torch.equal(kernels.attn_decode(layer, x, cos, sin, slot_k, slot_v, slots, positions, ws), want)  # [B]

    for bad, match in [
        (torch.where(tables == tables[1, 2], blocks, tables), "outside the KV cache's pool"),  # a block past N
        (torch.where(tables == tables[2, 1], -1, tables), "outside the KV cache's pool"),  # a used entry -1
        (tables[:, :2], "position is past its block table"),  # row 1's position 40 needs 3 blocks
        (tables.int(), "int64 block tables"),
        (tables[:2], r"block tables \[3, M\]"),
    ]:
        with pytest.raises(KernelError, match=match):
            kernels.attn_decode(layer, x, cos, sin, pool_k, pool_v, bad, positions, ws)


def test_fused_decode_layers_read_and_write_a_paged_cache_as_the_slot_cache(make_ckpt):
    """The fused decoder layers on paged caches (shuffled blocks of 16 positions, rows of different
    lengths) give the slot cache's residual stream, routed experts and cache writes, bit for bit."""
    from tilemem.loader.checkpoint import load_model

    model, _ = load_model(make_ckpt("olmoe", "bf16"), "bf16")
    cfg = model.cfg
    native = model._native_decode()
    assert native is not None
    gen = torch.Generator().manual_seed(11)
    L, blocks, n = PAGED_BS * PAGED_M, 24, cfg.num_layers
    shape = (4, cfg.num_kv_heads, L, cfg.head_dim)
    slot_k, slot_v = ([torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(n)] for _ in range(2))
    tables = _shuffled_tables(blocks, seed=2)
    pool_k, pool_v = ([_paged_copy(c, PAGED_SLOTS, tables, blocks) for c in caches] for caches in (slot_k, slot_v))
    positions = torch.tensor(PAGED_POSITIONS)
    cos, sin = model.rope.table(positions.view(3, 1), torch.bfloat16)
    x = torch.randn(3, 1, cfg.hidden_size, generator=gen).to(torch.bfloat16)

    class Cache:  # the fused stacks follow a cache by identity (weakly referenced)
        pass

    def run(keys, values, tab):
        cache, routed = Cache(), {}
        assert native.run_length(0, cache, keys) == n
        y = native.forward(0, x, cache, keys, values, tab, positions, cos, sin, routed.__setitem__)
        return y, routed

    want, want_routed = run(slot_k, slot_v, torch.tensor(PAGED_SLOTS).view(-1, 1))
    got, got_routed = run(pool_k, pool_v, tables)
    assert torch.equal(got, want) and got_routed.keys() == want_routed.keys() == set(range(n))
    assert all(torch.equal(got_routed[i], want_routed[i]) for i in range(n))
    for b, (slot, pos) in enumerate(zip(PAGED_SLOTS, PAGED_POSITIONS, strict=True)):
        for pools, caches in ((pool_k, slot_k), (pool_v, slot_v)):
            for pool, contiguous in zip(pools, caches, strict=True):
                assert torch.equal(_gathered(pool, tables, b)[:, : pos + 1], contiguous[slot, :, : pos + 1])


@pytest.mark.parametrize(
    "family,module_layers",
    [("olmoe", ()), ("mixtral", ()), ("qwen3_moe", ()), ("olmoe", (0,)), ("qwen3_moe", (1,))],
)
def test_fused_decode_layers_match_the_module_path(family, module_layers, make_ckpt, monkeypatch):
    """A decode step of rows at different positions, in non-contiguous cache slots, through the fused
    native decoder layers: the module path's logits, KV cache writes and routed experts, bit for bit,
    with one native call per run of consecutive fusable layers (`module_layers` run as modules)."""
    from tilemem.layers.kv_cache import ForwardContext
    from tilemem.loader.checkpoint import load_model

    model, _ = load_model(make_ckpt(family, "bf16", routing_skew=1.0), "bf16")
    cfg = model.cfg
    for i in module_layers:
        monkeypatch.setattr(model.model.layers[i], "_fusable", False)
    gen = torch.Generator().manual_seed(5)
    cache = model.allocate_cache(4, 32)
    slots, lengths = [3, 0, 2], [5, 9, 2]
    for slot, n in zip(slots, lengths, strict=True):  # prefill each row on its own (the module path)
        model(torch.randint(5, cfg.vocab_size, (1, n), generator=gen), ForwardContext.build(cache, [slot], [0], [n]))
    before = [t.clone() for t in (*cache.keys, *cache.values)]
    feed = torch.randint(5, cfg.vocab_size, (3, 1), generator=gen)
    routed: dict[bool, dict[int, torch.Tensor]] = {True: {}, False: {}}

    def step(fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for t, b in zip((*cache.keys, *cache.values), before, strict=True):
            t.copy_(b)
        model.fused_decode = fused
        for layer in model.model.layers:
            layer.mlp.on_route = lambda li, ids, _f=fused: routed[_f].__setitem__(li, ids.clone())
        logits = model(feed, ForwardContext.build(cache, slots, lengths, [1, 1, 1]))
        return logits, [t.clone() for t in (*cache.keys, *cache.values)]

    calls = []
    monkeypatch.setattr(
        kernels, "decode_layers", lambda st, *a, _f=kernels.decode_layers: calls.append(st.n) or _f(st, *a)
    )
    fused, fused_cache = step(True)
    ref, ref_cache = step(False)
    runs = "".join("m" if i in module_layers else "f" for i in range(cfg.num_layers))
    assert calls == [len(r) for r in runs.split("m") if r]
    # bit for bit: the kernel rounds where the modules round (bf16 residual adds, routed sum, weights)
    assert fused.shape == ref.shape == (3, 1, cfg.vocab_size) and torch.equal(fused, ref)
    for got, want, old in zip(fused_cache, ref_cache, before, strict=True):
        assert torch.equal(got, want)
        changed = (got != old).any(-1)  # [S, Hkv, L]: only each row's new position
        assert changed.sum() == 3 * cfg.num_kv_heads
    assert routed[True].keys() == routed[False].keys() == set(range(cfg.num_layers))
    for layer, ids in routed[False].items():
        assert torch.equal(routed[True][layer], ids)


def test_fused_decode_follows_a_grown_kv_cache_and_frees_the_old_one(make_ckpt):
    """When the engine grows its paged KV cache (more blocks than it had), the fused decode step writes
    into the new pools (same greedy tokens as before) and nothing keeps the old ones' memory alive."""
    import gc
    import weakref

    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    llm = LLM(make_ckpt("olmoe", "bf16"), dtype="bf16", max_batch=2, prefix_caching=False)
    short = llm.generate("The capital of", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    eng = llm.engine()
    old, blocks = weakref.ref(eng.cache), eng.cache.blocks  # the current cache, as it is
    assert eng._grow(eng.pool.blocks)  # grown pools replace it (as more sequences would, before a step)
    assert eng.cache.blocks == 2 * blocks
    gc.collect()
    assert old() is None  # freed at once, not held until a decode step rebuilds the native stack
    long = llm.generate("The capital of", SamplingParams(max_tokens=300, temperature=0, ignore_eos=True))[0]
    assert long.token_ids[:8] == short.token_ids


def test_bf16_greedy_output_is_the_same_alone_in_a_batch_and_in_waves(make_ckpt):
    """Batch invariance in bf16, through the native decode attention and expert kernels: a prompt's
    greedy tokens are the same alone, in a batch of 4, and through 2 slots that rows leave and join."""
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    path = make_ckpt("qwen3_moe", "bf16")
    prompts = ["The capital of", "def fibonacci(n):\n    ", "1, 2, 3, 5, 8,", "Once upon a time there"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm = LLM(path, dtype="bf16", max_batch=4)
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)
    assert [o.token_ids for o in llm.generate(prompts, params)] == alone
    # 4 prompts through 2 slots, finishing at different steps: later rows join mid-decode in freed slots
    lengths = [6, 24, 10, 24]
    waves = LLM(path, dtype="bf16", max_batch=2).generate(
        prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    )
    assert [o.token_ids for o in waves] == [a[:n] for a, n in zip(alone, lengths, strict=True)]
