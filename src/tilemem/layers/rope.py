"""Rotary position embeddings: default, linear and YaRN (DeepSeek) variants.

The cos/sin table is computed once in fp32 for every position up to the context length and
indexed by absolute position, so prefill, decode and padded batches share one code path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tilemem.config import RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale(rope: RopeConfig, scale: float) -> float:
    """DeepSeek multiplies the attention softmax scale by mscale(factor, mscale_all_dim)^2.

    Like transformers' `yarn_apply_mscale`, any scaled rope (not only YaRN) with mscale_all_dim does."""
    if rope.kind != "default" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        return scale * m * m
    return scale


def inv_freq_and_scale(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin magnitude scale for `rope`."""
    base = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.kind == "default":
        return base, 1.0
    if rope.kind == "linear":
        return base / rope.factor, 1.0
    # YaRN: interpolate low frequencies, keep high ones, ramp in between.
    factor = rope.factor
    extrapolated = base
    interpolated = base / factor

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    if rope.mscale and rope.mscale_all_dim:
        scale = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        scale = _yarn_mscale(factor)
    return inv, scale


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to [..., T, dim] tensors at given absolute positions."""

    def __init__(self, rope: RopeConfig, dim: int, max_positions: int) -> None:
        super().__init__()
        self.interleave = rope.interleave
        self.fp32_rotate = rope.fp32_rotate
        inv_freq, scale = inv_freq_and_scale(rope, dim)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [P, dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, dim]
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, 1, T, dim] for positions [B, T] (fp32 when rotating in fp32)."""
        if self.fp32_rotate:
            dtype = torch.float32
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, H, T, dim]."""
        dtype = x.dtype
        if self.fp32_rotate:
            x = x.float()
        if self.interleave:
            # Pairs (0,1), (2,3), ... are de-interleaved to halves first (DeepSeek-V2, V3 weights). The
            # output stays in halves layout: q and k are permuted alike, so q.k is unchanged.
            b, h, t, d = x.shape
            x = x.view(b, h, t, d // 2, 2).transpose(4, 3).reshape(b, h, t, d)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).to(dtype)
