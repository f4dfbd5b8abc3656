"""Linear layer that sends small bf16 batches (decode) to the native GEMV kernel.

Decode multiplies a few token rows by each weight matrix once, so it is bound by how fast the
weights stream from memory; torch's bf16 path reaches about half the bandwidth there. Larger
batches (prefill) are compute-bound GEMMs and stay on torch (oneDNN). Same parameters and state
dict as `nn.Linear`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilemem import kernels


class Linear(nn.Linear):
    """`nn.Linear` on `meta` (the loader assigns the weights) with the decode fast path."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through the native kernel for a few bf16 rows."""
    rows = x.numel() // x.shape[-1]
    if rows <= kernels.MAX_ROWS and weight.dtype == torch.bfloat16 and weight.stride(1) == 1 and kernels.usable(x):
        y = kernels.linear(x.reshape(rows, x.shape[-1]), weight)
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
