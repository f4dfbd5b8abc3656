"""Plan: the tier of every tile, the non-expert weights, per-tier usage and the tile store layout.

This is what the tiered runtime executes. Queries it needs: `tier_of(layer, expert, group, a, b)`,
`resident_ranges(layer, expert)` (merged neuron ranges per tier) and `tiles_in(tier)`. Its files (MIR,
manifest) are `tilemem.artifacts`: `save_plan`, `load_plan(dir)` (checksums verified), `plan_checksum`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from tilemem.models.topology import Topology
from tilemem.placement.errors import PlanError
from tilemem.placement.formats import TileFormat
from tilemem.placement.tiers import tier as tier_info
from tilemem.placement.tiles import expert_label


@dataclass(frozen=True)
class PlacedTile:
    """One tile, its tier and its bytes in the tile store."""

    key: str
    """Stable key, e.g. `L3:E17:gate_up:S0:N0-128`."""
    layer: int
    """Decoder layer."""
    expert: int
    """Routed expert index, or tiles.SHARED / tiles.DENSE."""
    group: str
    """`gate_up` or `down`."""
    shard: int
    """Tensor-parallel shard."""
    start: int
    """First neuron."""
    end: int
    """One past the last neuron."""
    tier: str
    """Tier it is resident in."""
    offset: int
    """Byte offset of its weights in the tile store."""
    nbytes: int
    """Weight bytes."""
    scale_offset: int
    """Byte offset of its scales in the tile store."""
    scale_bytes: int
    """Scale bytes (0 for plain dtypes)."""

    @property
    def total_bytes(self) -> int:
        """Weights plus scales: what it occupies in its tier."""
        return self.nbytes + self.scale_bytes


@dataclass(frozen=True)
class NonExpertWeight:
    """A weight that is not tiled (attention, norm, router, embedding, LM head)."""

    name: str
    """Module name, e.g. `model.layers.0.self_attn.q_proj.weight`."""
    nbytes: int
    """Bytes."""
    tier: str
    """Tier it lives in (the fastest)."""


@dataclass(frozen=True)
class TierUsage:
    """Capacity and use of one tier."""

    tier: str
    """Tier name."""
    capacity: int | None
    """Budget in bytes (None: unbounded)."""
    cache: int
    """Bytes reserved for the runtime's dynamic tile cache."""
    non_expert: int
    """Bytes of non-expert weights."""
    tiles: int
    """Bytes of tiles placed statically."""

    @property
    def used(self) -> int:
        """Everything counted against the budget."""
        return self.cache + self.non_expert + self.tiles

    @property
    def compute(self) -> bool:
        """Whether tiles here run in place."""
        return tier_info(self.tier).compute


@dataclass(frozen=True)
class Plan:
    """A complete placement, executable by the tiered runtime."""

    name: str
    """Plan name (model name or spec name)."""
    topology: Topology
    """The model it places."""
    fmt: TileFormat
    """Tile storage format."""
    tile: int
    """Fine tile size the policy used (neurons)."""
    shard_count: int
    """Tensor-parallel shards."""
    policy: str
    """Policy name."""
    policy_params: dict[str, Any]
    """Policy settings and solver notes."""
    tiers: tuple[TierUsage, ...]
    """Per-tier capacity and use, fastest first."""
    budget_source: str
    """The budget as the user wrote it."""
    non_expert: tuple[NonExpertWeight, ...]
    """Non-expert weights and their tier."""
    tiles: tuple[PlacedTile, ...]
    """Every tile, in store order."""
    store_bytes: int
    """Size of the tile store."""
    profile: dict[str, Any]
    """Which profile guided the plan: sha256, workloads, tokens, source, phase."""
    expected_bytes_per_token: dict[str, float]
    """Expected bytes read per token from each tier (non-expert weights included)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Schedule/runtime settings carried to the runtime (prefetch, async planning, backend)."""
    rank: int = 0
    """The rank this plan is for (0 in a single process). Tiles other ranks compute are in tier `remote`."""
    world_size: int = 1
    """Ranks sharing the model (1: a single process)."""
    replicas: tuple[tuple[int, int, int, int], ...] = ()
    """(layer, expert, replica index, replica count) of each routed expert this rank holds whole as one of
    several replicas (tokens are split among them)."""

    @cached_property
    def _replicas(self) -> dict[tuple[int, int], tuple[int, int]]:
        return {(layer, e): (i, n) for layer, e, i, n in self.replicas}

    def replica_of(self, layer: int, expert: int) -> tuple[int, int] | None:
        """(this rank's replica index i, replica count n) of a replicated routed expert: replica i computes the
        tokens at positions j of the expert's token group with (j + turn) % n == i (turn: the runtime's MoE calls
        so far, the same on every rank). None: not replicated here (this rank computes whatever ranges it holds
        for every token routed to the expert)."""
        return self._replicas.get((layer, expert))

    @cached_property
    def _by_range(self) -> dict[tuple[int, int, str, int, int], PlacedTile]:
        return {(t.layer, t.expert, t.group, t.start, t.end): t for t in self.tiles}

    @cached_property
    def _by_key(self) -> dict[str, PlacedTile]:
        return {t.key: t for t in self.tiles}

    def tile_by_key(self, key: str) -> PlacedTile:
        """The tile with stable key `key`."""
        if key not in self._by_key:
            raise PlanError(f"plan '{self.name}' has no tile '{key}'.")
        return self._by_key[key]

    def tier_of(self, layer: int, expert: int, group: str, start: int, end: int) -> str:
        """Tier of the tile (layer, expert, group, [start, end))."""
        hit = self._by_range.get((layer, expert, group, start, end))
        if hit is None:
            raise PlanError(
                f"plan '{self.name}' has no tile L{layer}:E{expert_label(expert)}:{group}:N{start}-{end}; "
                "ask resident_ranges() for the ranges it does have."
            )
        return hit.tier

    @cached_property
    def _gate_up_of(self) -> dict[tuple[int, int], list[PlacedTile]]:
        """(layer, expert) -> its gate_up tiles in store order (one pass; asked once per FFN by the runtime,
        the rank planner and the live page)."""
        out: dict[tuple[int, int], list[PlacedTile]] = {}
        for t in self.tiles:
            if t.group == "gate_up":
                out.setdefault((t.layer, t.expert), []).append(t)
        return out

    def resident_ranges(self, layer: int, expert: int) -> dict[str, list[tuple[int, int]]]:
        """Neuron ranges of one FFN per tier, adjacent ranges merged (gate_up and down agree)."""
        out: dict[str, list[tuple[int, int]]] = {}
        for t in self._gate_up_of.get((layer, expert), ()):
            ranges = out.setdefault(t.tier, [])
            if ranges and ranges[-1][1] == t.start:
                ranges[-1] = (ranges[-1][0], t.end)
            else:
                ranges.append((t.start, t.end))
        return {k: sorted(v) for k, v in sorted(out.items(), key=lambda kv: tier_info(kv[0]).rank)}

    def tiles_in(self, tier: str) -> list[PlacedTile]:
        """Tiles resident in `tier`."""
        return [t for t in self.tiles if t.tier == tier]

    def usage(self, tier: str) -> TierUsage:
        """Capacity and use of `tier`."""
        for u in self.tiers:
            if u.tier == tier:
                return u
        raise PlanError(f"plan '{self.name}' does not use tier '{tier}'.")

    @property
    def slowest_tier(self) -> str:
        """The slowest tier of the plan's budget."""
        return self.tiers[-1].tier
