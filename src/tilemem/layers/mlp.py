"""Gated FFN (SwiGLU-style): y = down(act(gate(x)) * up(x)). Experts, shared experts and dense
layers all use it; a tile is this FFN restricted to a neuron range of its intermediate dimension.

On the CPU, an FFN whose weights a portable fused kernel takes (GGUF blocks, FP8, or bf16 where the AVX512 library
does not run) is computed in one native call (`FusedFFN`): fp32 products and sums from the weights as stored,
rounded to the activations' dtype once (the torch path rounds each projection's output); FP8's hidden activations
act(gate x) * (up x) are rounded to bf16 too in a bf16 model (`bf16_h`), as `kernels.moe` rounds them."""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tilemem import kernels
from tilemem.errors import KernelError
from tilemem.kernels import bf16_ffn as bf16_ffn_kernels
from tilemem.kernels import fp8 as fp8_kernels
from tilemem.kernels import ggml as ggml_kernels
from tilemem.layers import ggml
from tilemem.layers.fp8 import FP8
from tilemem.layers.linear import Linear

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    """The activation function called `name` in a Hugging Face config."""
    return ACTIVATIONS[name]


class FusedFFN(NamedTuple):
    """A gated FFN's weights packed for a portable fused FFN kernel: `kernel` is `kernels.ggml`, `kernels.fp8` or
    `kernels.bf16_ffn`, `weights` its FfnWeights (pointers into the FFN's own tensors: no copy)."""

    kernel: ModuleType
    weights: object

    @property
    def max_tokens(self) -> int:
        """The most tokens a task of this kernel takes in the native call (more run as matmuls)."""
        return self.kernel.FFN_MAX_TOKENS

    def extra(self, x: torch.Tensor) -> tuple:
        """The kernel's arguments after `out` for activations x: GGUF's exact-or-fast choice (`layers.ggml.FAST`);
        FP8's `bf16_h` (the hidden activations rounded to bf16 in a bf16 model, as `kernels.moe` rounds them)."""
        if self.kernel is ggml_kernels:
            return (not ggml.FAST,)
        return (x.dtype == torch.bfloat16,) if self.kernel is fp8_kernels else ()

    def __call__(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """The FFN of every row of x [T, D] -> [T, D] fp32."""
        xf = x.float().contiguous()
        out = torch.zeros_like(xf)  # [T, D]
        t = xf.shape[0]
        task = self.kernel.FfnTask(self.weights, torch.arange(t, dtype=torch.int32), torch.ones(t))
        self.kernel.ffn_tasks(xf, [task], act, out, *self.extra(x))
        return out


def fused_ffn(mlp: GatedMLP) -> FusedFFN | None:
    """`mlp`'s weights packed for the portable fused kernel that takes them (built once per weight tensor), or None
    where none does: its activation unknown to the kernels, weights not all GGUF blocks, FP8 or bf16 CPU matrices
    with contiguous rows, or the kernels unavailable here."""
    g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    key = (g.weight.data_ptr(), u.weight.data_ptr(), d.weight.data_ptr())
    if mlp._fused is not None and mlp._fused[0] == key:
        return mlp._fused[1]
    fused = None
    try:
        if g.qtype is not None and ggml._native() is not None:
            fused = FusedFFN(ggml_kernels, ggml_kernels.FfnWeights(*((m.qtype, m.weight) for m in (g, u, d))))
        elif g.weight.dtype == FP8 and g.weight.is_cpu and fp8_kernels.available():
            scaled = ((m.weight, m.weight_scale_inv) for m in (g, u, d))
            fused = FusedFFN(fp8_kernels, fp8_kernels.FfnWeights(*scaled))
        elif g.weight.dtype == torch.bfloat16 and g.weight.is_cpu and bf16_ffn_kernels.available():
            fused = FusedFFN(bf16_ffn_kernels, bf16_ffn_kernels.FfnWeights(g.weight, u.weight, d.weight))
    except (KernelError, ValueError, AttributeError):  # weights the kernel refuses: the torch path
        fused = None
    if fused is not None and mlp.act_name not in fused.kernel.ACTS:
        fused = None
    mlp._fused = (key, fused)
    return fused


def fused_applies(fused: FusedFFN | None, x: torch.Tensor) -> bool:
    """Whether `fused` computes for activations x: CPU rows, no autograd, and for bf16 weights only where the
    AVX512 library (whose own kernels come first) does not run."""
    return (
        fused is not None and x.device.type == "cpu" and not x.requires_grad
        and (fused.kernel is not bf16_ffn_kernels or not kernels.usable(x))
    )  # fmt: skip


class GatedMLP(nn.Module):
    """One expert (or shared / dense FFN) with hub names gate_proj, up_proj, down_proj."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate)
        self.up_proj = Linear(hidden, intermediate)
        self.down_proj = Linear(intermediate, hidden)
        self.act = activation(act)
        self.act_name = act
        self.tiled = None
        """When the tiered runtime places this FFN (shared experts, dense layers): x [T, D] -> [T, D] fp32."""
        self._fused: tuple[tuple[int, int, int], FusedFFN | None] | None = None  # (weights' pointers, `fused_ffn`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled is not None:
            return self.tiled(x.reshape(-1, x.shape[-1])).to(x.dtype).view(x.shape)
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and fused_applies(fused := fused_ffn(self), x) and rows <= fused.max_tokens:
            return fused(x.reshape(rows, x.shape[-1]), self.act_name).to(x.dtype).view(x.shape)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
