"""TilePO: one knapsack across all layers, over whole experts, fine tiles, or a mix.

Each candidate unit is worth P(its FFN runs for a token) x its bytes; tiers are filled fastest
first with the optimal remaining set (see `knapsack.py`), so skewed layers get more room.
"""

from __future__ import annotations

from tilemem.placement.policies.base import PlacementProblem, Policy, PolicyResult
from tilemem.placement.policies.common import (
    Candidate,
    always_active,
    frequency_ranks,
    knapsack_fill,
    probabilities,
    split,
)

HYBRID_HOT_RATIO = 1.5
"""An expert is hot when routed at least this many times as often as under uniform routing."""


def routed_candidates(problem: PlacementProblem, tile_of) -> list[Candidate]:
    """Units of every routed expert; `tile_of(layer, expert, p, ratio)` picks each expert's tile size
    (None = whole), `ratio` being p over the uniform share top_k / E."""
    out: list[Candidate] = []
    for layer, probs in probabilities(problem).items():
        lt = problem.topology.layers[layer]
        share = lt.top_k / lt.num_experts
        ranks = frequency_ranks(probs)
        for e, p in enumerate(probs):
            tile = tile_of(layer, e, p, p / share if share else 0.0)
            out.extend((u, p, ranks[e]) for u in split(problem, layer, e, tile))
    return out


class TilepoCoarse(Policy):
    name = "tilepo_coarse"
    summary = "whole experts, one knapsack across all layers"

    def assign(self, problem: PlacementProblem, free: dict[str, int | None]) -> PolicyResult:
        cands = always_active(problem, None) + routed_candidates(problem, lambda *_: None)
        return knapsack_fill(problem, free, cands)


class TilepoFine(Policy):
    name = "tilepo_fine"
    summary = "the same knapsack over fine tiles (default 128 neurons), filling budgets exactly"

    def params(self, problem: PlacementProblem) -> dict:
        return {"tile": problem.tile}

    def assign(self, problem: PlacementProblem, free: dict[str, int | None]) -> PolicyResult:
        cands = always_active(problem, problem.tile) + routed_candidates(problem, lambda *_: problem.tile)
        return knapsack_fill(problem, free, cands)


class TilepoHybrid(Policy):
    name = "tilepo_hybrid"
    summary = "hot experts whole, the rest in fine tiles"

    def params(self, problem: PlacementProblem) -> dict:
        return {"tile": problem.tile, "hot_ratio": HYBRID_HOT_RATIO}

    def assign(self, problem: PlacementProblem, free: dict[str, int | None]) -> PolicyResult:
        def tile_of(layer: int, e: int, p: float, ratio: float) -> int | None:
            return None if ratio >= HYBRID_HOT_RATIO else problem.tile

        cands = always_active(problem, None) + routed_candidates(problem, tile_of)
        return knapsack_fill(problem, free, cands)
