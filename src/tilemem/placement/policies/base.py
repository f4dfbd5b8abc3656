"""What every placement policy receives and returns.

A policy maps a PlacementProblem and the free bytes of each tier (after the non-expert weights and
cache reserves) to a tier for every unit (neuron range of an FFN, both projection groups). It is
pure Python: no tensors, deterministic for equal inputs.

Objective (TilePO policies): maximize the expected bytes per token served from faster tiers,
lexicographically fastest first: sum over units in tier t of P(unit's FFN runs for a token) x unit
bytes, where P is the routing probability from the profile (1 for shared experts and dense FFNs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from tilemem.models.topology import Topology
from tilemem.placement.budgets import Budgets, CacheReserve
from tilemem.placement.formats import TileFormat
from tilemem.placement.profile import Profile
from tilemem.placement.tiles import Unit

Assignment = dict[Unit, str]
"""Tier name of every unit."""
OwnedRanges = Mapping[tuple[int, int], tuple[tuple[int, int], ...]]
"""(layer, expert) -> the sorted, disjoint neuron ranges [a, b) of that FFN one rank computes."""


@dataclass(frozen=True)
class PolicyResult:
    """A policy's answer."""

    assignment: Assignment
    """Tier of every unit."""
    notes: dict
    """How it was found (e.g. `solver: exact`), recorded in the MIR."""


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a policy may look at."""

    topology: Topology
    """Model structure and byte sizes."""
    profile: Profile
    """Routing statistics (a uniform prior when none was measured)."""
    budgets: Budgets
    """Tier capacities, fastest first."""
    fmt: TileFormat
    """Tile storage format (sets the bytes of every unit)."""
    tile: int = 128
    """Fine tile size in neurons."""
    shard_count: int = 1
    """Tensor-parallel shards of the intermediate dimension (tiles never cross a shard cut)."""
    phase: str = "all"
    """Which routing counts give the probabilities: `all`, `prefill` or `decode`."""
    adaptive_mode: str = "balanced"
    """Mode of `tilepo_adaptive`: `throughput`, `balanced` or `tail_latency`."""
    owned: OwnedRanges | None = None
    """Multi-rank plans: the neuron ranges this rank computes (FFNs absent: other ranks'); policies place only
    these. None: every FFN whole (a single-process plan)."""


class Policy(ABC):
    """Turns a placement problem into a tier for every unit."""

    name: ClassVar[str]
    """Registry key (`--policy`)."""
    summary: ClassVar[str]
    """One line for `--help` and docs."""

    def default_caches(self, problem: PlacementProblem) -> tuple[CacheReserve, ...]:
        """Cache reserves this policy wants when the user gave none."""
        return ()

    def params(self, problem: PlacementProblem) -> dict:
        """Policy settings recorded in the MIR."""
        return {}

    @abstractmethod
    def assign(self, problem: PlacementProblem, free: dict[str, int | None]) -> PolicyResult:
        """A tier for every unit of every FFN; never more than `free[tier]` bytes (None: unbounded)."""
