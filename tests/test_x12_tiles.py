"""The portable x12 tile kernels (`kernels/x12_tiles.py`) against the torch reference (`layers/x12.py`): payloads
byte for byte, decoding bit for bit (exceptions, zeros, subnormals, inf and nan patterns, ragged D), overflow,
row ranges into strided rows, and the fused FFN against the decoded weights' FFN in fp64."""

from __future__ import annotations

import pytest
import torch

from tilemem.errors import X12Overflow
from tilemem.kernels import portable, x12_tiles
from tilemem.layers import x12 as ref

pytestmark = pytest.mark.skipif(
    not x12_tiles.available(),
    reason="x12 tile kernels off: they need AVX2 + FMA and a C compiler, and TILEMEM_KERNELS != 0",
)

TOL = 1e-5  # max abs error / max abs reference: fp32 accumulation in another order
SHAPES = [(3, 32), (9, 96), (7, 128), (33, 160), (12, 2048)]  # [R, D]: D % 64 == 32 and == 0, R odd


def normal(rows: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, d, generator=g) * 0.02).bfloat16()  # [R, D]


def with_bits(w: torch.Tensor, count: int, seed: int, bits: list[int] | None = None) -> torch.Tensor:
    """w with `count` random weights set to random 16-bit patterns (or to `bits`, in turn): rare high bytes."""
    g = torch.Generator().manual_seed(seed)
    out = w.clone().view(torch.int16).reshape(-1)
    at = torch.randperm(out.numel(), generator=g)[:count]
    if bits is None:
        val = torch.randint(0, 1 << 16, (count,), generator=g, dtype=torch.int32)
    else:
        val = torch.tensor([bits[i % len(bits)] for i in range(count)], dtype=torch.int32)
    out[at] = val.to(torch.int16)  # two's complement wrap of the 16-bit pattern
    return out.view(w.shape).view(torch.bfloat16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def roundtrip(w: torch.Tensor) -> torch.Tensor:
    """Encode w both ways, check the payloads are the same bytes and decode (both ways) to w; the payload."""
    rows, d = w.shape
    payload = x12_tiles.encode(w)
    assert payload.numel() == ref.payload_bytes(rows, d) == x12_tiles.payload_bytes(rows, d)
    assert torch.equal(payload, ref.encode(w))
    assert same_bits(x12_tiles.decode(payload, rows, d), w)
    assert same_bits(ref.decode(payload, rows, d), w)
    return payload


@pytest.mark.parametrize(("rows", "d"), SHAPES)
def test_normal_weights_roundtrip_as_the_reference(rows, d, threads):
    roundtrip(normal(rows, d, rows * d))


@pytest.mark.parametrize(("rows", "d"), SHAPES)
def test_exceptions_roundtrip(rows, d, threads):
    """Rare exponents forced in (up to the capacity): the exceptions hold them, columns ascending."""
    cap = ref.tile_cap(rows, d)
    w = with_bits(normal(rows, d, 7), min(cap // 2, rows * d // 5), seed=rows + d)
    payload = roundtrip(w)
    assert x12_tiles.exceptions(payload, rows, d) > 0


def test_zeros_subnormals_inf_nan():
    rows, d = 5, 96
    for w in (torch.zeros(rows, d, dtype=torch.bfloat16), -torch.zeros(rows, d, dtype=torch.bfloat16)):
        roundtrip(w)  # one high byte: the table is filled with the smallest others
    special = [0x0001, 0x807F, 0x00FF, 0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x7F81, 0x8001]  # subnormal, inf, nan
    roundtrip(with_bits(normal(rows, d, 3), 40, seed=4, bits=special))  # common enough to be in the table
    w = with_bits(normal(rows, 2048, 3), len(special), seed=4, bits=special)
    assert x12_tiles.exceptions(roundtrip(w), rows, 2048) > 0  # rare: most are exceptions
    # subnormals as the common weights (high bytes 0x00 and 0x80, every low byte)
    sub = torch.randint(0, 256, (rows, d), dtype=torch.int32) | (torch.randint(0, 2, (rows, d)) << 15).int()
    roundtrip(sub.to(torch.int16).view(torch.bfloat16))


def test_overflow_past_cap():
    """Exactly cap exceptions fit; one more raises X12Overflow (as the reference does)."""
    rows, d = 8, 512
    cap = x12_tiles.tile_cap(rows, d)
    assert cap == ref.tile_cap(rows, d) == 64
    col = torch.arange(d).expand(rows, d)
    base = (0x30 + col % 16) << 8 | torch.randint(0, 256, (rows, d))  # 16 common high bytes
    flat = base.reshape(-1).clone()
    at = torch.randperm(rows * d)[: cap + 1]
    flat[at] = (0x50 + torch.arange(cap + 1) % 32) << 8 | 0x11  # 32 rare ones, 2-3 each
    ok = flat.clone()
    ok[at[-1]] = base.reshape(-1)[at[-1]]
    w_ok = ok.view(rows, d).to(torch.int16).view(torch.bfloat16)
    assert x12_tiles.exceptions(roundtrip(w_ok), rows, d) == cap
    w_bad = flat.view(rows, d).to(torch.int16).view(torch.bfloat16)
    with pytest.raises(X12Overflow, match="65 weights"):
        x12_tiles.encode(w_bad)
    with pytest.raises(X12Overflow):
        ref.encode(w_bad)
    random_bits = torch.randint(-(1 << 15), 1 << 15, (rows, d), dtype=torch.int16).view(torch.bfloat16)
    with pytest.raises(X12Overflow):
        x12_tiles.encode(random_bits)


def test_row_range_into_strided_rows(threads):
    rows, d = 11, 96
    w = with_bits(normal(rows, d, 5), 30, seed=6)
    payload = x12_tiles.encode(w)
    buf = torch.full((8, d + 40), -7.0, dtype=torch.bfloat16)
    got = x12_tiles.decode(payload, rows, d, r0=3, nrows=5, out=buf[2:7, 8 : 8 + d])  # row stride d + 40
    assert same_bits(got, w[3:8])
    assert same_bits(buf[2:7, 8 : 8 + d], w[3:8])
    rest = buf.clone()
    rest[2:7, 8 : 8 + d] = -7.0
    assert bool((rest == -7.0).all())  # nothing written outside the rows asked for
    assert x12_tiles.decode(payload, rows, d, r0=rows, nrows=0).shape == (0, d)


def tile(n: int, d: int, seed: int, rounds: int = 0) -> torch.Tensor:
    """A tile W [3n, D] of normal weights at least 2^-9 in magnitude (6 to 8 high bytes), 42 * `rounds` of them
    set to other high bytes: 18 tiny ones (below 2^-10) twice a round, 6 moderate ones (0.125 .. 8) once. The
    table's spare places go to tiny ones: every moderate one is an exception, and so are some tiny ones."""
    w = normal(3 * n, d, seed).float()
    w = (torch.sign(w) + (w == 0)) * w.abs().clamp(min=2.0**-9)  # [3n, D]
    tiny = [*range(0x32, 0x3B), *range(0xB2, 0xBB)]
    high = tiny * 2 + [0x3E, 0x3F, 0x40, 0xBE, 0xBF, 0xC0]
    bits = [high[i % len(high)] << 8 | 37 * i % 256 for i in range(len(high))]
    return with_bits(w.bfloat16(), 42 * rounds, seed + 1, bits=bits) if rounds else w.bfloat16()


def ffn_reference(x: torch.Tensor, tasks: list, act: str) -> torch.Tensor:
    """out [T, D]: every task's FFN on its decoded bf16 weights, in fp64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for weights, tok, weight in tasks:
        n, d = weights.n, weights.hidden
        w = ref.decode(weights.payload, 3 * n, d).double()  # [3n, D]
        xt = x.double()[tok.long()]  # [N, D]
        h = portable.TORCH_ACTS[act](xt @ w[:n].T) * (xt @ w[n : 2 * n].T)  # [N, n]
        out.index_add_(0, tok.long(), (h @ w[2 * n :]) * weight.double()[:, None])
    return out


def make_tasks(d: int, ntok: int, t: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for q, n in enumerate((37, 8, 1)):
        w = tile(n, d, seed + q, rounds=1 + (n > 8))
        tok = torch.randperm(t, generator=g)[: min(ntok, t)].int()  # tasks share tokens
        if ntok > t:
            tok = torch.randint(0, t, (ntok,), generator=g).int()
        weight = torch.rand(tok.numel(), generator=g) + 0.5
        tasks.append(x12_tiles.FfnTask(x12_tiles.FfnWeights(x12_tiles.encode(w), n, d), tok, weight))
    return tasks


@pytest.mark.parametrize("act", sorted(portable.ACTS))
@pytest.mark.parametrize("ntok", [1, 3, 8, 11])
@pytest.mark.parametrize("d", [96, 256])
def test_ffn_matches_reference(act, ntok, d, threads):
    t = 12
    x = torch.randn(t, d + 8, generator=torch.Generator().manual_seed(ntok))[:, 4 : 4 + d]  # row stride d + 8
    tasks = make_tasks(d, ntok, t, seed=ntok * 10 + d)
    assert all(x12_tiles.exceptions(tk.weights.payload, 3 * tk.weights.n, d) >= 6 for tk in tasks)
    start = torch.randn(t, d)
    wide = torch.zeros(t, d + 16)
    out = wide[:, 16:]  # row stride d + 16
    out.copy_(start)
    x12_tiles.ffn_tasks(x, tasks, act, out)
    assert bool((wide[:, :16] == 0).all())
    want = ffn_reference(x, tasks, act) + start.double()
    err = (out.double() - want).abs().max() / want.abs().max()
    assert err < TOL, f"relative error {err:.2e}"


def test_ffn_tile_of_2048_one_token(threads):
    """A decode-sized tile (128 neurons, D = 2048) at one token: the speed path."""
    n, d = 128, 2048
    payload = x12_tiles.encode(tile(n, d, 1, rounds=10))
    tasks = [x12_tiles.FfnTask(x12_tiles.FfnWeights(payload, n, d), torch.tensor([1], dtype=torch.int32),
                               torch.tensor([0.7]))]  # fmt: skip
    x = torch.randn(3, d)
    out = torch.zeros(3, d)
    x12_tiles.ffn_tasks(x, tasks, "silu", out)
    want = ffn_reference(x, tasks, "silu")
    assert (out.double() - want).abs().max() / want.abs().max() < TOL
    assert bool((out[0] == 0).all() and (out[2] == 0).all())


def mutated_payload(w: torch.Tensor, n: int, d: int, kind: str) -> torch.Tensor:
    """w's payload with one down-row weight changed: its exception's value, or its code nibble (a sign flip)."""
    payload = x12_tiles.encode(w)
    lo, hc, tab, xrow, xval = ref.parts(payload, 3 * n, d)
    if kind == "exception":
        r = next(r for r in range(2 * n, 3 * n) if xrow[r + 1] > xrow[r])
        i = int(xrow[r])
        xval[i] = (int(xval[i]) & ~0xFFFF) | 0x4040  # the weight becomes 3.0
        return payload
    row, col = 2 * n, 5  # chunk byte p holds column 5 for p = 5: the low nibble of code byte 5
    code = int(hc[row, 5]) & 0xF
    table = tab[:16].tolist()
    flipped = table[code] ^ 0x80
    new = table.index(flipped) if flipped in table else (code + 1) % 16
    hc[row, 5] = (int(hc[row, 5]) & 0xF0) | new
    assert col == 5
    return payload


@pytest.mark.parametrize("kind", ["exception", "code"])
def test_mutation_is_seen(kind):
    """A changed exception entry or code nibble changes decode and the FFN, as the reference reads it."""
    n, d = 6, 64
    w = tile(n, d, 11, rounds=1)
    w[2 * n, 5] = 0.046875  # a weight of a common high byte (0x3D) whose sign flip shows
    payload = mutated_payload(w, n, d, kind)
    got = x12_tiles.decode(payload, 3 * n, d)
    changed = (got.view(torch.int16) != w.view(torch.int16)).nonzero().tolist()
    assert len(changed) == 1 and changed[0][0] >= 2 * n  # one down-row weight
    assert same_bits(got, ref.decode(payload, 3 * n, d))
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(12))
    tok, weight = torch.tensor([0], dtype=torch.int32), torch.tensor([1.0])
    tasks = [x12_tiles.FfnTask(x12_tiles.FfnWeights(payload, n, d), tok, weight)]
    out = torch.zeros(1, d)
    x12_tiles.ffn_tasks(x, tasks, "silu", out)
    want = ffn_reference(x, tasks, "silu")  # the mutated weights
    assert (out.double() - want).abs().max() / want.abs().max() < TOL
    original = [x12_tiles.FfnTask(x12_tiles.FfnWeights(x12_tiles.encode(w), n, d), tok, weight)]
    before = ffn_reference(x, original, "silu")
    assert (out.double() - before).abs().max() / before.abs().max() > 10 * TOL  # the original: not within TOL


def test_bad_input_is_refused():
    n, d = 4, 64
    w = tile(n, d, 2)
    payload = x12_tiles.encode(w)
    with pytest.raises(x12_tiles.X12Error, match="multiple of 32"):
        x12_tiles.encode(torch.zeros(3, 48, dtype=torch.bfloat16))
    with pytest.raises(x12_tiles.X12Error, match="bfloat16"):
        x12_tiles.encode(w.float())
    with pytest.raises(x12_tiles.X12Error, match=f"{payload.numel()} bytes"):
        x12_tiles.decode(payload[:-4], 3 * n, d)
    with pytest.raises(x12_tiles.X12Error, match="bytes"):
        x12_tiles.FfnWeights(payload, n + 1, d)
    with pytest.raises(x12_tiles.X12Error, match="within"):
        x12_tiles.decode(payload, 3 * n, d, r0=10, nrows=5)
    with pytest.raises(x12_tiles.X12Error, match="contiguous rows"):
        x12_tiles.decode(payload, 3 * n, d, out=torch.zeros(d, 3 * n, dtype=torch.bfloat16).T)
    weights = x12_tiles.FfnWeights(payload, n, d)
    x, out = torch.randn(2, d), torch.zeros(2, d)
    bad_tok = x12_tiles.FfnTask(weights, torch.tensor([0, 2], dtype=torch.int32), torch.ones(2))
    with pytest.raises(x12_tiles.X12Error, match=r"token rows must be in \[0, 2\)"):
        x12_tiles.ffn_tasks(x, [bad_tok], "silu", out)
    with pytest.raises(x12_tiles.X12Error, match="act must be one of"):
        x12_tiles.ffn_tasks(x, [], "tanh", out)
    with pytest.raises(x12_tiles.X12Error, match="hidden size"):
        x12_tiles.ffn_tasks(torch.randn(2, 32), [bad_tok], "silu", torch.zeros(2, 32))
    assert bool((out == 0).all())
    corrupt = payload.clone()
    xval = ref.parts(corrupt, 3 * n, d)[4]
    xrow = ref.parts(corrupt, 3 * n, d)[3]
    xrow[1:] = 1  # row 0 has one exception, at a column past D
    xval[0] = d << 16
    with pytest.raises(x12_tiles.X12Error, match="corrupt"):
        x12_tiles.decode(corrupt, 3 * n, d)
    task = x12_tiles.FfnTask(x12_tiles.FfnWeights(corrupt, n, d), torch.tensor([0], dtype=torch.int32), torch.ones(1))
    with pytest.raises(x12_tiles.X12Error, match="corrupt"):
        x12_tiles.ffn_tasks(x, [task], "silu", out)
