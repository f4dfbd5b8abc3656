"""RMSNorm, computed in fp32 and cast back, as every supported family does."""

from __future__ import annotations

import torch
from torch import nn

from tilemem import kernels
from tilemem.kernels import rmsnorm
from tilemem.kernels.portable_decode import MAX_ROWS


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalizing over the last dimension."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))
        self.eps = eps
        self.portable = False
        """Few rows through the portable kernel on any CPU (`kernels.rmsnorm`), as `layers.linear.Linear.portable`:
        what the portable one-call decode layers compute, where the AVX512 library's kernel would run instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.portable and x.numel() <= MAX_ROWS * x.shape[-1] and rmsnorm.applies(x, self.weight):
            return rmsnorm.rms_norm(x, self.weight, self.eps)
        if self.weight.dtype == torch.bfloat16 and kernels.usable(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        if rmsnorm.applies(x, self.weight):  # AVX2: one native call instead of six small torch ops
            return rmsnorm.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)
