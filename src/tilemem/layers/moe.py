"""Sparse MoE block: route, run the chosen experts, add shared experts.

Shape legend: T tokens, E experts, K experts per token, D hidden, I expert intermediate.
Who computes the experts is pluggable (`ExpertExecutor`): the resident executor below runs every
expert from memory; the tiered runtime (`tilemem.runtime`) swaps in one that follows a plan.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from tilemem import kernels
from tilemem.config import ModelConfig
from tilemem.kernels import fp8 as fp8_kernels
from tilemem.kernels import ggml as ggml_kernels
from tilemem.kernels import x12_tiles as x12_kernels
from tilemem.kernels.portable import RoutedTable
from tilemem.layers import ggml
from tilemem.layers.fp8 import FP8, Fp8Matrix
from tilemem.layers.gpu_ffn import GATHER_MAX_PAIRS, gathered_ffn, padded_ffn
from tilemem.layers.linear import Linear, gemm
from tilemem.layers.mlp import FusedFFN, GatedMLP, activation, fused_applies, fused_ffn
from tilemem.layers.router import Router
from tilemem.pages import file_backed


class ExpertExecutor(Protocol):
    """Computes sum_k w[t, k] * expert[ids[t, k]](x[t]) for every token, summed in fp32."""

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, K] (fp32 or model dtype, see Router), ids [T, K] -> [T, D] fp32."""
        ...


def group_by_expert(ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """For each routed expert: (expert id, token indices, top-k slot indices)."""
    t, k = ids.shape
    if t == 1:  # decode fast path: no sort
        tok = torch.zeros(1, dtype=torch.long, device=ids.device)
        return [(int(e), tok, torch.tensor([j], device=ids.device)) for j, e in enumerate(ids[0].tolist())]
    flat = ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    groups = []
    start = 0
    for expert, n in enumerate(counts):
        if n:
            sel = order[start : start + n]
            groups.append((expert, sel // k, sel % k))
            start += n
    return groups


Matrix = torch.Tensor | Fp8Matrix | ggml.GgmlMatrix


def expert_ffn(x: torch.Tensor, gate: Matrix, up: Matrix, down: Matrix, act) -> torch.Tensor:
    """Partial or whole expert FFN: x [N, D], gate/up [i, D], down [D, i] (tensors or FP8 matrices) -> [N, D]."""
    return gemm(act(gemm(x, gate)) * gemm(x, up), down)


class PartialSums:
    """Sum of per-expert (or per-tile) outputs scattered to their tokens, in fp32.

    Parts are collected and scattered with one index_add_ per layer: a per-expert index_add_ pays a
    thread fork and join each time, which dominates small batches.
    """

    def __init__(self, shape: torch.Size, device: torch.device | str = "cpu") -> None:
        self.out = torch.zeros(shape, dtype=torch.float32, device=device)  # [T, D]
        self.toks: list[torch.Tensor] = []
        self.parts: list[torch.Tensor] = []

    def add(self, tok: torch.Tensor, y: torch.Tensor) -> None:
        """out[tok] += y."""
        if self.out.shape[0] == 1:
            self.out.add_(y.float())
        else:
            self.toks.append(tok)
            self.parts.append(y.float())

    def result(self) -> torch.Tensor:
        """The [T, D] fp32 sum."""
        if self.parts:
            self.out.index_add_(0, torch.cat(self.toks), torch.cat(self.parts))
            self.toks, self.parts = [], []
        return self.out


def accumulate(out: torch.Tensor, tok: torch.Tensor, y: torch.Tensor) -> None:
    """out[tok] += y in fp32, at once (PartialSums batches many of these into one scatter)."""
    if out.shape[0] == 1:
        out.add_(y.float())
    else:
        out.index_add_(0, tok, y.float())


def fp8_native_act(act: str, x: torch.Tensor) -> bool:
    """Whether FP8 experts (or tiles) with activation `act` run through the portable native FP8 kernel
    (`kernels.fp8.ffn_tasks`) for activations `x`: on the CPU, where the kernel runs."""
    return x.device.type == "cpu" and act in fp8_kernels.ACTS and fp8_kernels.available()


def x12_native_act(act: str, x: torch.Tensor) -> bool:
    """Whether x12 tiles with activation `act` run through the portable fused x12 kernel
    (`kernels.x12_tiles.ffn_tasks`) for activations `x`: on the CPU, where the kernel runs."""
    return x.device.type == "cpu" and act in x12_kernels.ACTS and x12_kernels.available()


def ggml_native_act(act: str, x: torch.Tensor) -> bool:
    """Whether GGUF-quantized experts with activation `act` run through the native ggml FFN kernel
    (`kernels.ggml.ffn_tasks`) for activations `x`: on the CPU, where the kernel runs."""
    return x.device.type == "cpu" and act in ggml_kernels.ACTS and ggml._native() is not None


class ResidentExperts:
    """Runs every routed expert from resident weights (the all-resident engine): the native kernel
    on the CPU (bf16), `gathered_ffn` on a GPU at a few tokens, else a loop over the routed experts.

    `compress`: the native kernel reads the experts as `kernels.X12Matrix` (12 bits per weight, the
    same bits), so a memory-bound decode reads 25% fewer expert bytes (see `compress_all`), where the
    bf16 experts are pages of a mapped checkpoint file (they are let go)."""

    def __init__(self, blocks: dict[int, MoEBlock], compress: bool = True) -> None:
        self.blocks = blocks
        self.compress = compress
        self.tables: dict[int, kernels.ExpertTable | None] = {}
        self.stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.routed: dict[int, tuple[FusedFFN, RoutedTable] | None] = {}  # layer -> its experts for a fused kernel
        self.workspace = kernels.Workspace()

    def _stack(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's experts stacked as the tile slabs are, gate_up [E, 2I, D] and down^T [E, I, D];
        the experts' own weights become views into them, so there is no second copy."""
        if layer not in self.stacks:
            experts = self.blocks[layer].experts
            gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in experts])
            down_t = torch.stack([e.down_proj.weight.t() for e in experts])
            i = gate_up.shape[1] // 2
            for k, e in enumerate(experts):
                e.gate_proj.weight = nn.Parameter(gate_up[k, :i], requires_grad=False)
                e.up_proj.weight = nn.Parameter(gate_up[k, i:], requires_grad=False)
                e.down_proj.weight = nn.Parameter(down_t[k].t(), requires_grad=False)
            self.stacks[layer] = (gate_up, down_t)
        return self.stacks[layer]

    def fp8_experts(self) -> bool:
        """Whether the routed experts are FP8 weights (an FP8 checkpoint's: its LM head stays bf16)."""
        layers = sorted(self.blocks)
        return bool(layers) and self.blocks[layers[0]].experts[0].gate_proj.weight.dtype == torch.float8_e4m3fn

    def table(self, layer: int) -> kernels.ExpertTable | None:
        """The layer's expert pointer table for the native kernel, or None where it cannot run."""
        if layer not in self.tables:
            block = self.blocks[layer]
            w = [[getattr(e, name).weight for e in block.experts] for name in ("gate_proj", "up_proj", "down_proj")]
            try:
                # compressed only where the bf16 weights are pages of a mapped checkpoint, which can be let
                # go (weights converted at load live in anonymous memory: both copies would stay)
                compress = self.compress and file_backed(t for ts in w for t in ts)
                ok = block.act_name in kernels.ACTS
                self.tables[layer] = kernels.ExpertTable(*w, compress=compress) if ok else None
            except ValueError:  # not contiguous bf16: the torch path
                self.tables[layer] = None
        return self.tables[layer]

    def compress_all(self, progress: bool = True) -> int:
        """Build every layer's native table now (with `compress`, encoding the experts: most of the time goes to
        the 9 GB of fresh memory OLMoE-1B-7B's x12 experts take, 8-13 s here against a 2-4 s bf16 load),
        rather than at the layer's first use; returns the bytes the kernels will read for all experts.
        Nothing to do where the native kernels cannot run the experts (GPU, not bf16, no kernels)."""
        from tqdm import tqdm

        layers = sorted(self.blocks)
        if not layers or not kernels.usable(self.blocks[layers[0]].experts[0].gate_proj.weight):
            return 0
        total = 0
        quiet = not progress or not self.compress
        for layer in tqdm(layers, desc="encoding experts (x12)", unit="layer", disable=quiet):
            table = self.table(layer)
            total += table.nbytes if table is not None else 0
        return total

    def fused(self, layer: int) -> tuple[FusedFFN, RoutedTable] | None:
        """The layer's experts for one portable fused FFN kernel (`layers.mlp.fused_ffn`: GGUF, FP8 or bf16): the
        first expert's FusedFFN (the kernel) and all of them in a RoutedTable (built once); None where the kernels do
        not take them all (then `kernels.moe`, `gathered_ffn` or the loop runs them)."""
        if layer not in self.routed:
            packed = [fused_ffn(e) for e in self.blocks[layer].experts]
            ok = packed and None not in packed and len({f.kernel for f in packed}) == 1
            self.routed[layer] = (packed[0], RoutedTable([f.weights for f in packed])) if ok else None
        return self.routed[layer]

    def __call__(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        block = self.blocks[layer]
        if (routed := self.fused(layer)) is not None and fused_applies(routed[0], x):
            fused, table = routed
            out = torch.zeros(x.shape, dtype=torch.float32)  # [T, D]: one native call for the layer's experts
            fused.kernel.ffn_routed(x.float().contiguous(), table, ids, weights, block.act_name, out, *fused.extra(x))
            return out
        if kernels.usable(x) and (table := self.table(layer)) is not None:
            return kernels.moe(x, weights, ids, table, block.act_name, self.workspace)
        w = block.experts[0].gate_proj.weight
        if x.is_cuda and w.dtype.is_floating_point and w.dtype != FP8:  # plain weights (not FP8, not GGUF blocks)
            gate_up, down_t = self._stack(layer)
            if ids.numel() > GATHER_MAX_PAIRS:  # prefill
                return padded_ffn(x, gate_up, down_t, weights, ids, block.act)
            t, k = ids.shape  # decode: no host sync
            tok = torch.arange(t, device=x.device).repeat_interleave(k)  # [T*K]
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            gathered_ffn(x, gate_up, down_t, tok, ids.reshape(-1), weights.reshape(-1), block.act, out)
            return out
        out = PartialSums(x.shape, x.device)
        for expert, tok, slot in group_by_expert(ids):
            e = block.experts[expert]
            xs = x[tok]  # [N, D]
            y = expert_ffn(xs, e.gate_proj.matrix, e.up_proj.matrix, e.down_proj.matrix, block.act)
            out.add(tok, y * weights[tok, slot, None])
        return out.result()


class MoEBlock(nn.Module):
    """Router + routed experts + optional shared experts (with an optional sigmoid gate)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(
            GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act) for _ in range(cfg.num_experts)
        )
        self.act = activation(cfg.hidden_act)
        self.act_name = cfg.hidden_act
        self.shared_experts = (
            GatedMLP(cfg.hidden_size, cfg.shared_intermediate_size * cfg.num_shared_experts, cfg.hidden_act)
            if cfg.num_shared_experts
            else None
        )
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, False) if cfg.shared_expert_gate else None
        self.executor: ExpertExecutor | None = None
        self.on_route = None  # optional observer (profiling): called with (layer, ids [T, K])
        self.reduce = None
        """Expert parallelism: sums a [P, T, D] fp32 tensor of this rank's partial outputs (routed, then shared)
        over the ranks in place (`tilemem.parallel`); None in a single process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, D]
        weights, ids = self.gate(x)  # [T, K], [T, K]
        if self.on_route is not None:
            self.on_route(self.layer, ids)
        if self.reduce is None:
            out = self.executor(self.layer, x, weights, ids).to(x.dtype)  # [T, D]
            shared = self.shared_experts(x) if self.shared_experts is not None else None  # [T, D]
        else:
            out, shared = self._reduced(x, weights, ids)
        if shared is not None:
            # Like transformers: round the routed sum to the model dtype, then add the shared output.
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape)

    def _reduced(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert parallelism: (routed, shared) outputs in the model dtype, each the sum over the ranks of their
        shares (the shared experts are placed as tiles too), summed in fp32 by one all-reduce. x [T, D]."""
        parts = [self.executor(self.layer, x, weights, ids)]  # [T, D] fp32: this rank's share
        if self.shared_experts is not None:
            if self.shared_experts.tiled is None:
                raise TypeError("expert parallelism places shared experts as tiles; attach the tiered runtime first")
            parts.append(self.shared_experts.tiled(x).float())  # [T, D] fp32: this rank's share
        both = self.reduce(torch.stack(parts))  # [P, T, D], summed over ranks
        return both[0].to(x.dtype), (both[1].to(x.dtype) if len(parts) > 1 else None)
