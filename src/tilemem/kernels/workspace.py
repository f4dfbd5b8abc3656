"""Reusable scratch buffers of the kernels' callers."""

from __future__ import annotations

import torch


class Workspace:
    """Reusable scratch buffers of one executor (per-thread partial sums, activations)."""

    def __init__(self) -> None:
        self.scratch = torch.empty(0, dtype=torch.float32)
        self.h = torch.empty(0, dtype=torch.bfloat16)

    def get(self, scratch: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of at least `scratch` fp32 and `h` bf16 elements."""
        if self.scratch.numel() < scratch:
            self.scratch = torch.empty(scratch, dtype=torch.float32)
        if self.h.numel() < h:
            self.h = torch.empty(h, dtype=torch.bfloat16)
        return self.scratch, self.h


def threads() -> int:
    """Threads a kernel call runs on: torch's intra-op thread count."""
    return torch.get_num_threads()
