"""bf16 weights times a few fp32 token rows on AVX2 (`csrc_portable/bf16.c`): what decode's linears and the tiered
runtime's bf16 tiles need on CPUs without AVX512, where torch's bf16 GEMV converts element by element.

y = matmul_nt(x, w)   # x fp32 [M, C], w bf16 [R, C] (rows contiguous) -> fp32 [M, R] = x @ w^T
y = matmul_nn(x, w)   # x fp32 [M, R], w bf16 [R, C] (rows contiguous) -> fp32 [M, C] = x @ w
"""

from __future__ import annotations

import ctypes
import functools

import torch

from tilemem.errors import KernelError
from tilemem.kernels import portable

MAX_ROWS = 8
"""Most token rows the callers (`layers.linear.gemm`) send here; more (prefill) are GEMM-shaped: torch's fp32 GEMM on
upcast weights is faster there."""

_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@functools.cache
def lib() -> ctypes.CDLL | None:
    """The loaded portable library with the bf16 functions typed, or None where it cannot run here."""
    out = portable.load()
    if out is None:
        return None
    args = [_vp, _i64, _i64, _i64, _vp, _i64, _i64, _vp, _i64, _int]
    out.tmp_bf16_matmul_nt.argtypes = out.tmp_bf16_matmul_nn.argtypes = args
    return out


def available() -> bool:
    """Whether the kernels run here."""
    return lib() is not None


def _check(x: torch.Tensor, w: torch.Tensor, k: int, what: str) -> None:
    if w.dtype != torch.bfloat16 or w.dim() != 2 or not w.is_cpu or (w.shape[1] > 1 and w.stride(1) != 1):
        raise KernelError(f"bf16 {what}: w must be a 2-D bfloat16 CPU matrix with contiguous rows, got {w.dtype} "
                          f"{tuple(w.shape)} strides {w.stride()}")  # fmt: skip
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_cpu or (x.shape[1] > 1 and x.stride(1) != 1):
        raise KernelError(f"bf16 {what}: x must be a 2-D float32 CPU matrix with contiguous rows, got {x.dtype} "
                          f"{tuple(x.shape)}")  # fmt: skip
    if x.shape[1] != k:
        raise KernelError(f"bf16 {what}: x has {x.shape[1]} columns, w needs {k}")


def _call(name: str, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rc = getattr(lib(), name)(
        w.data_ptr(), max(w.stride(0), w.shape[1]), w.shape[0], w.shape[1], x.data_ptr(), max(x.stride(0), x.shape[1]),
        x.shape[0], y.data_ptr(), y.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise KernelError(f"bf16 {name} failed (status {rc})")
    return y


def matmul_nt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T: x fp32 [M, C], w bf16 [R, C] with contiguous rows -> fp32 [M, R]."""
    _check(x, w, w.shape[1], "matmul_nt")
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    return _call("tmp_bf16_matmul_nt", x, w, y) if y.numel() else y.zero_()


def matmul_nn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w: x fp32 [M, R], w bf16 [R, C] with contiguous rows -> fp32 [M, C]."""
    _check(x, w, w.shape[0], "matmul_nn")
    y = torch.empty(x.shape[0], w.shape[1], dtype=torch.float32)
    return _call("tmp_bf16_matmul_nn", x, w, y) if y.numel() else y.zero_()
