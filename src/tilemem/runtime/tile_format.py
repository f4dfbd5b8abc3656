"""A tile's bytes, by weight format: how the store packs one and how the runtime views one, in every tier.

A tile is neurons [a, b) of one FFN: gate rows, up rows and down columns (stored transposed as rows).
- Plain dtypes (bf16, fp16, fp32): one [3, n, D] array.
- FP8 (`fp8_e4m3`, as DeepSeek-V3 / GLM-5 / Qwen3-FP8 publish): the e4m3 bytes [3, n, D], then (at the next
  16-byte boundary) the fp32 scales of their 128 x 128 blocks [3, ceil(n/128), ceil(D/128)]: the gate and up
  rows' scale rows, and the down columns' scale columns transposed. Tiles start on 128-neuron boundaries,
  so a tile's scale blocks are whole blocks of the checkpoint's (the last tile of an odd width is partial,
  as the checkpoint's last block is). `Fp8Tile` is the viewed form; its projections are `Fp8Matrix`es.
- GGUF (llama.cpp's quantized blocks, `layers.ggml`): the gate rows [n, row_bytes(D)], the up rows, then down's
  D rows cut to the blocks covering the tile's neurons [D, row_bytes(n)] (down stays [D, n]: quant blocks run
  along a row and cannot be transposed). Blocks are kept as the file stores them; gate/up and down may be of
  different types (Q4_K_M), and types may differ per layer, so a GGUF codec is bound to one FFN unit
  (`TileCodec.unit`). Tiles start on down's block boundaries (32 or 256 neurons). `GgmlTile` is the viewed form.
- x12 (a bf16 store's default where the hidden size is a multiple of 32): the [3, n, D] bf16 tile as one x12
  payload of ~12 bits per weight, losslessly (`layers.x12`): 25% fewer bytes off the disk and in the DRAM
  cache. `X12Tile` is the viewed form (consecutive tiles of an expert: one payload each), computed by the portable
  fused x12 kernel (weights decoded in registers) or decoded to bf16 first (prefill sizes, GPUs, no AVX2).

Shape legend: n tile neurons, D hidden, nb = ceil(n/128), Db = ceil(D/128).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from tilemem.kernels import fp8 as fp8_kernels
from tilemem.kernels import ggml as ggml_kernels
from tilemem.kernels import x12_tiles as x12_kernels
from tilemem.layers import x12 as x12_codec
from tilemem.layers.fp8 import BLOCK, FP8, Fp8Matrix
from tilemem.layers.ggml import QUANT_TYPES, GgmlMatrix, QuantType

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


@dataclass(frozen=True)
class GgmlTile:
    """One GGUF tile: gate [n, D] and up [n, D] (whole quantized rows), down [D, n] (each row's blocks that
    cover the tile's neurons), as `GgmlMatrix`es of the file's types."""

    gate: GgmlMatrix
    up: GgmlMatrix
    down: GgmlMatrix

    @property
    def shape(self) -> torch.Size:
        """[3, n, D], as a plain tile's."""
        return torch.Size((3, *self.gate.shape))

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @functools.cached_property
    def ffn_weights(self) -> ggml_kernels.FfnWeights:
        """The tile packed for the native ggml FFN kernel; built once per tile object."""
        return ggml_kernels.FfnWeights(*((m.qtype, m.data) for m in (self.gate, self.up, self.down)))

    def matrices(self) -> tuple[GgmlMatrix, GgmlMatrix, GgmlMatrix]:
        """gate [n, D], up [n, D], down [D, n] (for `layers.linear.gemm`: the torch reference path)."""
        return self.gate, self.up, self.down

    def _map(self, fn) -> GgmlTile:
        return GgmlTile(*(GgmlMatrix(fn(m.data), m.qtype, m.cols) for m in (self.gate, self.up, self.down)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GgmlTile:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> GgmlTile:
        return self._map(lambda t: t.pin_memory())

    def is_pinned(self) -> bool:
        return self.gate.data.is_pinned()

    def record_stream(self, stream) -> None:
        for m in (self.gate, self.up, self.down):
            m.data.record_stream(stream)


@dataclass(frozen=True)
class X12Tile:
    """Consecutive bf16 tiles of one expert as x12 payloads: `payloads` uint8, one per tile (its [3 * n, D]
    matrix), `widths` their neurons."""

    payloads: tuple[torch.Tensor, ...]
    widths: tuple[int, ...]
    hidden: int

    @property
    def shape(self) -> torch.Size:
        """[3, n, D], as the plain tile's."""
        return torch.Size((3, sum(self.widths), self.hidden))

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.payloads)

    def dense(self) -> torch.Tensor:
        """The plain bf16 tile [3, n, D], bit for bit (on the payloads' device)."""
        d = self.hidden
        parts = [decode_x12(p, 3 * n, d).view(3, n, d) for p, n in zip(self.payloads, self.widths, strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @functools.cached_property
    def ffn_weights(self) -> tuple[x12_kernels.FfnWeights, ...]:
        """Each payload packed for the portable fused x12 FFN kernel; built once per tile object."""
        d = self.hidden
        return tuple(x12_kernels.FfnWeights(p, n, d) for p, n in zip(self.payloads, self.widths, strict=True))

    def _map(self, fn) -> X12Tile:
        return X12Tile(tuple(fn(p) for p in self.payloads), self.widths, self.hidden)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> X12Tile:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> X12Tile:
        return self._map(lambda t: t.pin_memory())

    def is_pinned(self) -> bool:
        return self.payloads[0].is_pinned()

    def record_stream(self, stream) -> None:
        for p in self.payloads:
            p.record_stream(stream)


def decode_x12(payload: torch.Tensor, rows: int, d: int) -> torch.Tensor:
    """The bf16 [rows, d] matrix of an x12 payload: the portable kernel on a CPU that has it, else torch (a GPU's
    payload, or no AVX2); the same bits."""
    if payload.is_cpu and x12_kernels.available():
        return x12_kernels.decode(payload, rows, d)
    return x12_codec.decode(payload, rows, d)


def encode_x12(w: torch.Tensor) -> torch.Tensor:
    """The x12 payload of a bf16 [R, D] matrix (X12Overflow past its exception area): the portable kernel where
    it runs, else torch; the same bytes."""
    if w.is_cpu and x12_kernels.available():
        return x12_kernels.encode(w)
    return x12_codec.encode(w)


Block = torch.Tensor | Fp8Tile | GgmlTile | X12Tile
"""A tile (or a merged range of an expert's tiles) as computed: [3, n, D] plain, an `Fp8Tile`, a `GgmlTile` or an
`X12Tile`."""
PACKED = (Fp8Tile, GgmlTile, X12Tile)
"""The viewed forms of tiles that are not plain arrays."""

GgmlTypes = tuple[str, str, str]
"""The quant types of one FFN unit's gate, up and down."""


def block_nbytes(block: Block) -> int:
    """Bytes a viewed tile holds (FP8: weights and scales; GGUF: its blocks)."""
    return block.nbytes if isinstance(block, PACKED) else block.numel() * block.element_size()


@dataclass(frozen=True)
class TileCodec:
    """Packs and views the tiles of one store: its `dtype` (the stored element type) and `hidden` width; `x12`:
    bf16 tiles packed as x12 payloads.

    A GGUF store (`ggml_units` set, `dtype` uint8) packs each FFN unit in its own types: `unit(layer, unit)` is
    the codec of one unit's tiles (`ggml` set), which `payload_bytes`, `pack` and `view` need."""

    dtype: torch.dtype
    hidden: int
    ggml_units: Mapping[tuple[int, int], GgmlTypes] = field(default_factory=dict, compare=False)
    """GGUF: (layer, unit) -> its gate, up and down quant types (empty: not a GGUF store)."""
    ggml: GgmlTypes | None = None
    """The types of the unit this codec is bound to (`unit`)."""
    x12: bool = False
    """bf16 tiles stored as x12 payloads (`layers.x12`)."""

    def __post_init__(self) -> None:
        if self.x12 and (self.dtype != torch.bfloat16 or not x12_codec.supported(self.hidden)):
            raise ValueError(f"x12 tiles hold bf16 rows of a multiple of 32 weights, not {self.dtype} x {self.hidden}")

    @property
    def packed(self) -> bool:
        """Whether tiles are packed (FP8, GGUF, x12) rather than plain arrays of the stored dtype."""
        return self.fp8 or self.gguf or self.x12

    @property
    def fp8(self) -> bool:
        return self.dtype == FP8

    @property
    def gguf(self) -> bool:
        """Whether tiles hold GGUF quant blocks."""
        return bool(self.ggml_units)

    def unit(self, layer: int, unit: int) -> TileCodec:
        """The codec of one FFN unit's tiles (itself but for a GGUF store)."""
        if not self.gguf:
            return self
        return replace(self, ggml=self.ggml_units[(layer, unit)])

    def _types(self) -> tuple[QuantType, QuantType, QuantType]:
        if self.ggml is None:
            raise ValueError("a GGUF tile codec must be bound to an FFN unit first (TileCodec.unit)")
        return tuple(QUANT_TYPES[q] for q in self.ggml)

    @property
    def tile_block(self) -> int:
        """Neurons tiles must start on: 128 (FP8 scale blocks), the largest down block (GGUF), else 1."""
        if self.gguf:
            return max(QUANT_TYPES[t[2]].weights for t in self.ggml_units.values())
        return BLOCK if self.fp8 else 1

    def scale_offset(self, n: int) -> int:
        """Byte offset of an FP8 tile's scales."""
        return math.ceil(3 * n * self.hidden / SCALE_ALIGN) * SCALE_ALIGN

    def payload_bytes(self, n: int) -> int:
        """Bytes of a tile of `n` neurons."""
        if self.ggml_units:
            g, u, dq = self._types()
            return n * (g.row_bytes(self.hidden) + u.row_bytes(self.hidden)) + self.hidden * dq.row_bytes(n)
        if self.fp8:
            return self.scale_offset(n) + 4 * 3 * math.ceil(n / BLOCK) * math.ceil(self.hidden / BLOCK)
        if self.x12:
            return x12_codec.payload_bytes(3 * n, self.hidden)
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
        FP8 needs their fp32 block scales gate/up [ceil(I/128), Db], down [Db, ceil(I/128)]; GGUF takes
        `GgmlMatrix`es (gate/up [I, D], down [D, I]) and cuts down's rows at blocks boundaries. x12: raises
        X12Overflow for a tile with too many rare high bytes (the store is then converted plain)."""
        if self.ggml_units:
            return self._pack_ggml(gate, up, down, a, b)
        block = torch.stack([gate[a:b], up[a:b], down[:, a:b].t()]).contiguous()  # [3, n, D]
        if self.x12:
            return encode_x12(block.view(3 * (b - a), self.hidden))
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

    def _pack_ggml(self, gate: GgmlMatrix, up: GgmlMatrix, down: GgmlMatrix, a: int, b: int) -> torch.Tensor:
        got = (gate.qtype, up.qtype, down.qtype)
        if got != self.ggml:
            raise ValueError(f"GGUF tile of types {got}, but the codec is bound to {self.ggml}")
        q = QUANT_TYPES[down.qtype]
        if a % q.weights or (b % q.weights and b != down.cols):
            raise ValueError(f"GGUF tiles fall on down's {q.weights}-weight {q.name} blocks, not on [{a}, {b})")
        cut = down.data[:, a // q.weights * q.nbytes : math.ceil(b / q.weights) * q.nbytes]  # [D, row_bytes(n)]
        parts = (gate.data[a:b], up.data[a:b], cut)
        return torch.cat([p.contiguous().reshape(-1) for p in parts])

    def view(self, raw: torch.Tensor, n: int) -> Block:
        """The tile of `n` neurons in `raw` (uint8, at least payload_bytes(n); a view, no copy)."""
        d = self.hidden
        if self.ggml_units:
            g, u, dq = self._types()
            sizes = (n * g.row_bytes(d), n * u.row_bytes(d), d * dq.row_bytes(n))
            gate, up, down = raw[: sum(sizes)].split(sizes)
            return GgmlTile(
                GgmlMatrix(gate.view(n, -1), g.name, d),
                GgmlMatrix(up.view(n, -1), u.name, d),
                GgmlMatrix(down.view(d, -1), dq.name, n),
            )
        if self.x12:
            return X12Tile((raw[: self.payload_bytes(n)],), (n,), d)
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
        if isinstance(blocks[0], GgmlTile):
            g, u, dn = blocks[0].matrices()
            return GgmlTile(
                GgmlMatrix(torch.cat([b.gate.data for b in blocks]), g.qtype, g.cols),
                GgmlMatrix(torch.cat([b.up.data for b in blocks]), u.qtype, u.cols),
                GgmlMatrix(torch.cat([b.down.data for b in blocks], 1), dn.qtype, sum(b.down.cols for b in blocks)),
            )  # down's rows: each tile's blocks of that row, in neuron order
        if isinstance(blocks[0], X12Tile):
            return X12Tile(sum((b.payloads for b in blocks), ()), sum((b.widths for b in blocks), ()), self.hidden)
        if not self.fp8:
            return torch.cat(blocks, dim=1)
        return Fp8Tile(torch.cat([b.data for b in blocks], 1), torch.cat([b.scale for b in blocks], 1))

    def check_tile_size(self, tile_size: int) -> None:
        """Refuse a tile size whose boundaries would cut FP8 scale blocks or GGUF down blocks, naming the
        nearest valid sizes."""
        if self.gguf and tile_size % self.tile_block:
            raise ValueError(gguf_tile_size_message(tile_size, self.tile_block))
        if self.fp8 and tile_size % BLOCK:
            raise ValueError(fp8_tile_size_message(tile_size))


def _nearest(tile_size: int, block: int) -> str:
    lower = tile_size // block * block
    return " or ".join(str(s) for s in (lower, lower + block) if s > 0)


def fp8_tile_size_message(tile_size: int) -> str:
    """Why `tile_size` cannot tile an FP8 model, and the nearest sizes that can."""
    return (
        f"tile size {tile_size} does not fall on the FP8 checkpoint's {BLOCK}-neuron scale blocks; use a "
        f"multiple of {BLOCK}: {_nearest(tile_size, BLOCK)}"
    )


def gguf_tile_size_message(tile_size: int, block: int) -> str:
    """Why `tile_size` cannot tile a GGUF model whose down projections have `block`-weight quant blocks."""
    return (
        f"tile size {tile_size} does not fall on the GGUF file's {block}-weight quant blocks of ffn_down (a tile's "
        f"down columns are whole blocks); use a multiple of {block}: {_nearest(tile_size, block)}"
    )
