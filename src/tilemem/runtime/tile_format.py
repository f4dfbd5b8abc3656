"""A tile's bytes, by weight format: how the store packs one and how the runtime views one, in every tier.

A tile is neurons [a, b) of one FFN: gate rows, up rows and down columns (stored transposed as rows).
- Plain dtypes (bf16, fp16, fp32): one [3, n, D] array.
- FP8 (`fp8_e4m3`, as DeepSeek-V3 / GLM-5 / Qwen3-FP8 publish): the e4m3 bytes [3, n, D], then (at the next
  16-byte boundary) the fp32 scales of their 128 x 128 blocks [3, ceil(n/128), ceil(D/128)]: the gate and up
  rows' scale rows, and the down columns' scale columns transposed. Tiles start on 128-neuron boundaries,
  so a tile's scale blocks are whole blocks of the checkpoint's (the last tile of an odd width is partial,
  as the checkpoint's last block is). `Fp8Tile` is the viewed form; its projections are `Fp8Matrix`es.

Shape legend: n tile neurons, D hidden, nb = ceil(n/128), Db = ceil(D/128).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tilemem.kernels import fp8 as fp8_kernels
from tilemem.layers.fp8 import BLOCK, FP8, Fp8Matrix

SCALE_ALIGN = 16
"""Byte alignment of an FP8 tile's scales after its weights."""


@dataclass(frozen=True)
class Fp8Tile:
    """One FP8 tile: `data` float8_e4m3fn [3, n, D] (gate, up, down^T) and `scale` fp32 [3, nb, Db]."""

    data: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.numel() + 4 * self.scale.numel()

    @functools.cached_property
    def ffn_weights(self) -> fp8_kernels.FfnWeights:
        """The tile packed for the native FP8 FFN kernel (down as stored: its transposed rows); built once
        per tile object (a resident range keeps its own; a cache slot's view is built per use)."""
        return fp8_kernels.FfnWeights.from_tile(self.data, self.scale)

    def matrices(self) -> tuple[Fp8Matrix, Fp8Matrix, Fp8Matrix]:
        """gate [n, D], up [n, D] and down [D, n] (a transposed view of the stored down^T rows)."""
        gate, up, down_t = (Fp8Matrix(self.data[i], self.scale[i]) for i in range(3))
        return gate, up, down_t.t()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Fp8Tile:
        data, scale = (t.to(device, non_blocking=non_blocking) for t in (self.data, self.scale))
        return Fp8Tile(data, scale)

    def pin_memory(self) -> Fp8Tile:
        return Fp8Tile(self.data.pin_memory(), self.scale.pin_memory())

    def is_pinned(self) -> bool:
        return self.data.is_pinned()

    def record_stream(self, stream) -> None:
        self.data.record_stream(stream)
        self.scale.record_stream(stream)


Block = torch.Tensor | Fp8Tile
"""A tile (or a merged range of an expert's tiles) as computed: [3, n, D] plain, or an `Fp8Tile`."""


def block_nbytes(block: Block) -> int:
    """Bytes a viewed tile holds (FP8: weights and scales)."""
    return block.nbytes if isinstance(block, Fp8Tile) else block.numel() * block.element_size()


@dataclass(frozen=True)
class TileCodec:
    """Packs and views the tiles of one store: its `dtype` (the stored element type) and `hidden` width."""

    dtype: torch.dtype
    hidden: int

    @property
    def fp8(self) -> bool:
        return self.dtype == FP8

    def scale_offset(self, n: int) -> int:
        """Byte offset of an FP8 tile's scales."""
        return math.ceil(3 * n * self.hidden / SCALE_ALIGN) * SCALE_ALIGN

    def payload_bytes(self, n: int) -> int:
        """Bytes of a tile of `n` neurons."""
        if self.fp8:
            return self.scale_offset(n) + 4 * 3 * math.ceil(n / BLOCK) * math.ceil(self.hidden / BLOCK)
        return 3 * n * self.hidden * self.dtype.itemsize

    def pack(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        a: int,
        b: int,
        scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The bytes (uint8 [payload_bytes(b - a)]) of neurons [a, b) of gate [I, D], up [I, D], down [D, I];
        FP8 needs their fp32 block scales gate/up [ceil(I/128), Db], down [Db, ceil(I/128)]."""
        block = torch.stack([gate[a:b], up[a:b], down[:, a:b].t()]).contiguous()  # [3, n, D]
        raw = block.view(torch.uint8).reshape(-1)
        if not self.fp8:
            return raw
        if a % BLOCK:
            raise ValueError(f"FP8 tiles start on {BLOCK}-neuron boundaries, not at neuron {a}")
        rows = slice(a // BLOCK, math.ceil(b / BLOCK))
        sg, su, sd = (s.float() for s in scales)
        scale = torch.stack([sg[rows], su[rows], sd[:, rows].t()]).contiguous()  # [3, nb, Db]
        pad = torch.zeros(self.scale_offset(b - a) - raw.numel(), dtype=torch.uint8)
        return torch.cat([raw, pad, scale.view(torch.uint8).reshape(-1)])

    def view(self, raw: torch.Tensor, n: int) -> Block:
        """The tile of `n` neurons in `raw` (uint8, at least payload_bytes(n); a view, no copy)."""
        d = self.hidden
        if not self.fp8:
            return raw[: 3 * n * d * self.dtype.itemsize].view(self.dtype).view(3, n, d)
        off = self.scale_offset(n)
        nb, db = math.ceil(n / BLOCK), math.ceil(d / BLOCK)
        data = raw[: 3 * n * d].view(FP8).view(3, n, d)
        scale = raw[off : off + 12 * nb * db].view(torch.float32).view(3, nb, db)
        return Fp8Tile(data, scale)

    def concat(self, blocks: list[Block]) -> Block:
        """Consecutive tiles of one expert as one block (FP8: their scale rows follow, as the tiles start on
        block boundaries)."""
        if not self.fp8:
            return torch.cat(blocks, dim=1)
        return Fp8Tile(torch.cat([b.data for b in blocks], 1), torch.cat([b.scale for b in blocks], 1))

    def check_tile_size(self, tile_size: int) -> None:
        """Refuse a tile size whose boundaries would cut FP8 scale blocks, naming the nearest valid sizes."""
        if self.fp8 and tile_size % BLOCK:
            raise ValueError(fp8_tile_size_message(tile_size))


def fp8_tile_size_message(tile_size: int) -> str:
    """Why `tile_size` cannot tile an FP8 model, and the nearest sizes that can."""
    lower = tile_size // BLOCK * BLOCK
    near = [s for s in (lower, lower + BLOCK) if s > 0]
    return (
        f"tile size {tile_size} does not fall on the FP8 checkpoint's {BLOCK}-neuron scale blocks; use a "
        f"multiple of {BLOCK}: {' or '.join(map(str, near))}"
    )
