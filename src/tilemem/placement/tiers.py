"""Memory tiers, ordered fast to slow. A registry (not an if-chain): add a tier = add one row."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from tilemem.placement.errors import BudgetError


@dataclass(frozen=True)
class Tier:
    """One memory level."""

    name: str
    """Registry key: `cuda`, `cpu`, `disk`, or the pseudo-tier `remote`."""
    rank: int
    """Position in the fast-to-slow order (0 = fastest)."""
    compute: bool
    """Whether tiles resident here can be computed in place (else they are fetched first)."""


REMOTE = "remote"
"""Pseudo-tier of a rank plan's tiles that another rank computes: in no budget, never computed here."""
TIERS: tuple[Tier, ...] = (
    Tier("cuda", 0, True),
    Tier("cpu", 1, True),
    Tier("disk", 2, False),
    Tier(REMOTE, 3, False),
)
TIER_NAMES: tuple[str, ...] = tuple(t.name for t in TIERS if t.name != REMOTE)
"""Tiers a budget may name, fastest first."""


def tier(name: str) -> Tier:
    """The tier called `name`, or an error that lists the tiers (and the closest match)."""
    for t in TIERS:
        if t.name == name:
            return t
    close = difflib.get_close_matches(name, TIER_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise BudgetError(f"unknown tier '{name}'{hint}; tiers are {', '.join(TIER_NAMES)}, fastest first.")


def budget_tier(name: str) -> Tier:
    """The tier called `name`, refusing the pseudo-tier `remote` (a budget names only real memory)."""
    if name == REMOTE:
        raise BudgetError(
            f"'{REMOTE}' is not a memory tier a budget can name: it marks the tiles other ranks compute in a "
            f"multi-rank plan; budget {', '.join(TIER_NAMES)} instead (each rank's own memory)."
        )
    return tier(name)


def tier_rank(name: str) -> int:
    """0 for the fastest tier."""
    return tier(name).rank
