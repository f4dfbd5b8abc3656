"""Tiles: one FFN restricted to a neuron range [a, b) of its intermediate dimension.

A *unit* is the placement unit: one neuron range of one FFN with both projection groups, because a
partial FFN needs gate, up and down rows of the same neurons. Each unit is two *tiles* with stable
keys, `L{layer}:E{expert}:{group}:S{shard}:N{a}-{b}`:

- routed expert 17 of layer 3: `L3:E17:gate_up:S0:N0-128` and `L3:E17:down:S0:N0-128`;
- the (fused) shared experts of layer 3: `L3:Eshared:gate_up:S0:N0-128`;
- the dense FFN of a dense layer 0: `L0:Edense:down:S0:N0-128`.

`S{shard}` is the tensor-parallel shard the range falls in: the intermediate dimension is cut into
`shard_count` contiguous parts and no tile crosses a cut (one device: always `S0`). Ranges cover
the whole dimension exactly once; the last tile of a shard is shorter when the size does not divide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tilemem.models.topology import DENSE, SHARED, Topology, matrix_bytes
from tilemem.placement.errors import PlanError
from tilemem.placement.formats import TileFormat, gguf_format

GROUPS: tuple[str, ...] = ("gate_up", "down")
"""Projection groups: gate and up rows together, down columns."""
_LABELS = {SHARED: "shared", DENSE: "dense"}
_KEY = re.compile(r"^L(\d+):E(\d+|shared|dense)(?::(gate_up|down))?:S(\d+):N(\d+)-(\d+)$")


def expert_label(expert: int) -> str:
    """`17`, `shared` or `dense`, as written after `E` in a key."""
    return _LABELS.get(expert, str(expert))


def expert_from_label(label: str) -> int:
    """Inverse of `expert_label`."""
    if label.isdigit():
        return int(label)
    return {"shared": SHARED, "dense": DENSE}[label]


@dataclass(frozen=True, order=True)
class Unit:
    """A neuron range of one FFN, both projection groups (the unit a policy places)."""

    layer: int
    """Decoder layer."""
    expert: int
    """Routed expert index, or SHARED / DENSE."""
    shard: int
    """Tensor-parallel shard the range lies in."""
    start: int
    """First neuron (inclusive)."""
    end: int
    """Last neuron (exclusive)."""

    @property
    def neurons(self) -> int:
        """b - a."""
        return self.end - self.start

    @property
    def ffn(self) -> tuple[int, int]:
        """(layer, expert) of the FFN this range belongs to."""
        return self.layer, self.expert

    def key(self, group: str | None = None) -> str:
        """Stable key of this unit's tile in `group`; without a group, of the unit (one tile-store block)."""
        return tile_key(self.layer, self.expert, group, self.shard, self.start, self.end)


def expert_key(layer: int, expert: int) -> str:
    """`L3:E17`, `L3:Eshared`, `L0:Edense`: the FFN part every tile key starts with."""
    return f"L{layer}:E{expert_label(expert)}"


def tile_key(layer: int, expert: int, group: str | None, shard: int, start: int, end: int) -> str:
    """`L3:E17:gate_up:S0:N0-128` (a tile: one projection group); with group None, `L3:E17:S0:N0-128` (a
    unit: both groups, as one tile-store block). The only place keys are formatted; `parse_tile_key` reads them."""
    part = f":{group}" if group is not None else ""
    return f"{expert_key(layer, expert)}{part}:S{shard}:N{start}-{end}"


def parse_tile_key(key: str) -> tuple[Unit, str | None]:
    """(unit, group) of a tile key (group None for a unit key), or a PlanError showing the expected form."""
    m = _KEY.match(key)
    if not m:
        raise PlanError(
            f"'{key}' is not a tile key; keys look like L3:E17:gate_up:S0:N0-128, or L3:E17:S0:N0-128 for "
            "both groups (expert may be a number, 'shared' or 'dense'; group gate_up or down)."
        )
    layer, label, group, shard, a, b = m.groups()
    return Unit(int(layer), expert_from_label(label), int(shard), int(a), int(b)), group


def shard_bounds(width: int, shard_count: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal [a, b) cuts of `width` neurons into `shard_count` shards."""
    cuts = [width * s // shard_count for s in range(shard_count + 1)]
    return [(cuts[s], cuts[s + 1]) for s in range(shard_count)]


def split_ranges(width: int, tile: int, shard_count: int = 1) -> list[tuple[int, int, int]]:
    """(shard, a, b) tiles of `tile` neurons covering [0, width) once; the last of a shard may be shorter."""
    out = []
    for shard, (lo, hi) in enumerate(shard_bounds(width, shard_count)):
        out.extend((shard, a, min(a + tile, hi)) for a in range(lo, hi, tile))
    return out


def ffn_width(topology: Topology, layer: int, expert: int) -> int:
    """Intermediate width of a routed expert, the shared experts or the dense FFN of `layer`."""
    lt = topology.layers[layer]
    if expert == SHARED:
        return lt.shared_intermediate
    if expert == DENSE:
        return lt.dense_intermediate
    return lt.expert_intermediate


def always_active_ffns(topology: Topology) -> list[tuple[int, int]]:
    """(layer, SHARED | DENSE) of every FFN that runs for every token."""
    out = []
    for lt in topology.layers:
        if lt.dense_intermediate:
            out.append((lt.index, DENSE))
        if lt.shared_intermediate:
            out.append((lt.index, SHARED))
    return out


def routed_ffns(topology: Topology) -> list[tuple[int, int]]:
    """(layer, expert) of every routed expert."""
    return [(lt.index, e) for lt in topology.layers if lt.is_moe for e in range(lt.num_experts)]


def units_of(topology: Topology, layer: int, expert: int, tile: int, shard_count: int = 1) -> list[Unit]:
    """The units of one FFN cut into tiles of `tile` neurons (tile >= width: one unit per shard)."""
    width = ffn_width(topology, layer, expert)
    return [Unit(layer, expert, s, a, b) for s, a, b in split_ranges(width, max(1, tile), shard_count)]


def group_bytes(group: str, neurons: int, hidden: int, fmt: TileFormat) -> tuple[int, int]:
    """(weight bytes, scale bytes) of one tile: gate_up holds two projections, down one."""
    n_proj = 2 if group == "gate_up" else 1
    return n_proj * fmt.weight_bytes(neurons, hidden), n_proj * fmt.scale_bytes(neurons, hidden)


def unit_bytes(neurons: int, hidden: int, fmt: TileFormat) -> int:
    """Bytes of a unit: both groups' weights and scales."""
    return sum(sum(group_bytes(g, neurons, hidden, fmt)) for g in GROUPS)


def ffn_group_bytes(
    topology: Topology, layer: int, expert: int, group: str, neurons: int, fmt: TileFormat
) -> tuple[int, int]:
    """(weight bytes, scale bytes) of the `group` tile of `neurons` neurons of FFN (layer, expert), as the tile
    store holds it: a GGUF model's FFN in its own quant types (`Topology.unit_types`; gate/up rows of D weights,
    down's D rows of `neurons` columns: its blocks' bytes, exact on the block grid, the part past the type's
    whole bits per weight counted as scales), any other in `fmt` (`group_bytes`)."""
    types = topology.unit_types(layer, expert)
    d = topology.hidden_size
    if types is None:
        return group_bytes(group, neurons, d, fmt)
    mats = [(neurons, d, q) for q in types[:2]] if group == "gate_up" else [(d, neurons, types[2])]
    total = sum(matrix_bytes(rows, cols, q) for rows, cols, q in mats)
    weights = sum(rows * cols * gguf_format(q).element_bits // 8 for rows, cols, q in mats)
    return weights, total - weights


def ffn_unit_bytes(topology: Topology, layer: int, expert: int, neurons: int, fmt: TileFormat) -> int:
    """Bytes of a unit of `neurons` neurons of FFN (layer, expert), both groups, as the tile store holds it: a
    GGUF model's in the FFN's own quant types (Q4_K_M: q4_k gate/up, q4_k or q6_k down by layer), any other
    model's in `fmt` (`unit_bytes`). What plans, budgets, policies and the cost model count."""
    if topology.unit_types(layer, expert) is None:
        return unit_bytes(neurons, topology.hidden_size, fmt)
    return sum(sum(ffn_group_bytes(topology, layer, expert, g, neurons, fmt)) for g in GROUPS)
