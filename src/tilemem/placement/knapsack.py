"""0/1 knapsack over tiles: choose items of total size <= capacity maximizing total value.

Items of equal size are interchangeable except for value, so an optimal choice takes a prefix of
each size class sorted by value (exchange argument). Tile sets have few size classes (full tiles,
plus the shorter last tiles of each FFN width), so we enumerate how many items to take from every
class but the largest and fill the largest greedily: exact, and fast while the enumeration stays
under `limit` combinations. Beyond that we fall back to greedy by value density (reported).
Ties: larger value, then more bytes used (fill the budget), then items that come first by their
`order` keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from math import prod

EXACT_LIMIT = 200_000
"""Most combinations of class counts enumerated before falling back to greedy."""


@dataclass(frozen=True)
class Item:
    """One candidate: a tile (or whole expert) with its expected bytes served per token."""

    value: float
    """Objective gain if chosen (routing probability x bytes)."""
    size: int
    """Bytes it occupies."""
    order: tuple
    """Deterministic tie-break key; smaller comes first."""


@dataclass(frozen=True)
class Solution:
    """Indices of the chosen items and how they were found."""

    chosen: tuple[int, ...]
    """Indices into the item list, ascending."""
    value: float
    """Total value of the chosen items."""
    size: int
    """Total size of the chosen items."""
    exact: bool
    """Whether the solution is provably optimal (else greedy)."""


def _better(value: float, size: int, tie: tuple, best: tuple) -> bool:
    best_value, best_size, best_tie = best[:3]
    tol = 1e-12 * max(1.0, abs(best_value))
    if value > best_value + tol:
        return True
    if value < best_value - tol:
        return False
    return (size, tie) > (best_size, best_tie)


def solve(items: Sequence[Item], capacity: int | None, limit: int = EXACT_LIMIT) -> Solution:
    """An optimal (or, past `limit`, greedy) choice of items within `capacity` (None: take all)."""
    if capacity is None:
        idx = tuple(range(len(items)))
        return Solution(idx, sum(i.value for i in items), sum(i.size for i in items), True)
    free = [i for i, item in enumerate(items) if item.size <= 0]  # zero-size items cost nothing
    classes: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        if item.size > 0:
            classes.setdefault(item.size, []).append(i)
    groups = [
        sorted(members, key=lambda i: (-items[i].value, items[i].order)) for _, members in sorted(classes.items())
    ]
    if not groups:
        return Solution(tuple(free), sum(items[i].value for i in free), 0, True)
    bulk = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
    others = [g for g in range(len(groups)) if g != bulk]
    if prod(len(groups[g]) + 1 for g in others) > limit:
        return greedy(items, capacity)  # zero-size items have infinite density: taken first
    sizes = [items[g[0]].size for g in groups]
    prefix = [[0.0, *accumulate(items[i].value for i in g)] for g in groups]
    # Equal value and size: prefer more items from the class whose best item comes first in `order`.
    priority = sorted(range(len(groups)), key=lambda g: items[groups[g][0]].order)
    slot = {g: i for i, g in enumerate([*others, bulk])}
    best: tuple = (-1.0, -1, (), ())

    def visit(pos: int, used: int, value: float, counts: tuple[int, ...]) -> None:
        nonlocal best
        if pos == len(others):
            room = capacity - used
            n0 = min(len(groups[bulk]), room // sizes[bulk])
            total = value + prefix[bulk][n0]
            size = used + n0 * sizes[bulk]
            full = (*counts, n0)
            tie = tuple(full[slot[g]] for g in priority)
            if _better(total, size, tie, best):
                best = (total, size, tie, full)
            return
        g = others[pos]
        for n in range(len(groups[g]) + 1):
            add = n * sizes[g]
            if used + add > capacity:
                break
            visit(pos + 1, used + add, value + prefix[g][n], (*counts, n))

    visit(0, 0, 0.0, ())
    value, size, _, counts = best
    chosen: list[int] = list(free)
    value += sum(items[i].value for i in free)
    for g, n in zip([*others, bulk], counts, strict=True):
        chosen.extend(groups[g][:n])
    return Solution(tuple(sorted(chosen)), value, size, True)


def greedy(items: Sequence[Item], capacity: int) -> Solution:
    """Take items by value density (then order) while they fit; skip those that do not."""
    ranked = sorted(range(len(items)), key=lambda i: (-_density(items[i]), items[i].order))
    chosen, used, value = [], 0, 0.0
    for i in ranked:
        if used + items[i].size <= capacity:
            chosen.append(i)
            used += items[i].size
            value += items[i].value
    return Solution(tuple(sorted(chosen)), value, used, False)


def _density(item: Item) -> float:
    return item.value / item.size if item.size else float("inf")
