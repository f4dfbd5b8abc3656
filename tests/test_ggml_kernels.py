"""ggml quant kernels (`kernels/ggml.py`) against gguf's numpy reference (`gguf.quants`) and float64 matmuls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilemem.errors import KernelError
from tilemem.kernels import ggml

gguf_quants = pytest.importorskip("gguf.quants", reason="the gguf package (the reference layouts) is not installed")
from gguf import GGMLQuantizationType  # noqa: E402

pytestmark = pytest.mark.skipif(
    not ggml.available(),
    reason="ggml kernels off: they need AVX2 + FMA + F16C and a C compiler, and TILEMEM_KERNELS != 0",
)

TOL = 1e-5  # exact path: max abs error / max abs reference (fp32 accumulation against float64)
TOKENS = [1, 3, 8, 33, 300]  # 33: 5 passes of 8 (+1); 300: the prefill way (dequantized rows + torch GEMM)
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
    return 512 if qtype.endswith("_k") else 160  # 2 super-blocks; 5 blocks


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
SCALE_BYTES |= {"q4_k": [1, 3, 4, 12], "q5_k": [1, 3, 6, 13], "q6_k": [209, 192, 200]}


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
