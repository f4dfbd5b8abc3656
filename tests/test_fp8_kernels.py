"""FP8 kernels (e4m3 + 128x128 block scales, `kernels/fp8.py`) against fp32 torch references."""

from __future__ import annotations

import pytest
import torch

from tilemem.kernels import fp8

pytestmark = pytest.mark.skipif(
    not fp8.available(),
    reason="fp8 kernels off: they need AVX2 + FMA + F16C and a C compiler, and TILEMEM_KERNELS != 0",
)

TOL = 1e-5  # max abs error / max abs reference: fp32 accumulation in another order
NAN_BYTES = (0x7F, 0xFF)
SHAPES = [(300, 200), (129, 257), (64, 96), (256, 384), (700, 136)]  # [R, C]: ragged and whole blocks;
# 700 rows: matmul_nn takes them in two passes (512 + 188), adding the second to the first
TOKENS = [1, 2, 3, 5, 8, 17, 40, 70]  # matmul_nn: 40 and 70 go the prefill way (dequantized blocks +
# torch GEMM), matmul_nt: 70


def fp8_bytes(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random e4m3 [rows, cols] over every byte but NaN: subnormals and -0 included."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 254, (rows, cols), generator=g, dtype=torch.int32)
    b = b + (b >= 0x7F).int()  # 0..253 -> 0x00..0xFE without 0x7F
    return b.to(torch.uint8).view(torch.float8_e4m3fn)


def random_weight(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    scale = torch.rand(-(-rows // 128), -(-cols // 128), generator=g) * 2 + 0.01  # [R/128, C/128]
    return fp8_bytes(rows, cols, seed), scale


def reference(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W as fp32 [R, C]: each element times its block's scale, computed by torch."""
    rows, cols = data.shape
    per_element = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]  # [R, C]
    return data.float() * per_element


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_decode_is_exact_for_every_byte() -> None:
    b = torch.tensor([v for v in range(256) if v not in NAN_BYTES], dtype=torch.uint8).reshape(1, 254)
    data = b.view(torch.float8_e4m3fn)
    got = fp8.dequantize(data, torch.ones(1, 2))
    assert torch.equal(got.view(torch.int32), data.float().view(torch.int32))  # bit for bit: -0, subnormals
    scale = torch.tensor([[0.75, 3.0]])
    assert torch.equal(fp8.dequantize(data, scale), reference(data, scale))


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize(shape: tuple[int, int]) -> None:
    data, scale = random_weight(*shape)
    want = reference(data, scale)
    assert torch.equal(fp8.dequantize(data, scale), want)
    assert torch.equal(fp8.dequantize(data, scale, slice(128, None)), want[128:])
    assert torch.equal(fp8.dequantize(data, scale, slice(37, 131)), want[37:131])
    assert fp8.dequantize(data, scale, slice(5, 5)).shape == (0, shape[1])
    buf = torch.full((200, shape[1]), float("nan"))
    assert fp8.dequantize(data, scale, slice(20, 60), out=buf[:40]).data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:40], want[20:60])


@pytest.mark.parametrize("shape", SHAPES)
def test_matmuls(shape: tuple[int, int]) -> None:
    data, scale = random_weight(*shape, seed=shape[0])
    w = reference(data, scale)
    rows, cols = shape
    g = torch.Generator().manual_seed(7)
    for n in TOKENS:
        x = torch.randn(n, cols, generator=g)  # [N, C]
        assert error(fp8.matmul_nt(x, data, scale), x @ w.T) < TOL, f"matmul_nt N={n}"
        x = torch.randn(n, rows, generator=g)  # [N, R]
        assert error(fp8.matmul_nn(x, data, scale), x @ w) < TOL, f"matmul_nn N={n}"


def test_matmul_nt_tile_tails() -> None:
    """Every remainder of the register tiles (3 rows at 1-2 tokens, 2 at 3-4) in a block and after a whole one,
    on a row width with a partial 16 (the tail decode) and one without."""
    g = torch.Generator().manual_seed(11)
    for cols in (40, 64):
        for rows in (*range(1, 8), *range(129, 136)):
            data, scale = random_weight(rows, cols, seed=rows)
            w = reference(data, scale)
            for n in (1, 2, 3, 4):
                x = torch.randn(n, cols, generator=g)  # [N, C]
                assert error(fp8.matmul_nt(x, data, scale), x @ w.T) < TOL, f"{rows} rows, {cols} cols, N={n}"


def test_strided_rows_and_threads() -> None:
    """A row slice of a wider matrix (stride(0) > C), on two threads (rows / columns split between them)."""
    big, big_scale = random_weight(384, 320, seed=3)
    data, scale = big[128:300, :200], big_scale[1:3, :2].contiguous()  # rows 128..299, columns 0..199
    assert data.stride(0) == 320
    w = reference(big, big_scale)[128:300, :200]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(fp8.dequantize(data, scale), w)
        for n in (1, 4, 30, 70):  # 30: matmul_nn prefill; 70: both
            x = torch.randn(n, 200)
            assert error(fp8.matmul_nt(x, data, scale), x @ w.T) < TOL
            x = torch.randn(n, 172)
            assert error(fp8.matmul_nn(x, data, scale), x @ w) < TOL
    finally:
        torch.set_num_threads(threads)


def test_wrong_block_scale_is_caught() -> None:
    """The comparison can fail: the scale of the neighbouring block row gives a large error."""
    data, scale = random_weight(300, 200)
    w = reference(data, scale)
    wrong = scale.roll(1, dims=0)
    x = torch.randn(3, 200)
    assert error(fp8.matmul_nt(x, data, wrong), x @ w.T) > 1e-2
    x = torch.randn(3, 300)
    assert error(fp8.matmul_nn(x, data, wrong), x @ w) > 1e-2
    assert error(fp8.dequantize(data, wrong), w) > 1e-2


def test_empty_shapes() -> None:
    data, scale = random_weight(64, 96)
    assert fp8.matmul_nt(torch.zeros(0, 96), data, scale).shape == (0, 64)
    assert fp8.matmul_nn(torch.zeros(0, 64), data, scale).shape == (0, 96)
    empty, empty_scale = random_weight(0, 96)
    assert torch.equal(fp8.matmul_nn(torch.zeros(2, 0), empty, empty_scale), torch.zeros(2, 96))


def test_invalid_inputs() -> None:
    data, scale = random_weight(300, 200)
    x = torch.randn(2, 200)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.matmul_nt(x, data.view(torch.uint8), scale)
    with pytest.raises(ValueError, match="scale has shape"):
        fp8.matmul_nt(x, data, scale[:2])
    with pytest.raises(ValueError, match="scale must be a float32"):
        fp8.dequantize(data, scale.double())
    with pytest.raises(ValueError, match="x has shape"):
        fp8.matmul_nt(torch.randn(2, 300), data, scale)
    with pytest.raises(ValueError, match="x has shape"):
        fp8.matmul_nn(x, data, scale)
    with pytest.raises(ValueError, match="x must be a float32"):
        fp8.matmul_nt(x.bfloat16(), data, scale)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        fp8.matmul_nt(torch.randn(2, 300), data.t(), scale.t().contiguous())
    with pytest.raises(ValueError, match="step 1"):
        fp8.dequantize(data, scale, slice(0, 10, 2))
    with pytest.raises(ValueError, match="out must be"):
        fp8.dequantize(data, scale, slice(0, 10), out=torch.empty(10, 199))


# ---- the AVX512-BF16 1-token path (fp8_avx512.c) ----


def bf16_path(on: int) -> bool:
    """Turns the AVX512-BF16 1-token path on (1, where the CPU has avx512bf16) or off (0); whether it is on."""
    return bool(fp8.lib().tmp_fp8_bf16_path(on))


@pytest.fixture
def paths():
    """The 1-token paths to run: the AVX2 one, and the AVX512-BF16 one where the CPU has it (else skipped)."""
    if not bf16_path(1):
        pytest.skip("the CPU has no avx512bf16")
    try:
        yield bf16_path
    finally:
        bf16_path(1)


def reference64(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W as float64 [R, C]: e4m3 values (exact in float64) times their block's scale."""
    rows, cols = data.shape
    per_element = scale.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return data.double() * per_element


def on_both_paths(paths, x, data, scale, w, what: str) -> dict[int, torch.Tensor]:
    """matmul_nt of x with the AVX512-BF16 path off (0) and on (1), each within TOL of the float64 x @ w.T."""
    want = x.double() @ w.T
    got = {}
    for on in (0, 1):
        assert paths(on) == bool(on)
        got[on] = fp8.matmul_nt(x, data, scale)
        err = ((got[on].double() - want).abs().max() / want.abs().max()).item()
        assert err < TOL, f"{what}, bf16 path {on}: {err:.2e}"
    return got


def test_bf16_path_decodes_every_byte(paths) -> None:
    """Each of the 256 bytes (NaN ones as the AVX2 path reads them: 480), at every position of a 32-column step
    and of the masked tail: one-hot rows of W times x = 1 give W's values, bit for bit, on both paths."""
    every = torch.arange(256, dtype=torch.uint8)
    for cols in (40, 100, 257):
        data = torch.zeros(256, cols, dtype=torch.uint8)
        data[torch.arange(256), torch.arange(256) % cols] = every
        data = data.view(torch.float8_e4m3fn)
        scale = torch.full((2, -(-cols // 128)), 0.75)
        values = data.float().sum(dim=1)  # one value a row
        values[0x7F], values[0xFF] = 480.0, -480.0
        want = values * 0.75
        for on in (0, 1):
            assert paths(on) == bool(on)
            got = fp8.matmul_nt(torch.ones(1, cols), data, scale)[0]
            assert torch.equal(got, want), f"{cols} cols, bf16 path {on}"


def test_bf16_path_matches_reference(paths) -> None:
    """1 token, both paths against a float64 reference: random bytes (subnormals, both signs, zeros, 448), odd
    row counts, widths not a multiple of 32, a 2048-wide decode size; the two paths' results differ (the new
    one ran) and both are within TOL."""
    g = torch.Generator().manual_seed(21)
    for rows, cols in ((7, 40), (131, 257), (300, 200), (129, 2048), (5, 31), (256, 1000)):
        data, scale = random_weight(rows, cols, seed=rows + cols)
        flat = data.view(torch.uint8).view(-1)
        flat[:6] = torch.tensor([0x00, 0x80, 0x7E, 0xFE, 0x01, 0x87], dtype=torch.uint8)  # 0, -0, +-448, subnormals
        w = reference64(data, scale)
        x = torch.randn(1, cols, generator=g) * torch.rand(1, cols, generator=g).pow(4)  # magnitudes spread
        got = on_both_paths(paths, x, data, scale, w, f"{rows}x{cols}")
        if cols >= 200:
            assert not torch.equal(got[0], got[1]), f"{rows}x{cols}: the same sums, did the bf16 path run?"


def bf16_valued(n: int, cols: int, seed: int) -> torch.Tensor:
    """fp32 [n, cols] of bf16 numbers (a bf16 model's activations), magnitudes spread over decades."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, cols, generator=g) * torch.rand(n, cols, generator=g).pow(4)).bfloat16().float()


def test_bf16_valued_x_rows_match_reference(paths) -> None:
    """1-7 tokens of bf16-valued x (fp8_bf16_rows_prepped: one VDPBF16PS a token per 32 weights, each column block's sum
    times its scale) against a float64 reference, the widths and tails of the 1-token test; the same x with the
    path off (the FMA path) gives other sums (the path ran) within TOL too."""
    for rows, cols in ((7, 40), (131, 257), (300, 200), (129, 2048), (5, 31), (256, 1000)):
        data, scale = random_weight(rows, cols, seed=rows + cols)
        w = reference64(data, scale)
        for n in range(1, 8):
            x = bf16_valued(n, cols, seed=n * cols)
            got = on_both_paths(paths, x, data, scale, w, f"{rows}x{cols}, {n} tokens")
            if cols >= 200:
                assert not torch.equal(got[0], got[1]), f"{rows}x{cols}, {n} tokens: did the bf16-x path run?"


@pytest.fixture
def lut():
    """Turns the byte-table decode of the bf16-x rows (AVX512-VBMI) on (1) or off (0); skipped where the CPU has
    no avx512vbmi; back on after."""
    lib = fp8.lib()
    if not lib.tmp_fp8_lut_path(1):
        pytest.skip("the CPU has no avx512vbmi")
    try:
        yield lambda on: bool(lib.tmp_fp8_lut_path(on))
    finally:
        lib.tmp_fp8_lut_path(1)


def test_lut_decode_gives_the_integer_decodes_bits(paths, lut) -> None:
    """The byte tables decode every e4m3 byte (subnormals, zeros, both signs, the NaN bytes read as 480) to the
    integer decode's bf16 value, at every position of a 64-byte step and of the masked tails, and sum in the same
    order: 1-8 tokens of bf16-valued x give the same bits either way, within TOL of float64."""
    every = torch.arange(256, dtype=torch.uint8)
    for cols in (40, 100, 257, 2048):
        data = torch.zeros(256, cols, dtype=torch.uint8)
        data[torch.arange(256), torch.arange(256) % cols] = every
        data = data.view(torch.float8_e4m3fn)
        scale = torch.full((2, -(-cols // 128)), 0.75)
        want = data.float().sum(dim=1) * 0.75
        want[0x7F], want[0xFF] = 480.0 * 0.75, -480.0 * 0.75
        for on in (0, 1):
            assert lut(on) == bool(on)
            assert torch.equal(fp8.matmul_nt(torch.ones(1, cols), data, scale)[0], want), f"{cols} cols, lut {on}"
    for rows, cols in ((131, 257), (300, 200), (129, 2048), (5, 31), (64, 1000)):
        data, scale = random_weight(rows, cols, seed=rows * cols)
        data.view(torch.uint8).view(-1)[:8] = torch.tensor(
            [0, 0x80, 0x7E, 0xFE, 1, 0x87, 0x08, 0x88], dtype=torch.uint8
        )
        w = reference64(data, scale)
        for n in (1, 2, 3, 4, 7):
            x = bf16_valued(n, cols, seed=n + cols)
            got = {}
            for on in (0, 1):
                lut(on)
                got[on] = on_both_paths(paths, x, data, scale, w, f"{rows}x{cols}, {n} tokens, lut {on}")[1]
            assert torch.equal(got[0], got[1]), f"{rows}x{cols}, {n} tokens"


def test_bf16_valued_x_rows_wrong_column_block_scale_is_caught(paths) -> None:
    """The bf16-x path applies each 128-column block's scale to that block's sums: the neighbouring column
    block's scales (rolled along the columns) give a large error, at 1 and 4 tokens."""
    data, scale = random_weight(200, 300, seed=9)
    w = reference64(data, scale)
    wrong = scale.roll(1, dims=1)
    for n in (1, 4):
        x = bf16_valued(n, 300, seed=n)
        want = x.double() @ w.T
        got = fp8.matmul_nt(x, data, wrong).double()
        assert ((got - want).abs().max() / want.abs().max()).item() > 1e-2


# ---- fused expert FFNs ----

TORCH_ACTS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu}


def ffn_task(n: int, d: int, tok: list[int], down_t: bool, seed: int) -> fp8.FfnTask:
    """A task of random fp8 weights (gate, up [n, D]; down [D, n] or, transposed, [n, D])."""
    g = torch.Generator().manual_seed(seed + 100)
    down = random_weight(n, d, seed + 2) if down_t else random_weight(d, n, seed + 2)
    weights = fp8.FfnWeights(random_weight(n, d, seed), random_weight(n, d, seed + 1), down, down_t)
    return fp8.FfnTask(weights, torch.tensor(tok, dtype=torch.int32), torch.rand(len(tok), generator=g) + 0.5)


def ffn_reference(x: torch.Tensor, tasks: list[fp8.FfnTask], act: str) -> torch.Tensor:
    """Every task's FFN of its tokens, summed: weights dequantized by torch, fp32 math."""
    out = torch.zeros_like(x)
    for task in tasks:
        w = task.weights
        gate, up, down = (reference(*m) for m in (w.gate, w.up, w.down))
        xt = x[task.tok.long()]  # [N, D]
        h = TORCH_ACTS[act](xt @ gate.T) * (xt @ up.T)  # [N, n]
        y = h @ down if w.down_t else h @ down.T  # [N, D]
        out.index_add_(0, task.tok.long(), y * task.weight[:, None])
    return out


def ffn_error(x: torch.Tensor, tasks: list[fp8.FfnTask], act: str) -> float:
    got = torch.full_like(x, 0.25)  # accumulated into
    fp8.ffn_tasks(x, tasks, act, got)
    return error(got - 0.25, ffn_reference(x, tasks, act))


@pytest.mark.parametrize("act", sorted(fp8.ACTS))
@pytest.mark.parametrize("threads", [1, 2])
def test_ffn_tasks(act: str, threads: int) -> None:
    """Several tasks of odd widths (partial blocks), both down layouts, 1..5 tokens sharing rows of x."""
    d = 192
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(5))  # [T, D]
    tasks = [
        ffn_task(160, d, [3], False, seed=1),
        ffn_task(160, d, [0, 3, 6], True, seed=2),
        ffn_task(128, d, [1, 2], False, seed=3),
        ffn_task(37, d, [6, 5, 4, 3, 2], True, seed=4),
        ffn_task(300, d, [2, 3, 4, 5], False, seed=5),
        ffn_task(4, d, [0], True, seed=6),
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert ffn_error(x, tasks, act) < TOL
        for q, task in enumerate(tasks):  # each alone
            assert ffn_error(x, [task], act) < TOL, f"task {q}"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("down_t", [False, True])
def test_ffn_tasks_many_tokens(down_t: bool) -> None:
    """9 and 20 tokens: two and three passes of 8 in the kernel; 30: the matmuls (prefill) path."""
    d = 200
    x = torch.randn(32, d, generator=torch.Generator().manual_seed(6))  # [T, D]
    for ntok in (9, 20, 30):
        tok = torch.randperm(32, generator=torch.Generator().manual_seed(ntok))[:ntok].tolist()
        tasks = [ffn_task(136, d, tok, down_t, seed=ntok), ffn_task(64, d, tok[:3], not down_t, seed=1)]
        assert ffn_error(x, tasks, "silu") < TOL, f"{ntok} tokens"


def test_ffn_tasks_wrong_block_scale_is_caught() -> None:
    """The comparison can fail: the neighbouring block row's scales give a large error."""
    d = 192
    x = torch.randn(3, d)
    for down_t in (False, True):
        task = ffn_task(160, d, [0, 2], down_t, seed=8)
        want = ffn_reference(x, [task], "silu")
        w = task.weights
        for field in ("gate", "up", "down"):
            data, scale = getattr(w, field)
            wrong = fp8.FfnWeights(**{"gate": w.gate, "up": w.up, "down": w.down, field: (data, scale.roll(1, 0))},
                                   down_t=down_t)  # fmt: skip
            got = torch.zeros_like(x)
            fp8.ffn_tasks(x, [task._replace(weights=wrong)], "silu", got)
            assert error(got, want) > 1e-2, f"{field} down_t={down_t}"


def test_ffn_tasks_strided_weights() -> None:
    """Checkpoint-style slices: gate/up row blocks and the matching down columns (row stride > n, scale
    columns a strided view), a tile's [3, n, D] block."""
    d, full = 192, 384
    x = torch.randn(2, d)
    gate, up, down = random_weight(full, d, 1), random_weight(full, d, 2), random_weight(d, full, 3)
    part = fp8.FfnWeights(
        (gate[0][128:288], gate[1][1:3]), (up[0][128:288], up[1][1:3]), (down[0][:, 128:288], down[1][:, 1:3])
    )
    assert part.down[0].stride(0) == full and part.down[1].stride(0) == 3  # rows of 2 of 3 blocks
    whole = fp8.FfnWeights(
        (gate[0][128:288].contiguous(), gate[1][1:3].contiguous()), (up[0][128:288].contiguous(), up[1][1:3]),
        (down[0][:, 128:288].contiguous(), down[1][:, 1:3].contiguous()),
    )  # fmt: skip
    tok, wt = torch.tensor([1, 0], dtype=torch.int32), torch.tensor([0.5, 2.0])
    got, want = torch.zeros(2, d), torch.zeros(2, d)
    fp8.ffn_tasks(x, [fp8.FfnTask(part, tok, wt)], "gelu", got)
    fp8.ffn_tasks(x, [fp8.FfnTask(whole, tok, wt)], "gelu", want)
    assert torch.equal(got, want)
    data = torch.stack([gate[0][:160], up[0][:160], down[0][:, :160].t().contiguous()])  # a tile: [3, n, D]
    scale = torch.stack([gate[1][:2], up[1][:2], down[1][:, :2].t().contiguous()])
    tile = fp8.FfnTask(fp8.FfnWeights((data[0], scale[0]), (data[1], scale[1]), (data[2], scale[2]), True), tok, wt)
    assert ffn_error(x, [tile], "relu") < TOL
    packed = fp8.FfnWeights.from_tile(data, scale)
    assert packed.words == tile.weights.words and (packed.n, packed.hidden, packed.down_t) == (160, d, True)
    with pytest.raises(ValueError, match="scale \\[3, ceil"):
        fp8.FfnWeights.from_tile(data, scale[:, :1])
    with pytest.raises(ValueError, match="rows of data and scale must be contiguous"):
        fp8.FfnWeights.from_tile(data.transpose(1, 2).contiguous().transpose(1, 2), scale)
    view = down[1][:, :2].t()  # a transposed scale view (stride(1) != 1): packed as a kept contiguous copy
    tile = tile._replace(weights=fp8.FfnWeights((data[0], scale[0]), (data[1], scale[1]), (data[2], view), True))
    assert ffn_error(x, [tile], "relu") < TOL


def test_ffn_tasks_invalid_inputs() -> None:
    d = 192
    x, out = torch.randn(3, d), torch.zeros(3, d)
    task = ffn_task(160, d, [0, 2], False, seed=9)
    w = task.weights
    with pytest.raises(ValueError, match="act must be"):
        fp8.ffn_tasks(x, [task], "tanh", out)
    with pytest.raises(ValueError, match=r"token rows must be in \[0, 3\)"):
        fp8.ffn_tasks(x, [task._replace(tok=torch.tensor([0, 3], dtype=torch.int32))], "silu", out)
    with pytest.raises(ValueError, match="tok must be a torch.int32"):
        fp8.ffn_tasks(x, [task._replace(tok=task.tok.long())], "silu", out)
    with pytest.raises(ValueError, match="weight has 3 values for 2 tokens"):
        fp8.ffn_tasks(x, [task._replace(weight=torch.ones(3))], "silu", out)
    with pytest.raises(ValueError, match="hidden size 192, but x has 100"):
        fp8.ffn_tasks(torch.randn(3, 100), [task], "silu", torch.zeros(3, 100))
    with pytest.raises(ValueError, match="expected an fp8.FfnTask"):
        fp8.ffn_tasks(x, [(w.gate, task.tok, task.weight)], "silu", out)
    with pytest.raises(ValueError, match="out has shape"):
        fp8.ffn_tasks(x, [task], "silu", torch.zeros(2, d))
    with pytest.raises(ValueError, match="x must be a 2-D float32"):
        fp8.ffn_tasks(x.bfloat16(), [task], "silu", out)
    assert torch.equal(out, torch.zeros(3, d))  # nothing written by a refused call
    with pytest.raises(ValueError, match=r"down: shape \(160, 192\), but the task needs \[192, 160\]"):
        fp8.FfnWeights(w.gate, w.up, w.gate)
    with pytest.raises(ValueError, match="scale has shape"):
        fp8.FfnWeights(w.gate, (w.up[0], w.up[1][:1]), w.down)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8.FfnWeights(w.gate, (w.up[0].view(torch.uint8), w.up[1]), w.down)
