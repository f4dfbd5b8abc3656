"""The portable paged DSA indexer scores (`kernels.paged_index`, AVX2): against their torch reference on shuffled
block tables, mixed lengths, bf16 and fp32 keys; bad input refused with KernelError; and a DeepSeek-V3.2 model's
decode through the kernel keeps the same top-k keys (and logits) as the torch path."""

from __future__ import annotations

import random

import pytest
import torch

from tilemem.errors import KernelError
from tilemem.kernels import paged_index
from tilemem.layers.dsa import Indexer
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import load_model

needs_native = pytest.mark.skipif(not paged_index.available(), reason="needs AVX2 + FMA + F16C and a C compiler")

BS = 16


def shuffled_tables(lengths: list[int], n: int, seed: int) -> torch.Tensor:
    """Block tables [B, M] of distinct shuffled blocks; entries past a row's last block 0 (never read)."""
    m = max(1, max((x + BS - 1) // BS for x in lengths))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.zeros(len(lengths), m, dtype=torch.int64)
    for r, length in enumerate(lengths):
        for j in range((length + BS - 1) // BS):
            tables[r, j] = perm.pop()
    return tables


def inputs(hi: int, di: int, lengths: list[int], dtype: torch.dtype, seed: int = 0):
    """Random q [B, Hi, Di] (dtype), weights [B, Hi], a pool [n, 1, BS, Di] (dtype), shuffled tables, lengths."""
    gen = torch.Generator().manual_seed(seed)
    n = sum((x + BS - 1) // BS for x in lengths) + 3
    keys = torch.randn(n, 1, BS, di, generator=gen).to(dtype)
    q = torch.randn(len(lengths), hi, di, generator=gen).to(dtype)
    weights = torch.randn(len(lengths), hi, generator=gen) * hi**-0.5
    return q, weights, keys, shuffled_tables(lengths, n, seed + 1), torch.tensor(lengths, dtype=torch.int64)


def check_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same shape, -inf at the same places, finite values equal up to fp32 rounding of the sums."""
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(ours))
    assert (ours[~finite] == float("-inf")).all()
    big = float(ref[finite].abs().max()) if finite.any() else 0.0
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-5, atol=1e-5 * max(big, 1.0))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hi", [1, 4, 64])
@pytest.mark.parametrize("di", [32, 128])
def test_matches_the_torch_reference(dtype, hi, di):
    lengths = [1, 300, 37, 0, 16, 17]  # a one-position row, several chunks, a block boundary, an empty row
    q, weights, keys, tables, lengths_t = inputs(hi, di, lengths, dtype, seed=hi + di)
    scale = di**-0.5
    ours = paged_index.paged_index_scores(q, weights, keys, tables, lengths_t, scale)
    ref = paged_index.paged_index_scores_torch(q, weights, keys, tables, lengths_t, scale)
    assert ours.shape == (len(lengths), max(lengths))
    check_close(ours, ref)
    # The reference itself is the indexer's formula on the gathered keys.
    r = 1
    k = keys[tables[r, : (lengths[r] + BS - 1) // BS], 0].flatten(0, 1)[: lengths[r]].float()  # [L, Di]
    direct = (weights[r, :, None] * torch.relu(q[r].float() @ k.T * scale)).sum(0)  # [L]
    torch.testing.assert_close(ref[r, : lengths[r]], direct, rtol=1e-5, atol=1e-4)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_odd_heads_strided_pool_and_threads(threads):
    """3 heads (a padded head group), width 36 (a tail past the 8-wide vectors), a pool that is a strided view."""
    q, weights, keys, tables, lengths = inputs(3, 36, [5, 260, 129], torch.bfloat16, seed=7)
    wide = torch.zeros(keys.shape[0], 1, BS, 40, dtype=keys.dtype)
    wide[..., 2:38] = keys
    view = wide[..., 2:38]  # [n, 1, BS, 36], row stride 40
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = paged_index.paged_index_scores(q, weights, view, tables, lengths, 0.25)
    finally:
        torch.set_num_threads(before)
    check_close(ours, paged_index.paged_index_scores_torch(q, weights, keys, tables, lengths, 0.25))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "q": a["q"].half()}, "float32 or bfloat16"),
        (lambda a: {**a, "weights": a["weights"].double()}, "weights torch.float64"),
        (lambda a: {**a, "keys": a["keys"].expand(-1, 2, -1, -1)}, r"keys \[N, 1, bs, Di\]"),
        (lambda a: {**a, "weights": a["weights"][:, :2]}, "weights"),
        (lambda a: {**a, "keys": a["keys"][..., :16]}, "keys need that width"),
        (lambda a: {**a, "keys": torch.zeros(len(a["keys"]), 1, 32, BS, dtype=torch.bfloat16).transpose(2, 3)}, "unit"),
        (lambda a: {**a, "tables": a["tables"].int()}, "tables must be int64"),
        (lambda a: {**a, "lengths": a["lengths"][:1]}, "lengths must be int64 with 1 dims and 2 rows"),
        (lambda a: {**a, "lengths": torch.tensor([5, 100])}, "row 1 has length 100"),
        (lambda a: {**a, "tables": a["tables"] + 50}, "outside the cache's"),
    ],
    ids=[
        "q fp16",
        "weights fp64",
        "two kv heads",
        "weights shape",
        "key width",
        "strided last dim",
        "tables int32",
        "lengths rows",
        "length past table",
        "table entry",
    ],  # fmt: skip
)
@pytest.mark.parametrize("impl", ["native", "torch"])
def test_bad_input_raises_kernel_error(change, match, impl):
    if impl == "native" and not paged_index.available():
        pytest.skip("needs AVX2 + FMA + F16C and a C compiler")
    q, weights, keys, tables, lengths = inputs(4, 32, [5, 20], torch.bfloat16)
    args = change(dict(q=q, weights=weights, keys=keys, tables=tables, lengths=lengths))
    fn = paged_index.paged_index_scores if impl == "native" else paged_index.paged_index_scores_torch
    with pytest.raises(KernelError, match=match):
        fn(args["q"], args["weights"], args["keys"], args["tables"], args["lengths"], 0.5)


def run_decode(model, prompts: list[list[int]], steps: int, seed: int) -> tuple[list[torch.Tensor], list]:
    """Prefill `prompts` into a paged cache of shuffled blocks, then `steps` greedy decode steps; returns each
    step's logits [B, V] and every indexer call's top positions [B, T, K] (decode steps only)."""
    bs = 4
    total = [len(p) + steps for p in prompts]
    need = [(n + bs - 1) // bs for n in total]
    blocks = list(range(sum(need) + 2))
    random.Random(seed).shuffle(blocks)
    tables = [[blocks.pop() for _ in range(m)] for m in need]
    cache = model.allocate_paged(sum(need) + 2, bs)
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    lens = [len(p) for p in prompts]
    tops: list = []
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: tops.append(out[1]))
        for m in model.modules()
        if isinstance(m, Indexer)
    ]
    try:
        with torch.no_grad():
            logits = model(ids, ForwardContext.paged(cache, tables, [0] * len(prompts), lens))
            tops.clear()
            nxt = torch.stack([logits[i, n - 1] for i, n in enumerate(lens)]).argmax(-1)  # [B]
            out = []
            for s in range(steps):
                ctx = ForwardContext.paged(cache, tables, [n + s for n in lens], [1] * len(prompts))
                step = model(nxt[:, None], ctx)[:, 0]  # [B, V]
                out.append(step)
                nxt = step.argmax(-1)
    finally:
        for h in hooks:
            h.remove()
    return out, tops


@needs_native
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_decode_through_the_kernel_keeps_the_torch_top_k(dtype, make_ckpt, monkeypatch):
    model, _ = load_model(make_ckpt("deepseek_v32", dtype), dtype)
    topk = model.cfg.index_topk
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (topk + 9, 3, 21)]
    calls = []
    real = paged_index.paged_index_scores
    monkeypatch.setattr(paged_index, "paged_index_scores", lambda *a: calls.append(1) or real(*a))
    logits, tops = run_decode(model, prompts, steps=6, seed=1)
    assert calls, "decode did not go through the kernel"
    assert any(t is not None for t in tops), "every decode step skipped the scoring (kv_len <= index_topk)"
    monkeypatch.setattr(paged_index, "available", lambda: False)
    calls.clear()
    ref_logits, ref_tops = run_decode(model, prompts, steps=6, seed=1)
    assert not calls
    assert len(tops) == len(ref_tops)
    for ours, ref in zip(tops, ref_tops, strict=True):
        assert (ours is None) == (ref is None)
        if ours is not None:
            assert torch.equal(ours.sort(-1).values, ref.sort(-1).values)
    for ours, ref in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
