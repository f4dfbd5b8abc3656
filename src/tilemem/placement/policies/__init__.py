"""Placement policies, by name. Adding a policy = one class + one line in `_policies`."""

from __future__ import annotations

from tilemem.placement.errors import PolicyError
from tilemem.placement.policies.base import PlacementProblem, Policy, PolicyResult


def _policies() -> dict[str, type[Policy]]:
    from tilemem.placement.policies.adaptive import TilepoAdaptive
    from tilemem.placement.policies.baselines import KtExpert, Uniform
    from tilemem.placement.policies.tilepo import TilepoCoarse, TilepoFine, TilepoHybrid

    classes = [Uniform, KtExpert, TilepoCoarse, TilepoFine, TilepoHybrid, TilepoAdaptive]
    return {c.name: c for c in classes}


def policy_names() -> list[str]:
    """Every registered policy name.

    >>> policy_names()
    ['uniform', 'kt_expert', 'tilepo_coarse', 'tilepo_fine', 'tilepo_hybrid', 'tilepo_adaptive']
    """
    return list(_policies())


def create_policy(name: str) -> Policy:
    """A new policy instance, or an error listing the known names."""
    policies = _policies()
    if name not in policies:
        raise PolicyError(f"unknown policy '{name}'; policies: {', '.join(policies)}.")
    return policies[name]()


__all__ = ["PlacementProblem", "Policy", "PolicyResult", "create_policy", "policy_names"]
