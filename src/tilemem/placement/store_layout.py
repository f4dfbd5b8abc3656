"""Where each tile lives in the tile store: one 4 KiB-aligned block per unit.

A block packs, for one neuron range [a, b) of one FFN: gate rows [n, D], up rows [n, D] (the
`gate_up` tile), then the down columns down[:, a:b] stored transposed as [n, D] (the `down` tile),
so a block is one contiguous [3, n, D] array; scales of gate_up and of down follow when the format
has any. Routed experts come first, ordered (layer, expert, shard, start), so a whole expert is
one contiguous run and a `tilepo_fine` plan's offsets equal those of `tilemem convert`'s store of
the same tile size (`runtime/tile_store.py`); the shared-expert and dense-FFN blocks follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilemem.placement.formats import TileFormat
from tilemem.placement.tiles import GROUPS, Unit, group_bytes

ALIGNMENT = 4096
"""Block alignment in bytes (O_DIRECT reads)."""


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
    """Sort key of units in the store (and in a plan's tile list): routed experts first."""
    return (unit.expert < 0, unit.layer, unit.expert, unit.shard, unit.start)


def layout(units: list[Unit], hidden: int, fmt: TileFormat) -> tuple[dict[tuple[Unit, str], StoreEntry], int]:
    """Store entries of every (unit, group) and the store's total size."""
    entries: dict[tuple[Unit, str], StoreEntry] = {}
    offset = 0
    for unit in sorted(units, key=store_order):
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
