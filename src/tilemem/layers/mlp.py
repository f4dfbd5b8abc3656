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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
