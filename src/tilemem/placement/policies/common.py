"""Building blocks shared by the policies: probabilities, candidate units, tier filling."""

from __future__ import annotations

from tilemem.placement.errors import BudgetError
from tilemem.placement.knapsack import Item, solve
from tilemem.placement.policies.base import Assignment, PlacementProblem, PolicyResult
from tilemem.placement.tiles import Unit, always_active_ffns, ffn_unit_bytes, ffn_width, units_of
from tilemem.units import format_bytes

Candidate = tuple[Unit, float, int]
"""(unit, probability its FFN runs for a token, tie-break rank: -1 always-active, else frequency rank)."""


def probabilities(problem: PlacementProblem) -> dict[int, list[float]]:
    """P(expert routed for a token) per MoE layer."""
    return {
        lt.index: problem.profile.probabilities(lt.index, problem.phase) for lt in problem.topology.layers if lt.is_moe
    }


def frequency_ranks(probs: list[float]) -> list[int]:
    """Rank of each expert by probability (0 = most frequent); ties go to the lower expert index."""
    order = sorted(range(len(probs)), key=lambda e: (-probs[e], e))
    ranks = [0] * len(probs)
    for r, e in enumerate(order):
        ranks[e] = r
    return ranks


def size_of(problem: PlacementProblem, unit: Unit) -> int:
    """Bytes of a unit in the problem's format (a GGUF model's: its FFN's own quant types)."""
    return ffn_unit_bytes(problem.topology, unit.layer, unit.expert, unit.neurons, problem.fmt)


def split(problem: PlacementProblem, layer: int, expert: int, tile: int | None) -> list[Unit]:
    """Units of one FFN with `tile` neurons each (None: the whole FFN, one unit per shard), clipped to the
    ranges the problem owns (a rank of a multi-rank plan; empty when other ranks compute the FFN)."""
    size = tile if tile else ffn_width(problem.topology, layer, expert)
    units = units_of(problem.topology, layer, expert, size, problem.shard_count)
    if problem.owned is None:
        return units
    ranges = problem.owned.get((layer, expert), ())
    return [
        Unit(layer, expert, u.shard, max(u.start, a), min(u.end, b))
        for u in units
        for a, b in ranges
        if max(u.start, a) < min(u.end, b)
    ]


def always_active(problem: PlacementProblem, tile: int | None) -> list[Candidate]:
    """Shared-expert and dense-FFN units (probability 1)."""
    return [(u, 1.0, -1) for layer, e in always_active_ffns(problem.topology) for u in split(problem, layer, e, tile)]


def knapsack_fill(problem: PlacementProblem, free: dict[str, int | None], cands: list[Candidate]) -> PolicyResult:
    """Fill tiers fastest first, each with the knapsack-optimal remaining candidates."""
    remaining = sorted(cands, key=lambda c: (c[2], c[0]))
    out: Assignment = {}
    exact = True
    for tier, room in free.items():
        if not remaining:
            break
        items = [Item(p * size_of(problem, u), size_of(problem, u), (r, u)) for u, p, r in remaining]
        sol = solve(items, room)
        exact = exact and sol.exact
        chosen = set(sol.chosen)
        out.update((remaining[i][0], tier) for i in chosen)
        remaining = [c for i, c in enumerate(remaining) if i not in chosen]
    check_all_placed(problem, [u for u, _, _ in remaining], free)
    return PolicyResult(out, {"solver": "exact" if exact else "greedy"})


def first_fit(
    problem: PlacementProblem, space: dict[str, int | None], units: list[Unit], out: Assignment
) -> list[Unit]:
    """Place each unit in the fastest tier with room (updating `space`); return those that fit nowhere."""
    left = []
    for u in units:
        n = size_of(problem, u)
        for tier, room in space.items():
            if room is None or room >= n:
                out[u] = tier
                if room is not None:
                    space[tier] = room - n
                break
        else:
            left.append(u)
    return left


def check_all_placed(problem: PlacementProblem, left: list[Unit], free: dict[str, int | None]) -> None:
    """Raise a BudgetError naming the shortfall when some units fit in no tier."""
    if not left:
        return
    missing = sum(size_of(problem, u) for u in left)
    raise BudgetError(
        f"the tiers cannot hold the model: {format_bytes(missing)} of expert tiles do not fit in "
        f"{problem.budgets.describe()}; raise a budget or leave the slowest tier unbounded "
        "(omit disk from --budget)."
    )
