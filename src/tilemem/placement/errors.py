"""Errors of the planning subsystem. Each names what was wrong and what to do about it."""

from __future__ import annotations

from tilemem.errors import BudgetError, ConfigError, TileMemError

__all__ = ["BudgetError", "PlanError", "PolicyError", "ProfileError", "TmemSyntaxError"]


class ProfileError(ConfigError):
    """A profile file is malformed, of another schema version, or recorded on another model."""


class PolicyError(ConfigError):
    """An unknown placement policy or policy option."""


class TmemSyntaxError(ConfigError):
    """A `.tmem` plan config does not parse; the message carries file, line and column."""


class PlanError(TileMemError):
    """A plan artifact is missing, corrupt (checksum mismatch) or asked for a tile it does not have."""
