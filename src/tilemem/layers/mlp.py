"""Gated FFN (SwiGLU-style): y = down(act(gate(x)) * up(x)). Experts, shared experts and dense
layers all use it; a tile is this FFN restricted to a neuron range of its intermediate dimension."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tilemem.layers.linear import Linear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    """The activation function called `name` in a Hugging Face config."""
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """One expert (or shared / dense FFN) with hub names gate_proj, up_proj, down_proj."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)
        self.act = activation(act)
        self.tiled = None
        """When the tiered runtime places this FFN (shared experts, dense layers): x [T, D] -> [T, D] fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled is not None:
            return self.tiled(x.reshape(-1, x.shape[-1])).to(x.dtype).view(x.shape)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
