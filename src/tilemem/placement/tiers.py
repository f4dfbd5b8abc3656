"""Memory tiers, ordered fast to slow. A registry (not an if-chain): add a tier = add one row."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from tilemem.placement.errors import BudgetError


@dataclass(frozen=True)
class Tier:
    """One memory level."""

    name: str
    """Registry key: `cuda`, `cpu` or `disk`."""
    rank: int
    """Position in the fast-to-slow order (0 = fastest)."""
    compute: bool
    """Whether tiles resident here can be computed in place (else they are fetched first)."""


TIERS: tuple[Tier, ...] = (
    Tier("cuda", 0, True),
    Tier("cpu", 1, True),
    Tier("disk", 2, False),
)
TIER_NAMES: tuple[str, ...] = tuple(t.name for t in TIERS)


def tier(name: str) -> Tier:
    """The tier called `name`, or an error that lists the tiers (and the closest match)."""
    for t in TIERS:
        if t.name == name:
            return t
    close = difflib.get_close_matches(name, TIER_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise BudgetError(f"unknown tier '{name}'{hint}; tiers are {', '.join(TIER_NAMES)}, fastest first.")


def tier_rank(name: str) -> int:
    """0 for the fastest tier."""
    return tier(name).rank
