"""The portable bf16 kernels (`kernels.bf16`): x @ W^T and x @ W for a few fp32 rows against torch in fp32 on the
same (exactly widened) weights, every tail shape, both thread counts, bad input refused; and `layers.linear.gemm`
sending decode-sized bf16 products to them on CPUs without a fast bf16 GEMM."""

from __future__ import annotations

import pytest
import torch

from tilemem.errors import KernelError
from tilemem.kernels import bf16
from tilemem.layers import linear

pytestmark = pytest.mark.skipif(not bf16.available(), reason="the portable kernels need AVX2 + FMA + F16C and gcc")

SHAPES = [(1, 1), (3, 17), (16, 16), (37, 19), (64, 2048), (1027, 96)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("r", "c"), SHAPES)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 8])
def test_products_match_fp32_reference(r, c, m, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(r * 1000 + c + m)
    w = torch.randn(r, c, generator=g).bfloat16()
    x = torch.randn(m, c, generator=g)
    ref = x.double() @ w.double().t()
    assert torch.allclose(bf16.matmul_nt(x, w).double(), ref, rtol=1e-5, atol=1e-4 * c**0.5)
    xt = torch.randn(m, r, generator=g)
    ref = xt.double() @ w.double()
    assert torch.allclose(bf16.matmul_nn(xt, w).double(), ref, rtol=1e-5, atol=1e-4 * r**0.5)


def test_strided_rows_and_views():
    """A row stride past the columns (a slice of a wider matrix), and x rows of a wider buffer."""
    big = torch.randn(40, 50).bfloat16()
    w = big[3:30, 5:40]  # [27, 35], row stride 50
    xb = torch.randn(3, 60)
    x = xb[:, :35]
    assert torch.allclose(bf16.matmul_nt(x, w), x @ w.float().t(), atol=1e-4)
    x2 = torch.randn(2, 27)
    assert torch.allclose(bf16.matmul_nn(x2, w), x2 @ w.float(), atol=1e-4)


@pytest.mark.parametrize(
    ("x", "w", "message"),
    [
        (torch.randn(1, 8), torch.randn(4, 8), "bfloat16"),
        (torch.randn(1, 8).bfloat16(), torch.randn(4, 8).bfloat16(), "float32"),
        (torch.randn(1, 7), torch.randn(4, 8).bfloat16(), "columns"),
        (torch.randn(1, 8), torch.randn(8, 4).bfloat16().t(), "contiguous rows"),
    ],
)
def test_bad_input_is_refused(x, w, message):
    with pytest.raises(KernelError, match=message):
        bf16.matmul_nt(x, w)


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_gemm_routes_decode_rows_to_the_kernel(rows, monkeypatch):
    """On a CPU without AVX512-BF16, gemm's bf16 decode rows (both weight layouts) go to the kernel and equal
    F.linear in fp32 rounded once to bf16 (within one bf16 ulp of a different summation order)."""
    monkeypatch.setitem(linear.SLOW_HALF_GEMM, torch.bfloat16, True)
    calls = []
    for name in ("matmul_nt", "matmul_nn"):
        real = getattr(bf16, name)
        monkeypatch.setattr(bf16, name, lambda x, w, real=real, name=name: calls.append(name) or real(x, w))
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g).bfloat16()
    bias = torch.randn(48, generator=g).bfloat16()
    wt = torch.randn(64, 48, generator=g).bfloat16().t()  # [48, 64] with stride(0) == 1: a tile's down^T rows
    for weight, b in ((w, bias), (wt, None)):
        got = linear.gemm(x, weight, b)
        ref = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 48)
        assert torch.allclose(got.float(), ref, rtol=2**-7, atol=1e-2)
    assert calls == (["matmul_nt", "matmul_nn"] if rows <= bf16.MAX_ROWS else [])
