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
from tilemem.pages import drop_file_pages, file_backed


class Linear(nn.Linear):
    """`nn.Linear` on `meta` (the loader assigns the weights) with the decode fast path, and optionally
    its weight in x12 (`compress`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.x12: kernels.X12Matrix | None = None

    def compress(self) -> bool:
        """Keep the weight as a `kernels.X12Matrix` (12 bits per weight, the same bits) and let go of its
        pages in the mapped checkpoint, where it is a bf16 CPU matrix of such a file that x12 can store.
        Every forward then reads the X12Matrix: a few rows through the native kernel, more (prefill)
        through torch on the matrix decoded into a reused buffer. Returns whether it did."""
        w = self.weight
        if self.x12 is not None or not (kernels.available() and kernels.x12_supported(w) and file_backed([w])):
            return self.x12 is not None
        self.x12 = kernels.X12Matrix(w)
        drop_file_pages([w])
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.x12)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, x12: kernels.X12Matrix | None = None
) -> torch.Tensor:
    """`F.linear`, through the native kernel for a few bf16 rows. With `x12` (the weight stored as x12),
    bf16 CPU rows read that: up to 4 * MAX_ROWS through the kernel, MAX_ROWS at a time, more through
    torch on the matrix decoded once."""
    rows = x.numel() // x.shape[-1]
    step = kernels.MAX_ROWS
    if x12 is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        if rows > 4 * step:  # a GEMM
            return F.linear(x, kernels.decoded(x12), bias)
    elif not (rows <= step and weight.dtype == torch.bfloat16 and weight.stride(1) == 1 and kernels.usable(x)):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    parts = [kernels.linear(flat[i : i + step], weight, x12) for i in range(0, rows, step)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])
