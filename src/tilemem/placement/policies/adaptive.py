"""TilePO adaptive: hot experts coarse (grouped-GEMM efficiency), warm medium tiles, cold fine
tiles (admission flexibility). The mode sets the thresholds, the medium size and a cache reserve.

Heat is the ratio of an expert's routing probability to the uniform share top_k / E.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tilemem.placement.budgets import CacheReserve
from tilemem.placement.errors import PolicyError
from tilemem.placement.policies.base import PlacementProblem, Policy, PolicyResult
from tilemem.placement.policies.common import always_active, knapsack_fill
from tilemem.placement.policies.tilepo import routed_candidates


@dataclass(frozen=True)
class AdaptiveMode:
    """Granularity thresholds of one mode."""

    hot_ratio: float
    """Experts at least this hot stay whole."""
    warm_ratio: float
    """Experts at least this hot (but not hot) use medium tiles; colder ones fine tiles."""
    medium_factor: int
    """Medium tile = this many fine tiles."""
    cache_fraction: float
    """Share of the fastest tier's room (after non-expert weights) reserved as dynamic tile cache,
    when the user reserved none."""


MODES: dict[str, AdaptiveMode] = {
    # Big GEMMs and few fetches: most routed mass in whole experts.
    "throughput": AdaptiveMode(hot_ratio=1.0, warm_ratio=0.5, medium_factor=4, cache_fraction=0.0),
    "balanced": AdaptiveMode(hot_ratio=1.5, warm_ratio=0.75, medium_factor=4, cache_fraction=0.0),
    # Small fetch units bound the worst stall; a cache absorbs bursts of cold experts.
    "tail_latency": AdaptiveMode(hot_ratio=2.0, warm_ratio=1.0, medium_factor=2, cache_fraction=0.05),
}


def adaptive_mode(name: str) -> AdaptiveMode:
    """The mode called `name`."""
    if name not in MODES:
        raise PolicyError(f"unknown adaptive mode '{name}'; modes: {', '.join(MODES)}.")
    return MODES[name]


class TilepoAdaptive(Policy):
    name = "tilepo_adaptive"
    summary = "hot experts coarse, warm medium, cold fine; modes throughput, balanced, tail_latency"

    def params(self, problem: PlacementProblem) -> dict:
        return {"tile": problem.tile, "mode": problem.adaptive_mode, **asdict(adaptive_mode(problem.adaptive_mode))}

    def default_caches(self, problem: PlacementProblem) -> tuple[CacheReserve, ...]:
        mode = adaptive_mode(problem.adaptive_mode)
        fastest = problem.budgets.tiers[0]
        if not mode.cache_fraction or fastest.capacity is None:
            return ()
        # A share of the room the non-expert weights leave, so the default never makes a budget impossible.
        room = max(0, fastest.capacity - problem.topology.non_expert_bytes)
        return (CacheReserve(fastest.tier, nbytes=int(room * mode.cache_fraction)),)

    def assign(self, problem: PlacementProblem, free: dict[str, int | None]) -> PolicyResult:
        mode = adaptive_mode(problem.adaptive_mode)

        def tile_of(layer: int, e: int, p: float, ratio: float) -> int | None:
            if ratio >= mode.hot_ratio:
                return None
            return problem.tile * mode.medium_factor if ratio >= mode.warm_ratio else problem.tile

        cands = always_active(problem, None) + routed_candidates(problem, tile_of)
        return knapsack_fill(problem, free, cands)
