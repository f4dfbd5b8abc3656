"""The native decode attention block on AVX2 (`kernels.paged_decode`, used by `Attention.forward`'s portable decode
branch): the same bits as the torch module path (the same Attention with the block turned off) for bf16 and fp32,
q/k norm none/full/head, clip, fp32 rotation, GQA, rows at different positions across block boundaries of shuffled
block tables: outputs and the written cache entries. Bad input raises KernelError and writes nothing. A model's
greedy tokens and logits are the same with the block on and off.

Every case is bit for bit: the block rounds op by op as torch does, and sums the norms' squares in the order of
torch's AVX2 sum kernel (`csrc_portable/torch_sum.h`). Where torch's CPU kernels are AVX512 ones (16-lane sums),
the normed cases are compared within a few fp32 ulps of the norm instead (1 bf16 ulp at most)."""

from __future__ import annotations

import random

import pytest
import torch

from tilemem.config import ModelConfig, RopeConfig
from tilemem.engine.llm import LLM
from tilemem.errors import KernelError
from tilemem.kernels import paged_decode
from tilemem.layers.attention import Attention
from tilemem.layers.kv_cache import ForwardContext, KVCache
from tilemem.layers.norm import RMSNorm
from tilemem.layers.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(not paged_decode.available(), reason="needs AVX2 + FMA + F16C and a C compiler")

TORCH_AVX2 = torch.backends.cpu.get_cpu_capability() == "AVX2"  # torch's sums in the order the block reproduces
BS, BLOCKS = 4, 24
POSITIONS = [3, 4, 13]  # the last of a block, the first of the next, the middle of a fourth
SHAPES = {  # H, Hkv, hd, hidden: q's full norm over 1024 values runs torch's sum cascade; hd 36 a tail of 4
    "gqa 4:1": (16, 4, 64, 64),
    "gqa 3:1, hd 36": (6, 2, 36, 48),
}


def torch_rms_norm(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm's torch math (layers/norm.py), which the block reproduces, whatever native norm the module uses."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * xf.to(dtype)


@pytest.fixture(autouse=True)
def torch_norms(monkeypatch):
    monkeypatch.setattr(RMSNorm, "forward", torch_rms_norm)
    monkeypatch.setattr(Attention, "native", lambda self: None)  # the AVX512 decode kernel, where there is one


def attention(shape: str, dtype: torch.dtype, qk_norm: str, clip: float | None, fp32_rotate: bool, seed: int):
    """An Attention layer of random weights, its rope and a paged cache of random contents."""
    h, hkv, hd, d = SHAPES[shape]
    cfg = ModelConfig(
        family="olmoe", architecture="x", vocab_size=8, hidden_size=d, num_layers=1, num_heads=h, num_kv_heads=hkv,
        head_dim=hd, intermediate_size=8, moe_intermediate_size=8, num_experts=2, top_k=1, qk_norm=qk_norm,
        clip_qkv=clip, attention_bias=True, rope=RopeConfig(fp32_rotate=fp32_rotate),
    )  # fmt: skip
    attn = Attention(cfg, 0)
    gen = torch.Generator().manual_seed(seed)
    for name, p in list(attn.named_parameters()):
        mod, attr = attn.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        value = torch.randn(p.shape, generator=gen)
        value = 1 + 0.1 * value if "norm" in name else 0.2 * value
        setattr(mod, attr, torch.nn.Parameter(value.to(dtype), requires_grad=False))
    rope = RotaryEmbedding(cfg.rope, hd, 64)
    cache = KVCache.paged(1, BLOCKS, BS, hkv, hd, hd, dtype)
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=gen))
    return attn, rope, cache


def decode_step(attn, rope, cache, dtype, seed):
    """One decode step of len(POSITIONS) rows with shuffled block tables -> (output, keys, values after it)."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(BLOCKS, generator=gen).tolist()
    tables = [[perm.pop() for _ in range(p // BS + 2)] for p in POSITIONS]  # a spare block past each row's last
    ctx = ForwardContext.paged(cache, tables, POSITIONS, [1] * len(POSITIONS))
    x = torch.randn(len(POSITIONS), 1, attn.q_proj.weight.shape[1], generator=gen).to(dtype)
    cos, sin = rope.table(ctx.positions, dtype)
    out = attn(x, ctx, rope, cos, sin)  # [B, 1, D]
    return out, cache.keys[0].clone(), cache.values[0].clone()


def native_and_torch(monkeypatch, shape, dtype, qk_norm, clip, fp32_rotate):
    """The block's decode step and the torch path's on a copy of the same cache."""
    attn, rope, cache = attention(shape, dtype, qk_norm, clip, fp32_rotate, seed=1)
    before = (cache.keys[0].clone(), cache.values[0].clone())
    calls = []
    monkeypatch.setattr(
        paged_decode, "decode_block", lambda *a, _f=paged_decode.decode_block, **k: calls.append(1) or _f(*a, **k)
    )
    native = decode_step(attn, rope, cache, dtype, seed=2)
    assert calls == [1]
    cache.keys[0].copy_(before[0])
    cache.values[0].copy_(before[1])
    monkeypatch.setattr(paged_decode, "available", lambda: False)
    ref = decode_step(attn, rope, cache, dtype, seed=2)
    assert calls == [1]
    return native, ref, before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("qk_norm", ["none", "full", "head"])
@pytest.mark.parametrize("clip", [None, 1.1], ids=["", "clip"])
@pytest.mark.parametrize("fp32_rotate", [False, True], ids=["", "fp32 rope"])
def test_the_block_equals_the_torch_path(monkeypatch, dtype, qk_norm, clip, fp32_rotate):
    native, ref, before = native_and_torch(monkeypatch, "gqa 4:1", dtype, qk_norm, clip, fp32_rotate)
    exact = TORCH_AVX2 or qk_norm == "none"
    for got, want in zip(native, ref, strict=True):
        assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-2, atol=1e-3)
    for got, old in zip(native[1:], before, strict=True):  # one new position per row and kv head, nothing else
        assert (got != old).any(-1).sum() == len(POSITIONS) * got.shape[1]
    if clip is not None:  # the new values are clipped (at 1.1 rounded to the dtype)
        new = native[2][(native[2] != before[1]).any(-1)]  # [B * Hkv, hd]
        assert new.abs().max() == torch.tensor(clip, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("qk_norm", ["full", "head"])
def test_odd_head_width_and_three_heads_a_kv_head(monkeypatch, dtype, qk_norm):
    native, ref, _ = native_and_torch(monkeypatch, "gqa 3:1, hd 36", dtype, qk_norm, 1.1, False)
    for got, want in zip(native, ref, strict=True):
        assert torch.equal(got, want) if TORCH_AVX2 else torch.allclose(got, want, rtol=1e-2, atol=1e-3)


def block_args(dtype=torch.bfloat16, b=2, h=4, hkv=2, hd=8):
    """Valid `decode_block` arguments: q, k, v, cos, sin, keys, values, tables, positions, scale."""
    keys, values = torch.zeros(6, hkv, BS, hd, dtype=dtype), torch.zeros(6, hkv, BS, hd, dtype=dtype)
    return dict(
        q=torch.randn(b, h * hd).to(dtype), k=torch.randn(b, hkv * hd).to(dtype), v=torch.randn(b, hkv * hd).to(dtype),
        cos=torch.ones(b, hd, dtype=dtype), sin=torch.zeros(b, hd, dtype=dtype), keys=keys, values=values,
        tables=torch.tensor([[0, 1], [2, 3]]), positions=torch.tensor([5, 2]), scale=0.3,
    )  # fmt: skip


BAD = {
    "q fp16": (dict(q=torch.zeros(2, 32, dtype=torch.float16)), "one dtype, float32 or bfloat16"),
    "keys fp32": (dict(keys=torch.zeros(6, 2, BS, 8)), "one dtype"),
    "k of 3 heads": (dict(k=torch.zeros(2, 24, dtype=torch.bfloat16)), r"k and v must be \[2, 16\]"),
    "q not heads": (dict(q=torch.zeros(2, 30, dtype=torch.bfloat16)), "H heads of the cache's even width 8"),
    "cos fp16": (dict(cos=torch.ones(2, 8, dtype=torch.float16)), "cos and sin must be"),
    "cos of 2 rows too few": (dict(cos=torch.ones(1, 8, dtype=torch.bfloat16)), r"cos and sin must be \[2, 8\]"),
    "norm unknown": (dict(norm="rms"), "norm must be one of"),
    "norm without weights": (dict(norm="head"), "needs q_weight as a contiguous"),
    "full norm of head weights": (
        dict(norm="full", q_weight=torch.ones(8, dtype=torch.bfloat16), k_weight=torch.ones(8, dtype=torch.bfloat16)),
        "vector of 32",
    ),
    "tables int32": (dict(tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)), "tables must be int64"),
    "positions of 1 row": (dict(positions=torch.tensor([5])), "positions must be int64 with 1 dims and 2 rows"),
    "position past the table": (dict(positions=torch.tensor([5, 8])), "row 1 is at position 8"),
    "negative position": (dict(positions=torch.tensor([-1, 2])), "row 0 is at position -1"),
    "table entry past N": (dict(tables=torch.tensor([[0, 6], [2, 3]])), "entry outside the cache's 6 blocks"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_and_writes_nothing(case):
    change, match = BAD[case]
    args = block_args() | change
    with pytest.raises(KernelError, match=match):
        paged_decode.decode_block(**args)
    assert not args["keys"].any() and not args["values"].any()


def test_valid_arguments_write_the_new_entries():
    """The counterpart of the refusals: the same arguments, unchanged, write k and v at each row's position."""
    args = block_args()
    out = paged_decode.decode_block(**args)
    assert out.shape == (2, 32) and out.dtype == torch.bfloat16
    assert torch.equal(args["keys"][1, :, 1], args["k"][0].view(2, 8))  # row 0: position 5 = block 1, offset 1
    assert torch.equal(args["values"][2, :, 2], args["v"][1].view(2, 8))  # row 1: position 2 = block 2, offset 2


def test_no_rows_give_an_empty_output():
    args = block_args() | dict(
        q=torch.zeros(0, 32, dtype=torch.bfloat16), k=torch.zeros(0, 16, dtype=torch.bfloat16),
        v=torch.zeros(0, 16, dtype=torch.bfloat16), cos=torch.ones(0, 8, dtype=torch.bfloat16),
        sin=torch.zeros(0, 8, dtype=torch.bfloat16), tables=torch.zeros(0, 2, dtype=torch.int64),
        positions=torch.zeros(0, dtype=torch.int64),
    )  # fmt: skip
    assert paged_decode.decode_block(**args).shape == (0, 32) and not args["keys"].any()


def test_interleaved_rope_keeps_the_torch_path(monkeypatch):
    """DeepSeek's interleaved pairs are not the block's: such a layer decodes through the torch modules."""
    attn, _, cache = attention("gqa 4:1", torch.float32, "none", None, False, seed=1)
    rope = RotaryEmbedding(RopeConfig(interleave=True), 64, 64)
    calls = []
    monkeypatch.setattr(paged_decode, "decode_block", lambda *a, **k: calls.append(1))
    out, _, _ = decode_step(attn, rope, cache, torch.float32, seed=2)
    assert calls == [] and out.shape == (len(POSITIONS), 1, 64) and out.isfinite().all()


def greedy(
    model, prompts: list[list[int]], steps: int, tables: list[list[int]] | None = None, blocks: int = 32,
    routed: dict | None = None,
) -> tuple[list[list[int]], torch.Tensor]:  # fmt: skip
    """Greedy decoding of the prompts side by side from the model's forward on a paged cache of `blocks` blocks of 4
    (each row's block table from `tables`, default 16 blocks a row in reverse order) -> (tokens per row, logits
    [steps, B, V] of the decode steps); `routed` collects each MoE layer's routed ids per decode step."""
    n = len(prompts)
    cache = model.allocate_paged(blocks, 4)
    tables = tables or [list(range(31 - 16 * r, 15 - 16 * r, -1)) for r in range(n)]
    tokens, logits = [[] for _ in prompts], []
    for r, prompt in enumerate(prompts):  # prefill row by row (the torch path either way)
        ctx = ForwardContext.paged(cache, [tables[r]], [0], [len(prompt)])
        out = model(torch.tensor([prompt]), ctx, logits_at=torch.tensor([len(prompt) - 1]))[0]  # [V]
        tokens[r].append(int(out.argmax()))
    for layer in model.model.layers:
        if routed is not None and hasattr(layer.mlp, "on_route"):
            layer.mlp.on_route = lambda li, ids: routed.setdefault(li, []).append(ids.clone())
    starts = [len(p) for p in prompts]
    for _ in range(steps):
        ctx = ForwardContext.paged(cache, tables, starts, [1] * n)
        out = model(torch.tensor([[t[-1]] for t in tokens]), ctx, logits_at=torch.zeros(n, dtype=torch.int64))
        logits.append(out)  # [B, V]
        for r in range(n):
            tokens[r].append(int(out[r].argmax()))
        starts = [s + 1 for s in starts]
    for layer in model.model.layers:
        if hasattr(layer.mlp, "on_route"):
            layer.mlp.on_route = None
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])  # full and per-head q/k norm
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_greedy_tokens_and_logits_are_the_same_with_the_block_off(make_ckpt, monkeypatch, family, dtype):
    llm = LLM(make_ckpt(family, dtype), dtype=dtype)
    llm.model.fused_decode = False  # the AVX512 one-call decoder layers, where there are any
    rng = random.Random(family)
    prompts = [[rng.randrange(llm.config.vocab_size) for _ in range(n)] for n in (11, 6)]
    calls = []
    monkeypatch.setattr(
        paged_decode, "decode_block", lambda *a, _f=paged_decode.decode_block, **k: calls.append(1) or _f(*a, **k)
    )
    on = greedy(llm.model, prompts, 8)
    assert len(calls) == 8 * llm.config.num_layers
    monkeypatch.setattr(paged_decode, "available", lambda: False)
    off = greedy(llm.model, prompts, 8)
    assert len(calls) == 8 * llm.config.num_layers
    assert on[0] == off[0] and torch.equal(on[1], off[1])
    llm.close()
