"""Small-batch dense linear and RMSNorm (`csrc/linear_norm.c`)."""

from __future__ import annotations

import ctypes

import torch

from tilemem.kernels.library import check, lib
from tilemem.kernels.workspace import threads
from tilemem.kernels.x12 import X12Matrix

MAX_ROWS = 16
"""Largest token count the dense linear kernel takes; bigger batches are compute-bound GEMMs (oneDNN)."""


def linear(x: torch.Tensor, weight: torch.Tensor, x12: X12Matrix | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T -> [M, N] bf16 (fp32 accumulation); M <= MAX_ROWS, bf16 inputs. With
    `x12` (the same weights), the kernel reads that instead of `weight`."""
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    if weight.stride(1) != 1 and x12 is None:
        weight = weight.contiguous()
    y = torch.empty(m, n, dtype=torch.bfloat16)
    c = None if x12 is None else ctypes.byref(x12.struct)
    status = lib().tm_linear_bf16(
        x.data_ptr(), m, k, k, weight.data_ptr(), n, weight.stride(0), c, y.data_ptr(), n, 0, threads()
    )
    check(status, f"linear [{m}, {k}] x [{n}, {k}]")
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of bf16 `x` with a bf16 weight (rows over threads when many)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    d = x.shape[-1]
    lib().tm_rmsnorm_bf16(x.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, y.data_ptr(), threads())
    return y
