"""Per-tier byte budgets, from `cuda=20GiB,cpu=8GiB` (rest on disk) or an experts-per-layer count.

A budget bounds everything resident in a tier: non-expert weights, tiles and the reserved dynamic
tile cache. The slowest listed tier may be unbounded (`disk` by default, `cpu` for the
experts-per-layer form, which mirrors KTransformers' `--kt-num-gpu-experts`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tilemem.models.topology import Topology
from tilemem.placement.errors import BudgetError
from tilemem.placement.formats import TileFormat
from tilemem.placement.tiers import budget_tier, tier_rank
from tilemem.placement.tiles import always_active_ffns, ffn_unit_bytes, ffn_width, units_of
from tilemem.units import format_bytes, parse_bytes

UNBOUNDED = ("inf", "unbounded", "rest")


@dataclass(frozen=True)
class TierBudget:
    """The capacity of one tier."""

    tier: str
    """Tier name (`cuda`, `cpu`, `disk`)."""
    capacity: int | None
    """Bytes the tier may hold; None = unbounded."""


DEFAULT_CACHE_BYTES = 64 << 20
"""Tile cache size when neither the config nor a bounded DRAM budget sets one (runtime and cost model)."""
IO_DEPTH = 4
"""Tile reads in flight by default: the runtime keeps this many staging slots, even past a DRAM budget
whose room for the tile cache is smaller (so `--budget auto` keeps them out of the budget)."""


@dataclass(frozen=True)
class CacheReserve:
    """Part of a tier kept free of static placement, for the runtime's dynamic tile cache."""

    tier: str
    """Tier the cache lives in."""
    nbytes: int = 0
    """Reserved bytes (used when `fraction` is 0)."""
    fraction: float = 0.0
    """Reserved share of the tier's capacity."""

    def resolve(self, capacity: int | None) -> int:
        """Reserved bytes in a tier of `capacity` bytes."""
        if self.fraction:
            if capacity is None:
                raise BudgetError(
                    f"cache {self.tier}={self.fraction:.0%}: a percentage needs a bounded {self.tier} "
                    "budget; give the cache in bytes instead (e.g. 1GiB)."
                )
            return int(capacity * self.fraction)
        return self.nbytes


@dataclass(frozen=True)
class Budgets:
    """Tier capacities, fastest first, and optional dynamic cache reserves."""

    tiers: tuple[TierBudget, ...]
    """Tiers a plan may use, fastest first; the last may be unbounded."""
    caches: tuple[CacheReserve, ...] = ()
    """Dynamic tile cache reserves (inside the tier budgets)."""
    source: str = ""
    """How the budget was written, for reports."""
    experts_per_layer: int | None = None
    """Set when the budget came from an experts-per-layer count."""

    @classmethod
    def parse(cls, text: str, cache: str | None = None) -> Budgets:
        """`cuda=20GiB,cpu=8GiB` -> budgets with `disk` unbounded (unless given)."""
        if not text or not text.strip():
            raise BudgetError("empty budget; write tier=size pairs, e.g. --budget cuda=20GiB,cpu=8GiB.")
        seen: dict[str, int | None] = {}
        for part in text.split(","):
            if "=" not in part:
                raise BudgetError(
                    f"budget entry '{part.strip()}' has no '='; write tier=size pairs such as cuda=20GiB."
                )
            name, value = (s.strip() for s in part.split("=", 1))
            budget_tier(name)
            if name in seen:
                raise BudgetError(f"tier '{name}' appears twice in budget '{text}'; give it once.")
            unbounded = value.lower() in UNBOUNDED
            seen[name] = None if unbounded else parse_bytes(value, f"budget of tier '{name}'")
        seen.setdefault("disk", None)
        tiers = tuple(TierBudget(n, seen[n]) for n in sorted(seen, key=tier_rank))
        budgets = cls(tiers, source=text.strip())
        return budgets.with_cache(cache) if cache else budgets

    @classmethod
    def from_experts_per_layer(
        cls,
        topology: Topology,
        k: int,
        fmt: TileFormat,
        fast: str = "cuda",
        slow: str = "cpu",
        shard_count: int = 1,
    ) -> Budgets:
        """Room in `fast` for the non-expert weights, shared/dense FFNs and k routed experts per MoE layer."""
        budget_tier(fast)
        budget_tier(slow)
        if tier_rank(fast) >= tier_rank(slow):
            raise BudgetError(f"fast tier '{fast}' must be faster than slow tier '{slow}'.")
        moe = [lt for lt in topology.layers if lt.is_moe]
        if k < 0:
            raise BudgetError(f"experts per layer must be >= 0, got {k}.")
        for lt in moe:
            if k > lt.num_experts:
                raise BudgetError(
                    f"--experts-per-layer {k} exceeds the {lt.num_experts} experts of layer {lt.index}; "
                    f"use at most {lt.num_experts}."
                )
        capacity = topology.non_expert_bytes + sum(
            whole_ffn_bytes(topology, layer, e, fmt, shard_count) for layer, e in always_active_ffns(topology)
        )
        capacity += sum(k * whole_ffn_bytes(topology, lt.index, 0, fmt, shard_count) for lt in moe)
        return cls(
            (TierBudget(fast, capacity), TierBudget(slow, None)),
            source=f"experts_per_layer={k}",
            experts_per_layer=k,
        )

    def with_cache(self, text: str) -> Budgets:
        """Add dynamic cache reserves written `cuda=10%,cpu=1GiB`."""
        caches = []
        for part in text.split(","):
            if "=" not in part:
                raise BudgetError(f"cache entry '{part.strip()}' has no '='; write e.g. --cache cuda=10%.")
            name, value = (s.strip() for s in part.split("=", 1))
            if name not in self.names:
                raise BudgetError(
                    f"cache tier '{name}' is not in the budget ({', '.join(self.names)}); "
                    "reserve cache only in a budgeted tier."
                )
            if value.endswith("%"):
                try:
                    frac = float(value[:-1]) / 100
                except ValueError:
                    raise BudgetError(f"cache {name}={value}: not a percentage.") from None
                if not 0 <= frac < 1:
                    raise BudgetError(f"cache {name}={value}: a percentage must be in [0, 100).")
                caches.append(CacheReserve(name, fraction=frac))
            else:
                caches.append(CacheReserve(name, nbytes=parse_bytes(value, f"cache of tier '{name}'")))
        return Budgets(self.tiers, tuple(caches), self.source, self.experts_per_layer)

    @property
    def names(self) -> tuple[str, ...]:
        """Tier names, fastest first."""
        return tuple(t.tier for t in self.tiers)

    def capacity(self, name: str) -> int | None:
        """Capacity of tier `name` (None = unbounded)."""
        for t in self.tiers:
            if t.tier == name:
                return t.capacity
        raise BudgetError(f"tier '{name}' is not in this budget ({', '.join(self.names)}).")

    def cache_bytes(self, name: str) -> int:
        """Bytes reserved for the dynamic tile cache in tier `name`."""
        return sum(c.resolve(self.capacity(name)) for c in self.caches if c.tier == name)

    def describe(self) -> str:
        """`cuda=1.50 GiB, cpu=unbounded`."""
        return ", ".join(
            f"{t.tier}={'unbounded' if t.capacity is None else format_bytes(t.capacity)}" for t in self.tiers
        )


def whole_ffn_bytes(topology: Topology, layer: int, expert: int, fmt: TileFormat, shard_count: int = 1) -> int:
    """Bytes of one whole FFN (one unit per shard), in `fmt` (a GGUF model's: its own quant types)."""
    units = units_of(topology, layer, expert, ffn_width(topology, layer, expert), shard_count)
    return sum(ffn_unit_bytes(topology, layer, expert, u.neurons, fmt) for u in units)
