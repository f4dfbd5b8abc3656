"""The portable paged decode attention (`kernels.paged`, AVX2): against its torch reference in fp32 and torch's
own bf16 SDPA on the gathered cache, on shuffled block tables, mixed lengths, GQA, MLA's latent cache and
DeepSeek's sparse top-k selection; bad input refused with KernelError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilemem.errors import KernelError
from tilemem.kernels import paged

needs_native = pytest.mark.skipif(not paged.available(), reason="needs AVX2 + FMA + F16C and a C compiler")

BS = 16


def pools(n: int, hkv: int, dk: int, dv: int | None, dtype: torch.dtype, seed: int):
    """Random pools [n, hkv, BS, dk] and values [n, hkv, BS, dv] (dv None: MLA's latent cache, values the first
    dk - 16 dims of the keys, the same memory)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, hkv, BS, dk, generator=gen).to(dtype)
    values = keys[..., : dk - 16] if dv is None else torch.randn(n, hkv, BS, dv, generator=gen).to(dtype)
    return keys, values


def shuffled_tables(lengths: list[int], n: int, seed: int) -> torch.Tensor:
    """Block tables [B, M] of distinct shuffled blocks; entries past a row's last block 0 (never read)."""
    m = max((x + BS - 1) // BS for x in lengths)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.zeros(len(lengths), m, dtype=torch.int64)
    for r, length in enumerate(lengths):
        for j in range((length + BS - 1) // BS):
            tables[r, j] = perm.pop()
    return tables


def gathered(pool: torch.Tensor, tables: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """Row r's first n positions of a pool as a contiguous cache [1, Hkv, n, D]."""
    return pool[tables[r]].transpose(0, 1).flatten(1, 2)[None, :, :n]


CASES = {  # H, Hkv, Dk, Dv (None: MLA latent), lengths
    "mha": (4, 4, 64, 64, [1, 37, 100]),
    "gqa 4:1, odd widths": (8, 2, 52, 36, [17, 64, 5]),
    "gqa 3:1 (a chunk of 3 heads)": (6, 2, 32, 40, [48, 33]),
    "mla latent": (16, 1, 80, None, [29, 70, 16]),
}


@needs_native
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("select", [False, True])
def test_fp32_matches_the_torch_reference(case, select):
    h, hkv, dk, dv, lengths = CASES[case]
    keys, values = pools(40, hkv, dk, dv, torch.float32, seed=1)
    tables = shuffled_tables(lengths, 40, seed=2)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(len(lengths), h, dk, generator=gen)
    lens = torch.tensor(lengths)
    sel = None
    if select:  # up to 12 positions per row, -1 padded; the last row selects nothing
        sel = torch.full((len(lengths), 12), -1, dtype=torch.int64)
        for r, n in enumerate(lengths[:-1]):
            picked = torch.randperm(n, generator=gen)[:10]
            sel[r, : picked.numel()] = picked
    got = paged.paged_attention(q, keys, values, tables, lens, dk**-0.5, sel)
    want = paged.paged_attention_torch(q, keys, values, tables, lens, dk**-0.5, sel)
    assert got.shape == (len(lengths), h, values.shape[3]) and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5
    if select:
        assert torch.equal(got[-1], torch.zeros_like(got[-1]))  # nothing to attend: zeros
        r = 0  # the selection is the attention over the selected positions alone
        pos = sel[r][sel[r] >= 0]
        k, v = (gathered(t, tables, r, lengths[r])[0][:, pos] for t in (keys, values))  # [Hkv, P, D]
        k, v = (t.repeat_interleave(h // hkv, 0) for t in (k, v))
        s = torch.softmax(torch.einsum("hd,hpd->hp", q[r], k) * dk**-0.5, -1)
        assert (got[r] - torch.einsum("hp,hpd->hd", s, v)).abs().max() < 1e-5


@needs_native
@pytest.mark.parametrize("case", CASES)
def test_bf16_is_as_close_as_torch_sdpa_on_the_gathered_cache(case):
    h, hkv, dk, dv, lengths = CASES[case]
    keys, values = pools(40, hkv, dk, dv, torch.bfloat16, seed=4)
    tables = shuffled_tables(lengths, 40, seed=5)
    q = torch.randn(len(lengths), h, dk, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    lens = torch.tensor(lengths)
    got = paged.paged_attention(q, keys, values, tables, lens, dk**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == (len(lengths), h, values.shape[3])
    exact = paged.paged_attention_torch(q.float(), keys.float(), values.float(), tables, lens, dk**-0.5)
    for r, n in enumerate(lengths):
        k, v = gathered(keys, tables, r, n), gathered(values, tables, r, n)
        sdpa = F.scaled_dot_product_attention(q[r][None, :, None], k, v, scale=dk**-0.5, enable_gqa=h != hkv)[0, :, 0]
        ours_err, torch_err = (got[r].float() - exact[r]).abs().max(), (sdpa.float() - exact[r]).abs().max()
        assert ours_err <= 1.25 * torch_err + 1e-3, (r, ours_err, torch_err)
        assert (got[r].float() - sdpa.float()).abs().max() <= 2 * torch_err + 4e-3


@needs_native
def test_one_row_on_many_threads_gives_the_same_bits():
    keys, values = pools(64, 1, 80, None, torch.bfloat16, seed=7)
    tables = shuffled_tables([1000], 64, seed=8)
    q = torch.randn(1, 16, 80, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged.paged_attention(q, keys, values, tables, torch.tensor([1000]), 0.1)
        torch.set_num_threads(2)
        two = paged.paged_attention(q, keys, values, tables, torch.tensor([1000]), 0.1)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_the_torch_path_runs_where_the_library_cannot(monkeypatch):
    keys, values = pools(10, 2, 32, 32, torch.float32, seed=10)
    tables = shuffled_tables([20, 9], 10, seed=11)
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(12))
    lens = torch.tensor([20, 9])
    want = paged.paged_attention_torch(q, keys, values, tables, lens, 0.2)
    monkeypatch.setattr(paged, "lib", lambda: None)
    assert torch.equal(paged.paged_attention(q, keys, values, tables, lens, 0.2), want)


@pytest.mark.parametrize("native", [True, False])
def test_bad_input_raises_kernel_error(native, monkeypatch):
    if native and not paged.available():
        pytest.skip("needs AVX2 + FMA + F16C and a C compiler")
    if not native:
        monkeypatch.setattr(paged, "lib", lambda: None)
    keys, values = pools(10, 2, 32, 32, torch.float32, seed=13)
    tables = shuffled_tables([20, 9], 10, seed=14)  # [2, 2]
    q = torch.randn(2, 4, 32)
    lens = torch.tensor([20, 9])
    call = lambda **kw: paged.paged_attention(  # noqa: E731
        **{"q": q, "keys": keys, "values": values, "tables": tables, "lengths": lens, "scale": 0.2, **kw}
    )
    bad = [
        (dict(q=q.half()), "float32 or bfloat16"),
        (dict(values=values.to(torch.bfloat16)), "float32 or bfloat16"),
        (dict(tables=tables.int()), "tables must be int64"),
        (dict(q=q[:, :3]), "dividing 3"),
        (dict(tables=torch.where(tables == tables[1, 0], 10, tables)), "entry 10 is out of range of the cache's 10"),
        (dict(tables=torch.where(tables == tables[0, 1], -1, tables)), "row 0's block table .* outside"),
        (dict(lengths=torch.tensor([20, 33])), "row 1 has length 33, but its block table holds 2 blocks"),
        (dict(select=torch.tensor([[3, -1], [9, 2]])), "row 1 selects position 9, past its length 9"),
        (dict(keys=torch.randn(10, 2, BS, 64)[..., ::2]), "unit stride"),
    ]
    for kw, match in bad:
        with pytest.raises(KernelError, match=match):
            call(**kw)
    # unused entries (past a row's last block) are never read, whatever they hold
    tables[1, 1] = -5
    call(tables=tables)
