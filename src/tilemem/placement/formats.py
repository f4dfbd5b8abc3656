"""Tile storage formats: element width and scale metadata. The plan's byte counts come from here.

Plain dtypes (bf16, fp16, fp32) carry no scales. `fp8_e4m3` is FP8 as DeepSeek-V3, GLM-5 and Qwen3-FP8
publish it: one byte per weight and one fp32 scale per 128 x 128 block of each projection (neurons x
hidden columns, the last blocks partial); a tile's scales sit right after its weights. Tiles of an FP8
model start on 128-neuron boundaries. `gguf_<type>` (`gguf_q4_k`, ...) counts llama.cpp's quant blocks of
that type; a GGUF model's plan is named by its widest type (`runtime.gguf_source.gguf_tile_format`) but counts
each FFN in its own types, as the tile store holds it (`placement.tiles.ffn_unit_bytes`). `x12` is a
bf16 store's lossless 12-bit packing (`layers.x12`): 12 bits per weight (rows padded to 64 weights), and a tile's
code table, row offsets and exception area (`layers.x12.payload_bytes`) counted as its three projections' scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tilemem.errors import ConfigError
from tilemem.layers import x12
from tilemem.layers.ggml import QUANT_TYPES


@dataclass(frozen=True)
class TileFormat:
    """How one tile's weights are stored."""

    name: str
    """Registry key, written into the manifest (`bf16`, `fp8_e4m3`, ...)."""
    element_bits: int
    """Bits per weight element."""
    layout: str = "row_major"
    """Physical layout of one projection: gate/up rows [n, D], down columns transposed to [n, D]."""
    scale_layout: str = "none"
    """Scale metadata layout name (`none` for plain dtypes)."""
    scale_granularity: str = "none"
    """`none`, `block` (one scale per block of neurons), `block2d`, `tensor` or `tile` (x12: per tile)."""
    scale_block: int = 0
    """Neurons (and, with `scale_granularity` `block2d`, hidden columns too) per scale block (0: none)."""
    scale_bytes_each: int = 0
    """Bytes of one scale value."""
    plain: bool = True
    """A plain dtype (no scales)."""
    builtin: bool = True
    """TileMEM's own runtime computes tiles in this format (else only an external backend does)."""

    def weight_bytes(self, neurons: int, hidden: int) -> int:
        """Bytes of one projection restricted to `neurons` neurons."""
        if self.name == "x12":
            return neurons * x12.row_bytes(hidden)
        return neurons * hidden * self.element_bits // 8

    def scale_bytes(self, neurons: int, hidden: int) -> int:
        """Bytes of that projection's scales (x12: a third of its tile's table, row offsets and exception area)."""
        if self.name == "x12":
            rows = 3 * neurons
            return -(-(x12.payload_bytes(rows, hidden) - rows * x12.row_bytes(hidden)) // 3)
        if not self.scale_block:
            return 0
        cols = math.ceil(hidden / self.scale_block) if self.scale_granularity == "block2d" else hidden
        return math.ceil(neurons / self.scale_block) * cols * self.scale_bytes_each


FORMATS: dict[str, TileFormat] = {
    f.name: f
    for f in (
        TileFormat("bf16", 16),
        TileFormat("fp16", 16),
        TileFormat("fp32", 32),
        TileFormat(
            "fp8_e4m3",
            8,
            scale_layout="block128x128_fp32",
            scale_granularity="block2d",
            scale_block=128,
            scale_bytes_each=4,
            plain=False,
        ),
        TileFormat("x12", 12, scale_layout="x12_exceptions", scale_granularity="tile", plain=False),
    )
}
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def gguf_format(qtype: str) -> TileFormat:
    """The format of llama.cpp's `qtype` blocks (`q4_k`, ...): a type of `bits` bits per weight plus `extra`
    bytes (its scales) per 256 weights counts as `bits` + `extra` bytes per 16 x 16 block of weights: exact
    for projections whose sides are multiples of 16."""
    q = QUANT_TYPES[qtype]
    bits = 8 * q.nbytes // q.weights
    extra = (8 * q.nbytes - bits * q.weights) * 256 // (8 * q.weights)
    return TileFormat(
        f"gguf_{qtype}", bits, scale_layout=f"ggml_{qtype}_blocks", scale_granularity="block2d", scale_block=16,
        scale_bytes_each=extra, plain=False,
    )  # fmt: skip


def tile_format(name: str) -> TileFormat:
    """The format called `name` (torch-style dtype names such as `bfloat16` are accepted; `gguf_<type>`)."""
    key = DTYPE_ALIASES.get(name, name)
    if key.startswith("gguf_") and key[5:] in QUANT_TYPES:
        return gguf_format(key[5:])
    if key not in FORMATS:
        raise ConfigError(f"unknown tile format '{name}'; formats: {', '.join(FORMATS)}.")
    return FORMATS[key]


def bf16_store_format(hidden: int, tile: int) -> TileFormat:
    """The format a tile store converted now keeps bf16 tiles of `tile` neurons in (`tile_store.convert`'s
    `auto`): x12 where rows of `hidden` weights allow it and its payload is smaller, else bf16."""
    if x12.supported(hidden) and x12.payload_bytes(3 * tile, hidden) < 6 * tile * hidden:
        return FORMATS["x12"]
    return FORMATS["bf16"]
