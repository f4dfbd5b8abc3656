"""Where each tile lives in the tile store: one 4 KiB-aligned block per unit.

A block packs, for one neuron range [a, b) of one FFN: gate rows [n, D], up rows [n, D] (the
`gate_up` tile), then the down columns down[:, a:b] stored transposed as [n, D] (the `down` tile),
so a block is one contiguous [3, n, D] array; scales of gate_up and of down follow when the format
has any. Blocks are ordered (layer, expert, shard, start), DENSE and SHARED before a layer's routed
experts, so a whole expert is one contiguous run. `tilemem convert` (`runtime/tile_store.py`) writes
its store in this order and alignment, so a plan's offsets equal those of the store of the same tile
size (plain dtypes: no scales, one shard).
"""

from __future__ import annotations

from dataclasses import dataclass

from tilemem.models.topology import Topology
from tilemem.placement.formats import TileFormat
from tilemem.placement.tiles import GROUPS, Unit, ffn_group_bytes, group_bytes

ALIGNMENT = 4096
"""Block alignment in bytes: every tile block, O_DIRECT read and cache slot is whole 4 KiB pages. The one
definition (the tile store, the direct reader, the cost model and the probe use it)."""


@dataclass(frozen=True)
class StoreEntry:
    """One tile's bytes in the store."""

    offset: int
    """Byte offset of the weights."""
    nbytes: int
    """Weight bytes."""
    scale_offset: int
    """Byte offset of the scales (= end of the block's weights when there are none)."""
    scale_bytes: int
    """Scale bytes (0 for plain dtypes)."""


def align(n: int, to: int = ALIGNMENT) -> int:
    """`n` rounded up to a multiple of `to`."""
    return -(-n // to) * to


def store_order(unit: Unit) -> tuple:
    """Sort key of units in the store (and in a plan's tile list): by layer, then the dense FFN (DENSE),
    the shared experts (SHARED), the routed experts by index, each by shard and neuron range."""
    return (unit.layer, unit.expert, unit.shard, unit.start)


def layout(
    units: list[Unit], hidden: int, fmt: TileFormat, topology: Topology | None = None
) -> tuple[dict[tuple[Unit, str], StoreEntry], int]:
    """Store entries of every (unit, group) and the store's total size. With the `topology`, each tile counts the
    bytes the tile store holds (a GGUF model's: its FFN's own quant types, `tiles.ffn_group_bytes`; such a store
    keeps the file's blocks in its own layout, `runtime.tile_format`, so only the sizes are its)."""
    entries: dict[tuple[Unit, str], StoreEntry] = {}
    offset = 0
    for unit in sorted(units, key=store_order):
        if topology is not None:
            sizes = {g: ffn_group_bytes(topology, unit.layer, unit.expert, g, unit.neurons, fmt) for g in GROUPS}
        else:
            sizes = {g: group_bytes(g, unit.neurons, hidden, fmt) for g in GROUPS}
        weights = offset
        scales = offset + sum(w for w, _ in sizes.values())
        for g in GROUPS:
            w, s = sizes[g]
            entries[(unit, g)] = StoreEntry(weights, w, scales, s)
            weights += w
            scales += s
        offset = align(scales)
    return entries, offset
