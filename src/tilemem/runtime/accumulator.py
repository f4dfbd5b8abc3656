"""Sums of tile FFN outputs: `partial_ffn` computes one tile (or a merged range of an expert's tiles) with
torch; `Accumulator` queues a layer's host tiles for the native kernels (bf16/fp32, FP8, GGUF and x12 tiles each
to theirs) and sums in fp32; `GpuAccumulator` sums tiles computed on the GPU.

Shape legend: T tokens, N tokens routed to one expert, n tile neurons, D hidden.
"""

from __future__ import annotations

import torch

from tilemem import kernels
from tilemem.kernels import fp8 as fp8_kernels
from tilemem.kernels import ggml as ggml_kernels
from tilemem.kernels import x12_tiles as x12_kernels
from tilemem.layers import ggml
from tilemem.layers.linear import gemm
from tilemem.layers.moe import PartialSums
from tilemem.runtime.tile_format import Block, Fp8Tile, GgmlTile, X12Tile

X12_FUSED_MAX_TOKENS = 64
"""Most tokens an x12 tile runs with in the fused kernel (8 per pass over its payload); with more (prefill) it is
decoded and runs as GEMMs. Measured here (128 x 2048 tiles, 2 threads): fused 4.2x the decoded path at 1 token,
2.0x at 16, 1.2x at 64."""


def partial_ffn(x: torch.Tensor, block: Block, act) -> torch.Tensor:
    """FFN over one tile or merged range: x [N, D], block [3, n, D] (gate, up, down^T) -> [N, D].

    Gate and up rows are adjacent in the block, so they run as one GEMM (an FP8 tile's as two: a partial
    last scale block would straddle them; a GGUF tile's as two quantized matrices; an x12 tile decoded first)."""
    if isinstance(block, X12Tile):
        block = block.dense().to(x.dtype)
    if isinstance(block, (Fp8Tile, GgmlTile)):
        gate, up, down = block.matrices()
        return gemm(act(gemm(x, gate)) * gemm(x, up), down)  # [N, D]
    n = block.shape[1]
    gu = gemm(x, block[:2].reshape(2 * n, -1))  # [N, 2n]
    return gemm(act(gu[:, :n]) * gu[:, n:], block[2].t())  # [N, D]: down^T rows, as a transposed weight


class GpuAccumulator:
    """Sum of tile FFN outputs computed on the GPU, in fp32 there. Host tiles are copied on a side
    stream; the compute stream waits for each copy (kernels are queued, never waited for here)."""

    def __init__(self, x: torch.Tensor, act, copy_stream: torch.cuda.Stream) -> None:
        self.x = x  # [T, D] on the GPU
        self.act = act
        self.sums = PartialSums(x.shape, x.device)
        self.copy_stream = copy_stream

    def add(self, block: torch.Tensor, tok: torch.Tensor, scale: torch.Tensor) -> None:
        """out[tok] += scale * tile FFN of x[tok]; block [3, n, D] on the GPU, tok [N], scale [N] anywhere."""
        dev = self.x.device
        tok, scale = tok.to(dev, non_blocking=True), scale.to(dev, non_blocking=True)
        self.sums.add(tok, partial_ffn(self.x[tok], block, self.act) * scale[:, None])

    def add_host(self, block: torch.Tensor, tok: torch.Tensor, scale: torch.Tensor) -> None:
        """The same for a block in host memory: copy it over first (asynchronous when pinned)."""
        main = torch.cuda.current_stream(self.x.device)
        self.copy_stream.wait_stream(main)  # the copy's buffer is allocated on main's timeline
        with torch.cuda.stream(self.copy_stream):
            dev_block = block.to(self.x.device, non_blocking=True)
        main.wait_stream(self.copy_stream)
        dev_block.record_stream(main)
        self.add(dev_block, tok, scale)

    def result(self) -> torch.Tensor:
        """The [T, D] fp32 sum, on the GPU."""
        return self.sums.result()


class Accumulator:
    """Sum of tile FFN outputs over their tokens, in fp32: through the native kernel (tasks queued
    until `flush`, so a batch of DRAM tiles runs as one threaded call) or with torch. With `gpu`,
    tiles used by at least `gpu_min_tokens` tokens go to the GPU instead (`GpuAccumulator.add_host`)."""

    def __init__(
        self,
        x: torch.Tensor,
        act,
        native_act: str | None,
        ws: kernels.Workspace,
        gpu: GpuAccumulator | None = None,
        gpu_min_tokens: int = 0,
        fp8_act: str | None = None,
        ggml_act: str | None = None,
        x12_act: str | None = None,
    ) -> None:
        self.x = x  # [T, D]
        self.act, self.native_act, self.ws = act, native_act, ws
        self.sums = PartialSums(x.shape)
        self.tasks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.gpu, self.gpu_min_tokens = gpu, gpu_min_tokens
        self.fp8_act = fp8_act  # FP8 tiles go to the portable FP8 kernel with this activation (None: torch)
        self.fp8_tasks: list[fp8_kernels.FfnTask] = []
        self.ggml_act = ggml_act  # GGUF tiles go to the native ggml kernel with this activation (None: torch)
        self.ggml_tasks: list[ggml_kernels.FfnTask] = []
        self.x12_act = x12_act  # x12 tiles go to the portable fused x12 kernel with this activation (None: decoded)
        self.x12_tasks: list[x12_kernels.FfnTask] = []
        self.xf: torch.Tensor | None = None  # x in fp32, made once for the FP8 and ggml kernels

    def to_gpu(self, tok: torch.Tensor) -> bool:
        """Whether a tile used by `tok` is computed on the GPU."""
        return self.gpu is not None and tok.numel() >= self.gpu_min_tokens

    def add(self, block: Block, tok: torch.Tensor, scale: torch.Tensor) -> None:
        """out[tok] += scale * tile FFN of x[tok]; block [3, n, D], tok [N], scale [N]."""
        if self.to_gpu(tok):
            self.gpu.add_host(block, tok, scale)
        elif isinstance(block, Fp8Tile) and self.fp8_act is not None:
            task = fp8_kernels.FfnTask(block.ffn_weights, tok.to(torch.int32), scale.to(torch.float32))
            self.fp8_tasks.append(task)
        elif isinstance(block, GgmlTile) and self.ggml_act is not None:
            task = ggml_kernels.FfnTask(block.ffn_weights, tok.to(torch.int32), scale.to(torch.float32))
            self.ggml_tasks.append(task)
        elif isinstance(block, X12Tile) and self.x12_act is not None and tok.numel() <= X12_FUSED_MAX_TOKENS:
            tok, scale = tok.to(torch.int32), scale.to(torch.float32)
            self.x12_tasks += [x12_kernels.FfnTask(w, tok, scale) for w in block.ffn_weights]
        elif isinstance(block, X12Tile):
            self.add(block.dense().to(self.x.dtype), tok, scale)
        elif self.native_act is None or isinstance(block, (Fp8Tile, GgmlTile)):
            self.sums.add(tok, partial_ffn(self.x[tok], block, self.act) * scale[:, None])
        else:
            self.tasks.append((block, tok.to(torch.int32), scale.to(torch.float32)))

    def flush(self) -> None:
        """Run the queued tasks."""
        if (self.fp8_tasks or self.ggml_tasks or self.x12_tasks) and self.xf is None:
            self.xf = self.x.float().contiguous()  # [T, D]
        if self.fp8_tasks:
            bf16_h = self.x.dtype == torch.bfloat16  # h rounded as the resident experts' kernels round it
            fp8_kernels.ffn_tasks(self.xf, self.fp8_tasks, self.fp8_act, self.sums.out, bf16_h)
            self.fp8_tasks = []
        if self.ggml_tasks:
            ggml_kernels.ffn_tasks(self.xf, self.ggml_tasks, self.ggml_act, self.sums.out, exact=not ggml.FAST)
            self.ggml_tasks = []
        if self.x12_tasks:
            x12_kernels.ffn_tasks(self.xf, self.x12_tasks, self.x12_act, self.sums.out)
            self.x12_tasks = []
        if self.tasks:
            kernels.ffn_tasks(self.x, self.tasks, self.native_act, self.ws, self.sums.out)
            self.tasks = []

    def result(self) -> torch.Tensor:
        """The [T, D] fp32 sum."""
        self.flush()
        return self.sums.result()
