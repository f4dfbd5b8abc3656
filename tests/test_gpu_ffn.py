"""The GPU expert-FFN shapes (`tilemem.layers.gpu_ffn`) equal a plain per-expert FFN. They are
device-agnostic, so these run on the CPU too (test_gpu.py runs them inside the model on a GPU)."""

from __future__ import annotations

import pytest
import torch

from tilemem.layers.gpu_ffn import TileSlab, gathered_ffn, padded_ffn, stacked_ffn
from tilemem.layers.mlp import activation
from tilemem.layers.moe import expert_ffn

D, I, E = 24, 20, 5


def experts(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(*shape, generator=gen) / 4 for shape in ((I, D), (I, D), (D, I))] for _ in range(E)]


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_gathered_ffn_equals_per_expert_loop(act):
    ws, fn = experts(), activation(act)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, D, generator=gen)
    tok = torch.tensor([0, 0, 1, 2, 2, 2])
    unit = torch.tensor([4, 1, 1, 0, 3, 4])
    scale = torch.rand(6, generator=gen)
    want = torch.zeros(3, D)
    for t, e, s in zip(tok.tolist(), unit.tolist(), scale, strict=True):
        want[t] += s * expert_ffn(x[t : t + 1], *ws[e], fn)[0]
    gate_up = torch.stack([torch.cat([g, u]) for g, u, _ in ws])
    down_t = torch.stack([d.T.contiguous() for _, _, d in ws])
    got = torch.zeros(3, D)
    gathered_ffn(x, gate_up, down_t, tok, unit, scale, fn, got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padded_ffn_equals_per_expert_loop():
    """Prefill shape: uneven expert loads (one expert unused), padded to the busiest expert."""
    ws, fn = experts(4), activation("silu")
    gen = torch.Generator().manual_seed(5)
    t, k = 9, 2
    ids = torch.stack([torch.randperm(E - 1, generator=gen)[:k] for _ in range(t)])  # expert E-1 never routed
    ids[:5, 0] = 2  # expert 2 the busiest
    weights = torch.rand(t, k, generator=gen)
    x = torch.randn(t, D, generator=gen)
    want = torch.zeros(t, D)
    for i in range(t):
        for j in range(k):
            want[i] += weights[i, j] * expert_ffn(x[i : i + 1], *ws[int(ids[i, j])], fn)[0]
    gate_up = torch.stack([torch.cat([g, u]) for g, u, _ in ws])
    down_t = torch.stack([d.T for _, _, d in ws])
    torch.testing.assert_close(padded_ffn(x, gate_up, down_t, weights, ids, fn), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [4, 7, 20])
def test_tile_slab_pads_short_tiles_and_sums_to_the_expert(tile):
    """An expert cut into tiles of `tile` neurons (the last one shorter), stacked in a slab with
    zero padding, gives the whole expert's FFN through both the stacked and the gathered form."""
    fn = activation("silu")
    ws = experts(2)
    blocks = {}
    for e in (1, 3):
        g, u, d = ws[e]
        blocks[e] = [torch.stack([g[a : a + tile], u[a : a + tile], d[:, a : a + tile].T]) for a in range(0, I, tile)]
    slab = TileSlab(blocks, tile, torch.device("cpu"))
    assert slab.slots == {1: (0, len(blocks[1])), 3: (len(blocks[1]), len(blocks[3]))}
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    for e in (1, 3):
        first, count = slab.slots[e]
        want = expert_ffn(x, *ws[e], fn)
        got = stacked_ffn(x, slab.gate_up[first : first + count], slab.down_t[first : first + count], fn)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        out = torch.zeros(4, D)
        tok = torch.arange(4).repeat_interleave(count)
        unit = torch.arange(first, first + count).repeat(4)
        gathered_ffn(x, slab.gate_up, slab.down_t, tok, unit, torch.ones(len(tok)), fn, out)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
