"""`layers.linear.gemm`: F.linear for weights of any strides, with the paths it takes on CPUs whose torch
bf16/fp16 GEMM is slow (a GEMV for one row, fp32 on the upcast weight for many rows or a transposed weight).
Every path gives F.linear's fp32 result on the upcast inputs, rounded to the input dtype, whatever the chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tilemem.kernels import bf16 as bf16_kernels
from tilemem.layers import linear as lin
from tilemem.layers.linear import gemm


def reference(x, w, b=None):
    """Products of the (exactly upcast) half inputs, accumulated in fp32, rounded once."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


@pytest.mark.parametrize("slow", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_equals_f_linear_on_every_path(monkeypatch, slow, dtype, rows, transposed, bias):
    monkeypatch.setitem(lin.SLOW_HALF_GEMM, dtype, slow)
    monkeypatch.setattr(lin, "UPCAST_CHUNK_BYTES", 4 * 64 * 5)  # 5 weight rows a chunk: 37 rows, 8 chunks
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(37, 64, generator=g) * 0.1).to(dtype)
    if transposed:  # the tile store's down^T rows [n, D], used as a weight [D, n]
        w = w.t().contiguous().t()
        assert w.stride(-1) != 1
    x = torch.randn(2, rows, 64, generator=g).to(dtype)[:1]  # [1, rows, 64]
    b = torch.randn(37, generator=g).to(dtype) if bias else None
    y = gemm(x, w, b)
    assert y.shape == (1, rows, 37) and y.dtype == dtype
    want = reference(x, w, b)
    eps = torch.finfo(dtype).eps
    if slow and (rows >= lin.UPCAST_MIN_ROWS or transposed) and not rows == 1:
        # the upcast path, chunked: fp32 sums (in BLAS's order), one rounding: within one unit of the dtype
        torch.testing.assert_close(y.float(), want.float(), rtol=eps, atol=eps)
    else:  # torch's own kernels (GEMV, half GEMM): fp32 accumulation in another order, bias added after
        torch.testing.assert_close(y.float(), want.float(), rtol=4 * eps, atol=4 * eps)


def test_gemm_leaves_fp32_and_other_dtypes_to_f_linear(monkeypatch):
    monkeypatch.setitem(lin.SLOW_HALF_GEMM, torch.bfloat16, True)
    x, w = torch.randn(9, 16), torch.randn(5, 16)
    assert torch.equal(gemm(x, w), F.linear(x, w))
    # a half weight with an fp32 input is F.linear's business (and its error), not an upcast
    with pytest.raises(RuntimeError):
        gemm(x, w.bfloat16())


def test_slow_half_gemm_follows_the_cpu_flags():
    from tilemem import sysinfo

    flags = sysinfo.cpu_flags()
    assert lin.SLOW_HALF_GEMM[torch.bfloat16] == (not {"avx512_bf16", "amx_bf16"} & flags)
    assert lin.SLOW_HALF_GEMM[torch.float16] == (not {"avx512_fp16", "amx_fp16"} & flags)


@pytest.mark.skipif(not bf16_kernels.available(), reason="the portable bf16 kernel does not run here")
def test_portable_rows_compute_the_portable_kernels_bits_on_any_cpu():
    """A module marked `portable` (an FP8 or GGUF model's) multiplies a few bf16 rows by the portable kernel, on
    CPUs with a fast torch bf16 GEMM too (what the one-call decode layers compute there); more rows are left."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(37, 64, generator=g) * 0.1).bfloat16()
    b = torch.randn(37, generator=g).bfloat16()
    x = torch.randn(1, 3, 64, generator=g).bfloat16()
    want = (bf16_kernels.matmul_nt(x.reshape(3, 64).float(), w) + b.float()).bfloat16().view(1, 3, 37)
    assert torch.equal(lin.portable_rows(x, w, b), want)
    assert torch.equal(lin.linear(x, w, b, portable=True), want)
    torch.testing.assert_close(want.float(), reference(x, w, b).float(), rtol=0.02, atol=0.02)
    many = torch.randn(bf16_kernels.MAX_ROWS + 1, 64, generator=g).bfloat16()
    assert lin.portable_rows(many, w) is None and lin.portable_rows(x.float(), w.float()) is None


def test_quantized_models_mark_their_layers_portable(make_ckpt):
    """FP8 and GGUF models' norms, routers and bf16 products follow the portable one-call decode layers; a bf16
    model's stay on the AVX512 library's kernels where it runs."""
    from tilemem.layers.norm import RMSNorm
    from tilemem.layers.router import Router
    from tilemem.loader.checkpoint import load_model

    def marked(model):
        kinds = (lin.Linear, RMSNorm, Router)
        return {m.portable for layer in model.model.layers for m in layer.modules() if isinstance(m, kinds)}

    assert marked(load_model(make_ckpt("olmoe", "fp8"), "bf16")[0]) == {True}
    assert marked(load_model(make_ckpt("olmoe", "bf16"), "bf16")[0]) == {False}
