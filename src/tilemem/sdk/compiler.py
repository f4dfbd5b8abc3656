"""Compile a ModelSpec (from the SDK, a JSON model spec or a `.tmem` file) into a Plan.

Budget precedence: an experts-per-layer budget (`model.expert_budget` or `memory.experts_per_layer`)
sets the cuda tier; `memory.cuda` / `memory.cpu` / `memory.disk` set the others (cuda only when no
expert budget is given). The slowest tier is unbounded unless given: disk for byte budgets, cpu
for a pure expert budget. With no budget at all, cuda holds top_k experts per layer. Without a
profile, routing is assumed uniform.
"""

from __future__ import annotations

from pathlib import Path

from tilemem.models.topology import Topology
from tilemem.placement.budgets import Budgets, TierBudget
from tilemem.placement.formats import TileFormat, tile_format
from tilemem.placement.plan import Plan
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem
from tilemem.placement.profile import Profile
from tilemem.sdk.model_spec import ModelSpec

DEFAULT_POLICY = "tilepo_fine"
DEFAULT_TILE = 128


def spec_format(spec: ModelSpec, topology: Topology) -> TileFormat:
    """The tile format: precision.format, else the dtype."""
    return tile_format(spec.setting("precision", "format") or topology.dtype)


def spec_budgets(spec: ModelSpec, topology: Topology, fmt: TileFormat) -> Budgets:
    """Tier budgets of a spec (see the module docstring for precedence)."""
    mem = spec.blocks.get("memory", {})
    shards = spec.setting("tile", "shard_count", 1)
    given = {t: mem[t] for t in ("cuda", "cpu", "disk") if t in mem}
    expert_budget = spec.expert_budget
    if expert_budget is None and not given:
        expert_budget = spec.top_k  # no budget at all: one token's worth of experts on the GPU
    if expert_budget is not None:
        base = Budgets.from_experts_per_layer(topology, expert_budget, fmt, shard_count=shards)
        if "cpu" in given:  # bounded cpu: the rest goes to disk
            tiers = (base.tiers[0], TierBudget("cpu", given["cpu"]), TierBudget("disk", given.get("disk")))
        else:
            tiers = base.tiers
        source = base.source if spec.expert_budget is not None else f"{base.source} (default: top_k)"
        budgets = Budgets(tiers, source=source, experts_per_layer=expert_budget)
    else:
        budgets = Budgets.parse(",".join(f"{t}={b}" for t, b in given.items()))
    cache = mem.get("cache")
    return budgets.with_cache(cache) if cache else budgets


def spec_profile(spec: ModelSpec, topology: Topology, profile: Profile | None) -> Profile:
    """The profile to plan with: an explicit one, workload.profile, or uniform routing."""
    path = spec.setting("workload", "profile")
    if profile is None and path:
        profile = Profile.load(Path(path), topology)
    if profile is None:
        return Profile.uniform(topology)
    profile.check_matches(topology)
    return profile


def compile_spec(spec: ModelSpec, profile: Profile | None = None, policy: str | None = None) -> Plan:
    """The Plan of `spec`, with `profile` (else workload.profile, else uniform) and `policy` (else schedule.policy)."""
    topology = spec.topology()
    fmt = spec_format(spec, topology)
    problem = PlacementProblem(
        topology=topology,
        profile=spec_profile(spec, topology, profile),
        budgets=spec_budgets(spec, topology, fmt),
        fmt=fmt,
        tile=spec.setting("tile", "intermediate_tile", DEFAULT_TILE),
        shard_count=spec.setting("tile", "shard_count", 1),
        phase=spec.setting("schedule", "phase", "all"),
        adaptive_mode=spec.setting("schedule", "adaptive_mode", "balanced"),
    )
    settings = {
        "workload": spec.setting("workload", "name", "mixed"),
        "async_planning": spec.setting("schedule", "async_planning", False),
        "prefetch": spec.setting("runtime", "prefetch", True),
        "backend": spec.setting("runtime", "backend"),
        "hidden_tile": spec.setting("tile", "hidden_tile", 0),
    }
    return build_plan(problem, policy or spec.setting("schedule", "policy", DEFAULT_POLICY), spec.name, settings)
