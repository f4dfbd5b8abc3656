"""ggml quant kernels (`kernels/ggml.py`) against gguf's numpy reference (`gguf.quants`) and float64 matmuls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilemem import sysinfo
from tilemem.errors import KernelError
from tilemem.kernels import ggml

gguf_quants = pytest.importorskip("gguf.quants", reason="the gguf package (the reference layouts) is not installed")
from gguf import GGMLQuantizationType  # noqa: E402

pytestmark = pytest.mark.skipif(
    not ggml.available(),
    reason="ggml kernels off: they need AVX2 + FMA + F16C and a C compiler, and TILEMEM_KERNELS != 0",
)

TOL = 1e-5  # exact path: max abs error / max abs reference (fp32 accumulation against float64)
TOKENS = [1, 3, 8, 33, 300]  # 3, 8: passes of 8; 33, 300: the prefill way (dequantized panels; 300: 2 passes)
ROWS = 37  # odd: a thread's range ends mid-way


def random_data(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid [rows, row_bytes] blocks: gguf's quantizer where it has one (the 32-weight types), else
    random quant and scale bytes with finite fp16 d / dmin (the K-quants)."""
    rng = np.random.default_rng(seed)
    qt = GGMLQuantizationType[qtype.upper()]
    if not qtype.endswith("_k"):
        return gguf_quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
    nb, bb = cols // 256, ggml.BLOCK_BYTES[qtype]
    raw = rng.integers(0, 256, (rows, nb, bb), dtype=np.uint8)  # [R, blocks, bytes]
    for p in [208] if qtype == "q6_k" else [0, 2]:  # d (Q6_K); d and dmin (Q4_K, Q5_K)
        raw[:, :, p : p + 2] = (rng.standard_normal((rows, nb, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, nb * bb)


def reference(qtype: str, data: np.ndarray) -> np.ndarray:
    return gguf_quants.dequantize(data, GGMLQuantizationType[qtype.upper()])


def error(got: torch.Tensor | np.ndarray, want: np.ndarray) -> float:
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


def cols_of(qtype: str) -> int:
    return 512 if qtype.endswith("_k") else 288  # 2 super-blocks; 9 blocks (the fast path's 8 at once, 1 alone)


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_dequantize_bit_for_bit(qtype: str) -> None:
    cols = cols_of(qtype)
    data = random_data(qtype, ROWS, cols)
    want = reference(qtype, data)
    got = ggml.dequantize(qtype, torch.from_numpy(data), cols).numpy()
    assert got.shape == (ROWS, cols)
    assert np.array_equal(got.view(np.int32), want.view(np.int32))  # bit for bit, -0 included
    part = ggml.dequantize(qtype, torch.from_numpy(data), cols, slice(5, 20)).numpy()
    assert np.array_equal(part.view(np.int32), want[5:20].view(np.int32))


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_matmul_nt(qtype: str) -> None:
    cols = cols_of(qtype)
    data = random_data(qtype, ROWS, cols, seed=1)
    w = reference(qtype, data).astype(np.float64)  # [R, C]
    g = np.random.default_rng(2)
    for n in TOKENS:
        x = g.standard_normal((n, cols)).astype(np.float32)  # [N, C]
        want = x.astype(np.float64) @ w.T  # [N, R]
        exact = ggml.matmul_nt(torch.from_numpy(x), qtype, torch.from_numpy(data), cols)
        assert exact.shape == (n, ROWS) and error(exact, want) < TOL, f"exact N={n}"
        fast = ggml.matmul_nt(torch.from_numpy(x), qtype, torch.from_numpy(data), cols, exact=False)
        assert error(fast, want) < ggml.FAST_TOL, f"fast N={n}"
        if n <= ggml.NT_MAX_TOKENS:  # int8 activations: not the exact result, but near it
            assert error(fast, want) > 1e-5, f"fast N={n} is the exact path"


def test_threads_and_row_slices() -> None:
    """Rows of a bigger matrix (a row slice), on 1 and 2 threads: the same results."""
    qtype, cols = "q4_k", 768
    big = torch.from_numpy(random_data(qtype, 90, cols, seed=3))
    data = big[17:80]
    w = reference(qtype, big.numpy())[17:80].astype(np.float64)
    x = np.random.default_rng(4).standard_normal((5, cols)).astype(np.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = ggml.matmul_nt(torch.from_numpy(x), qtype, data, cols)
            assert error(y, x.astype(np.float64) @ w.T) < TOL
            results.append(y)
        assert torch.equal(results[0], results[1])  # each output row is one thread's, in one order
    finally:
        torch.set_num_threads(before)


# byte offsets of a scale in a block: d's high byte (every type), a K-quant's 6-bit (Q4_K, Q5_K) or int8 (Q6_K)
SCALE_BYTES = {"q8_0": [1], "q4_0": [1], "q4_1": [1, 3], "q5_0": [1], "q5_1": [1, 3]}
SCALE_BYTES |= {"q4_k": [1, 3, 4, 12, 15], "q5_k": [1, 3, 6, 13], "q6_k": [209, 192, 197, 200, 207]}


@pytest.mark.parametrize("qtype", ggml.QTYPES)
def test_flipped_scale_byte_is_caught(qtype: str) -> None:
    """The comparisons can fail: one flipped scale bit changes row 0's result and no other row's."""
    cols = cols_of(qtype)
    data = random_data(qtype, ROWS, cols, seed=5)
    x = torch.randn(2, cols)
    y = ggml.matmul_nt(x, qtype, torch.from_numpy(data), cols)
    for offset in SCALE_BYTES[qtype]:
        bad = data.copy()
        bad[0, offset] ^= 0x04 if offset in (1, 3, 209) else 0x01  # fp16: exponent's low bit (x2 or /2)
        assert not np.array_equal(ggml.dequantize(qtype, torch.from_numpy(bad), cols).numpy(), reference(qtype, data))
        for exact in (True, False):
            got = ggml.matmul_nt(x, qtype, torch.from_numpy(bad), cols, exact)
            want = y if exact else ggml.matmul_nt(x, qtype, torch.from_numpy(data), cols, False)
            assert not torch.equal(got[:, 0], want[:, 0]), f"byte {offset} exact={exact}"
            assert torch.equal(got[:, 1:], want[:, 1:])


@pytest.mark.parametrize("qtype", ["q4_k", "q6_k", "q8_0"])
def test_prefill_panels(qtype: str) -> None:
    """The exact prefill way (`tmg_matmul_dq`, past NT_MAX_TOKENS): token counts that end a 16-token block full,
    half (one vector) and mid-way, 13 rows (panels of 6, 6, 1) of a bigger matrix, x a column slice of a wider
    tensor: near float64, the same bits on 1 and 2 threads, and a flipped scale in the last row changes that
    output column only."""
    cols, first = cols_of(qtype), ggml.NT_MAX_TOKENS + 1
    big = torch.from_numpy(random_data(qtype, 20, cols, seed=8))
    data = big[3:16]  # [13, row_bytes], row stride of the bigger matrix
    w = reference(qtype, big.numpy())[3:16].astype(np.float64)  # [13, C]
    before = torch.get_num_threads()
    try:
        for n in (first, 24, 29, 40):
            wide = torch.randn(n, cols + 32)
            x = wide[:, 5 : 5 + cols]  # [n, C], row stride C + 32
            runs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs.append(ggml.matmul_nt(x, qtype, data, cols))
            assert runs[0].shape == (n, 13) and error(runs[0], x.double().numpy() @ w.T) < TOL, f"N={n}"
            assert torch.equal(runs[0], runs[1]), f"N={n}: 1 and 2 threads differ"
        bad = big.clone()
        bad[15, SCALE_BYTES[qtype][0]] ^= 0x04  # row 12 of data: d's exponent (x2 or /2)
        got = ggml.matmul_nt(x, qtype, bad[3:16], cols)
        assert not torch.equal(got[:, 12], runs[1][:, 12]) and torch.equal(got[:, :12], runs[1][:, :12])
    finally:
        torch.set_num_threads(before)


def quantized_x(x: np.ndarray, block: int) -> np.ndarray:
    """The fast path's int8 activations as float64 (q * d per block of `block` values), the kernels' way: d =
    max|x| / 127, q = round-half-even(x * (127 / max|x|)) in fp32, clamped to +-127."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, block)  # [N, blocks, block]
    amax = np.abs(xb).max(axis=2, keepdims=True)  # [N, blocks, 1]
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint((xb * inv).astype(np.float32)), -127, 127)
    return (q.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k", "q8_0"])
def test_fast_rows_and_tokens_bit_for_bit(qtype: str) -> None:
    """The fast path, 1..9 rows and 1..5 tokens: each output row is the same bits as the row alone (no tiling
    or prefetch past the last row changes a result), and near float64 on the same int8 activations."""
    cols = cols_of(qtype)
    data = random_data(qtype, 9, cols, seed=6)
    w = reference(qtype, data).astype(np.float64)  # [9, C]
    g = np.random.default_rng(7)
    for n in range(1, 6):
        x = g.standard_normal((n, cols)).astype(np.float32)  # [N, C]
        alone = [ggml.matmul_nt(torch.from_numpy(x), qtype, torch.from_numpy(data[r : r + 1]), cols, False)
                 for r in range(9)]  # fmt: skip
        for rows in range(1, 10):
            y = ggml.matmul_nt(torch.from_numpy(x), qtype, torch.from_numpy(data[:rows]), cols, exact=False)
            for r in range(rows):
                assert torch.equal(y[:, r], alone[r][:, 0]), f"N={n} rows={rows} row {r}"
        want = quantized_x(x, ggml.BLOCK_WEIGHTS[qtype]) @ w.T  # [N, 9]
        assert error(torch.cat(alone, dim=1), want) < 1e-5, f"N={n}"


AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


@pytest.mark.skipif(not AVX512_FLAGS <= sysinfo.cpu_flags(), reason="the AVX512-VNNI row kernels need those flags")
@pytest.mark.parametrize("qtype", ["q4_k", "q5_k", "q6_k", "q8_0"])
def test_fast_avx512_matches_avx2_bit_for_bit(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX512-VNNI fast row kernels (this CPU's default) give the AVX2 kernels' bits (TILEMEM_GGML_AVX2=1):
    37 rows (odd) of a bigger matrix, 1, 3 and 8 tokens, random blocks and every quant byte at its largest and
    smallest (Q8_0's -128 included: the int16 / int32 sums at their bounds), scales at their largest."""
    cols, bb = 1024 + cols_of(qtype), ggml.BLOCK_BYTES[qtype]  # Q8_0: 41 blocks (5 passes of 8 and 1 alone)
    weights = [random_data(qtype, 41, cols, seed=12)]
    for fill in (0xFF, 0x00, 0x80):
        raw = np.full((41, cols // ggml.BLOCK_WEIGHTS[qtype], bb), fill, dtype=np.uint8)  # [R, blocks, bytes]
        if qtype.endswith("_k"):
            raw[:, :, slice(192, 208) if qtype == "q6_k" else slice(4, 16)] = 127 if qtype == "q6_k" else 0xFF
        for p in {"q6_k": [208], "q8_0": [0]}.get(qtype, [0, 2]):  # d; d and dmin
            raw[:, :, p : p + 2] = np.array([0.01], dtype=np.float16).view(np.uint8)
        weights.append(raw.reshape(41, -1))
    g = np.random.default_rng(13)
    for data in weights:
        w = torch.from_numpy(data)[3:40]  # 37 rows, the bigger matrix's row stride
        for n in (1, 3, 8):
            x = torch.from_numpy(g.standard_normal((n, cols)).astype(np.float32))  # [N, C]
            x[0, :64] = 127.0 * torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)  # int8 +-127 in a block
            monkeypatch.delenv("TILEMEM_GGML_AVX2", raising=False)
            fast = ggml.matmul_nt(x, qtype, w, cols, exact=False)
            monkeypatch.setenv("TILEMEM_GGML_AVX2", "1")
            avx2 = ggml.matmul_nt(x, qtype, w, cols, exact=False)
            monkeypatch.delenv("TILEMEM_GGML_AVX2")
            assert fast.shape == (n, 37) and torch.isfinite(fast).all()
            assert np.array_equal(fast.numpy().view(np.int32), avx2.numpy().view(np.int32)), f"N={n}"
            want = quantized_x(x.numpy(), ggml.BLOCK_WEIGHTS[qtype]) @ reference(qtype, w.numpy()).astype(np.float64).T
            assert not want.any() or error(fast, want) < 1e-5, f"N={n}"


# a sub-block's scale (a Q4_K / Q5_K 6-bit scale's low bit, a Q6_K int8 scale's): +-1 of 0..63 / -128..127;
# Q8_0: its first block's d (fp16 high byte: x2 or /2)
SUB_SCALE_BYTE = {"q4_k": 4 + 3, "q5_k": 4 + 8, "q6_k": 192 + 11, "q8_0": 1}


@pytest.mark.parametrize("qtype", ggml.Q8_GEMM_TYPES)
def test_prefill_q8(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast prefill way (`tmg_matmul_q8`: 8 rows interleaved; K-quants: int16 sums per sub-block, Q8_0: int32
    per vector, VNNI or AVX2): 13 and 37 rows (a partial panel of 8) of a bigger matrix, x a column slice of a wider
    tensor, 16..300 tokens (register blocks of 4 or 8, full and partial): the fast path's arithmetic (int8
    activations, float64 here) to 1e-5, within FAST_TOL of the exact product, the same bits on 1 and 2 threads
    (Q8_0: and with TILEMEM_GGML_AVX2=1); one sub-block's scale off by one in the last row moves that output
    column off the reference and leaves the others."""
    cols, block = 768, ggml.BLOCK_WEIGHTS[qtype]
    monkeypatch.delenv("TILEMEM_GGML_AVX2", raising=False)
    big = torch.from_numpy(random_data(qtype, 45, cols, seed=11))
    before = torch.get_num_threads()
    try:
        for rows, n in ((13, 16), (37, 17), (13, 33), (37, 64), (37, 300)):
            data = big[3 : 3 + rows]  # row stride of the bigger matrix
            w = reference(qtype, data.numpy()).astype(np.float64)  # [rows, C]
            wide = torch.randn(n, cols + 32, generator=torch.Generator().manual_seed(n))
            x = wide[:, 5 : 5 + cols]  # [n, C], row stride C + 32
            runs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                runs.append(ggml.matmul_nt(x, qtype, data, cols, exact=False))
            same = quantized_x(x.numpy(), block) @ w.T  # [n, rows]
            assert runs[0].shape == (n, rows) and error(runs[0], same) < 1e-5, f"rows={rows} N={n}"
            assert error(runs[0], x.double().numpy() @ w.T) < ggml.FAST_TOL, f"rows={rows} N={n}"
            assert torch.equal(runs[0], runs[1]), f"rows={rows} N={n}: 1 and 2 threads differ"
            if qtype == "q8_0":
                monkeypatch.setenv("TILEMEM_GGML_AVX2", "1")
                avx2 = ggml.matmul_nt(x, qtype, data, cols, exact=False)
                monkeypatch.delenv("TILEMEM_GGML_AVX2")
                assert torch.equal(avx2, runs[1]), f"rows={rows} N={n}: VNNI and AVX2 differ"
            bad = data.clone()
            bad[rows - 1, SUB_SCALE_BYTE[qtype]] ^= 0x01
            got = ggml.matmul_nt(x, qtype, bad, cols, exact=False)
            assert torch.equal(got[:, :-1], runs[1][:, :-1]), f"rows={rows} N={n}"
            assert error(got[:, -1:], same[:, -1:]) > 1e-4, f"rows={rows} N={n}: the scale is not read"
            want = quantized_x(x.numpy(), block) @ reference(qtype, bad.numpy()).astype(np.float64).T
            assert error(got, want) < 1e-5, f"rows={rows} N={n}"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("avx2", [False, True])
@pytest.mark.parametrize("qtype", ggml.Q8_GEMM_TYPES)
def test_prefill_q8_extreme_quants(qtype: str, avx2: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int16 sums' bounds: every quant at its largest (Q4_K 15, Q5_K 31, Q6_K 31, Q8_0 127) or smallest (0;
    Q6_K -32, Q8_0 -128), scales and mins at their largest, times activations all at +-127 (Q8_0 with VNNI: x + 128
    at 255 and 1): the same results as float64 on the same int8 values (an int16 sum over more vectors than the
    bound allows would wrap), with TILEMEM_GGML_AVX2=1 too (Q8_0's AVX2 kernel)."""
    cols, rows, bb = 512, 9, ggml.BLOCK_BYTES[qtype]
    if avx2:
        monkeypatch.setenv("TILEMEM_GGML_AVX2", "1")
    else:
        monkeypatch.delenv("TILEMEM_GGML_AVX2", raising=False)
    for fill in (0x7F, 0x80) if qtype == "q8_0" else (0xFF, 0x00):
        raw = np.full((rows, cols // ggml.BLOCK_WEIGHTS[qtype], bb), fill, dtype=np.uint8)  # [R, blocks, bytes]
        if qtype.endswith("_k"):
            scales = slice(192, 208) if qtype == "q6_k" else slice(4, 16)
            raw[:, :, scales] = 127 if qtype == "q6_k" else 0xFF  # int8 127; 6-bit scales and mins 63
        for p in {"q6_k": [208], "q8_0": [0]}.get(qtype, [0, 2]):  # d; d and dmin (Q4_K, Q5_K)
            raw[:, :, p : p + 2] = np.array([0.01], dtype=np.float16).view(np.uint8)
        data = raw.reshape(rows, -1)
        w = reference(qtype, data).astype(np.float64)  # [R, C]
        x = np.ones((20, cols), dtype=np.float32) * np.where(np.arange(20) % 2, 1, -1)[:, None].astype(np.float32)
        got = ggml.matmul_nt(torch.from_numpy(x), qtype, torch.from_numpy(data), cols, exact=False)
        want = quantized_x(x, ggml.BLOCK_WEIGHTS[qtype]) @ w.T
        assert error(got, want) < 1e-5, f"quant bytes {fill:#x}"


def test_fast_q6_k_high_bits_are_read() -> None:
    """Each of a Q6_K qh byte's four 2-bit fields (groups k = 0..3 of a half) changes the fast result."""
    cols = 256
    data = random_data("q6_k", 1, cols, seed=8)
    x = torch.randn(2, cols)
    y = ggml.matmul_nt(x, "q6_k", torch.from_numpy(data), cols, False)
    for half in (0, 1):
        for k in range(4):
            bad = data.copy()
            bad[0, 128 + 32 * half + 5] ^= 1 << (2 * k + 1)  # weight 5 of group 4 * half + k: +-32 in its quant
            got = ggml.matmul_nt(x, "q6_k", torch.from_numpy(bad), cols, False)
            want = quantized_x(x.numpy(), 256) @ reference("q6_k", bad).astype(np.float64).T  # [2, 1]
            assert not torch.equal(got, y) and error(got, want) < 1e-5, f"half {half} k {k}"


def test_empty_and_invalid_inputs() -> None:
    qtype, cols = "q4_0", 64
    data = torch.from_numpy(random_data(qtype, 4, cols))
    assert ggml.matmul_nt(torch.zeros(0, cols), qtype, data, cols).shape == (0, 4)
    assert ggml.dequantize(qtype, data[:0], cols).shape == (0, cols)
    x = torch.randn(2, cols)
    with pytest.raises(KernelError, match="unknown ggml quant type 'q2_k'"):
        ggml.matmul_nt(x, "q2_k", data, cols)
    with pytest.raises(KernelError, match="not a whole number of 32-weight blocks"):
        ggml.matmul_nt(torch.randn(2, 48), qtype, data, 48)
    with pytest.raises(KernelError, match="rows of 36 bytes, but 64 q4_1 weights take 40"):
        ggml.matmul_nt(x, "q4_1", data, cols)
    with pytest.raises(KernelError, match="data must be a 2-D torch.uint8"):
        ggml.matmul_nt(x, qtype, data.view(torch.int8), cols)
    with pytest.raises(KernelError, match="x must be a 2-D float32"):
        ggml.matmul_nt(x.double(), qtype, data, cols)
    with pytest.raises(KernelError, match=r"x has shape \(2, 32\), but W has 64 columns"):
        ggml.matmul_nt(torch.randn(2, 32), qtype, data, cols)
    with pytest.raises(KernelError, match="rows must be contiguous"):
        ggml.matmul_nt(x, qtype, torch.from_numpy(random_data(qtype, 4, 128))[:, ::2], cols)
    with pytest.raises(KernelError, match="step 1"):
        ggml.dequantize(qtype, data, cols, slice(0, 4, 2))


# ---- fused expert FFNs ----

TORCH_ACTS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu}


def quant_weight(qtype: str, rows: int, cols: int, seed: int) -> ggml.QuantWeight:
    return qtype, torch.from_numpy(random_data(qtype, rows, cols, seed))


def ffn_task(types: tuple[str, str], n: int, d: int, tok: list[int], seed: int) -> ggml.FfnTask:
    """A task of random blocks: gate, up [n, D] of types[0]; down [D, n] of types[1]."""
    gate, up = quant_weight(types[0], n, d, seed), quant_weight(types[0], n, d, seed + 1)
    weights = ggml.FfnWeights(gate, up, quant_weight(types[1], d, n, seed + 2))
    weight = torch.rand(len(tok), generator=torch.Generator().manual_seed(seed)) + 0.5
    return ggml.FfnTask(weights, torch.tensor(tok, dtype=torch.int32), weight)


def ffn_reference(x: torch.Tensor, tasks: list[ggml.FfnTask], act: str) -> np.ndarray:
    """Every task's FFN of its tokens, summed: gguf's dequantized weights, float64 math."""
    out = torch.zeros(x.shape, dtype=torch.float64)  # [T, D]
    for task in tasks:
        w = task.weights
        gate, up, down = (torch.from_numpy(reference(q, data.numpy())).double() for q, data in (w.gate, w.up, w.down))
        xt = x[task.tok.long()].double()  # [N, D]
        h = TORCH_ACTS[act](xt @ gate.T) * (xt @ up.T)  # [N, n]
        out.index_add_(0, task.tok.long(), (h @ down.T) * task.weight[:, None].double())
    return out.numpy()


def ffn_error(x: torch.Tensor, tasks: list[ggml.FfnTask], act: str, exact: bool = True) -> float:
    got = torch.full_like(x, 0.25)  # accumulated into
    ggml.ffn_tasks(x, tasks, act, got, exact)
    return error(got - 0.25, ffn_reference(x, tasks, act))


FFN_TYPES = [("q4_k", "q6_k"), ("q8_0", "q4_0"), ("q5_1", "q5_k"), ("q6_k", "q8_0"), ("q4_1", "q5_0")]
# the fast way chains two quantized products: twice the matmul's bound


@pytest.mark.parametrize("act", sorted(ggml.ACTS))
@pytest.mark.parametrize("threads", [1, 2])
def test_ffn_tasks(act: str, threads: int) -> None:
    """Tasks of mixed types (gate/up and down of different block sizes), 1..5 tokens sharing rows of x."""
    d = 512
    x = torch.randn(7, d, generator=torch.Generator().manual_seed(5))  # [T, D]
    toks = [[3], [0, 3, 6], [1, 2, 4, 5, 6], [2], [6, 0]]
    widths = [256, 96, 512, 32, 64]  # n: a multiple of the down type's block
    cases = enumerate(zip(FFN_TYPES, widths, toks, strict=True))
    tasks = [ffn_task(types, n, d, tok, seed=10 * q) for q, (types, n, tok) in cases]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert ffn_error(x, tasks, act) < TOL
        assert ffn_error(x, tasks, act, exact=False) < 2 * ggml.FAST_TOL
        for q, task in enumerate(tasks):  # each alone
            assert ffn_error(x, [task], act) < TOL, f"task {q}"
    finally:
        torch.set_num_threads(before)


def test_ffn_tasks_many_tokens() -> None:
    """9 and 20 tokens: two and three passes of 8 in the kernel; 60: the matmuls (prefill) path."""
    d = 256
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(6))  # [T, D]
    for ntok in (9, 20, 60):
        tok = torch.randperm(64, generator=torch.Generator().manual_seed(ntok))[:ntok].tolist()
        tasks = [ffn_task(("q4_k", "q8_0"), 96, d, tok, seed=ntok), ffn_task(("q8_0", "q6_k"), 256, d, tok[:3], 1)]
        assert ffn_error(x, tasks, "silu") < TOL, f"{ntok} tokens"
        assert ffn_error(x, tasks, "silu", exact=False) < 2 * ggml.FAST_TOL, f"{ntok} tokens, fast"


def test_ffn_tasks_flipped_scale_is_caught() -> None:
    """The comparison can fail: a flipped scale bit in any of the three matrices changes the result."""
    d = 256
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(8))  # [T, D]
    task = ffn_task(("q4_k", "q6_k"), 256, d, [0, 2], seed=8)
    want = ffn_reference(x, [task], "silu")
    w = task.weights
    for name, offset in (("gate", 1), ("up", 4), ("down", 209)):
        qtype, data = getattr(w, name)
        bad = data.clone()
        bad[0, offset] ^= 0x04 if offset in (1, 209) else 0x20  # d's exponent; sub-block 0's scale +-32
        wrong = ggml.FfnWeights(**{"gate": w.gate, "up": w.up, "down": w.down, name: (qtype, bad)})
        got = torch.zeros_like(x)
        ggml.ffn_tasks(x, [task._replace(weights=wrong)], "silu", got)
        assert error(got, want) > 1e-4, name


def test_ffn_tasks_invalid_inputs() -> None:
    d = 256
    x, out = torch.randn(3, d), torch.zeros(3, d)
    task = ffn_task(("q4_0", "q8_0"), 64, d, [0, 2], seed=9)
    w = task.weights
    with pytest.raises(KernelError, match="act must be"):
        ggml.ffn_tasks(x, [task], "tanh", out)
    with pytest.raises(KernelError, match=r"token rows must be in \[0, 3\)"):
        ggml.ffn_tasks(x, [task._replace(tok=torch.tensor([0, 3], dtype=torch.int32))], "silu", out)
    with pytest.raises(KernelError, match="tok must be a torch.int32"):
        ggml.ffn_tasks(x, [task._replace(tok=task.tok.long())], "silu", out)
    with pytest.raises(KernelError, match="weight has 3 values for 2 tokens"):
        ggml.ffn_tasks(x, [task._replace(weight=torch.ones(3))], "silu", out)
    with pytest.raises(KernelError, match="hidden size 256, but x has 128"):
        ggml.ffn_tasks(torch.randn(3, 128), [task], "silu", torch.zeros(3, 128))
    with pytest.raises(KernelError, match="expected a ggml.FfnTask"):
        ggml.ffn_tasks(x, [(w.gate, task.tok, task.weight)], "silu", out)
    with pytest.raises(KernelError, match="out has shape"):
        ggml.ffn_tasks(x, [task], "silu", torch.zeros(2, d))
    with pytest.raises(KernelError, match="x must be a 2-D float32"):
        ggml.ffn_tasks(x.bfloat16(), [task], "silu", out)
    big = ffn_task(("q4_0", "q8_0"), 64, d, [0] * 59 + [3], seed=9)  # prefill-sized: checked in Python
    with pytest.raises(KernelError, match=r"task 1: token rows must be in \[0, 3\)"):
        ggml.ffn_tasks(x, [task, big], "silu", out)
    assert torch.equal(out, torch.zeros(3, d))  # nothing written by a refused call
    with pytest.raises(KernelError, match=r"down: \[64, 256\] weights, but the task needs \[256, 64\]"):
        ggml.FfnWeights(w.gate, w.up, w.gate)
    with pytest.raises(KernelError, match="not rows of whole q6_k blocks"):
        ggml.FfnWeights(w.gate, ("q6_k", w.up[1]), w.down)
    with pytest.raises(KernelError, match="unknown ggml quant type 'f16'"):
        ggml.FfnWeights(w.gate, ("f16", w.up[1]), w.down)
