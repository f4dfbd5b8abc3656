"""Planner: topology + profile + budgets + policy -> Plan.

Order of business: non-expert weights into the fastest tier (an error saying how much is missing
when they do not fit), dynamic cache reserves, then the policy places every tile unit in the room
left, then the store layout and the objective are computed and every budget is re-checked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tilemem.placement.errors import BudgetError, PlanError
from tilemem.placement.objective import expected_bytes_per_token
from tilemem.placement.plan import NonExpertWeight, PlacedTile, Plan, TierUsage
from tilemem.placement.policies import PlacementProblem, Policy, create_policy
from tilemem.placement.store_layout import layout, store_order
from tilemem.placement.tiers import REMOTE, tier
from tilemem.placement.tiles import GROUPS, always_active_ffns, ffn_width, routed_ffns, split_ranges
from tilemem.units import format_bytes


def build_plan(
    problem: PlacementProblem, policy_name: str, name: str = "", settings: dict[str, Any] | None = None
) -> Plan:
    """Place `problem` with the policy called `policy_name`."""
    policy, problem, free = prepare(problem, policy_name)
    result = policy.assign(problem, free)
    return assemble(problem, policy_name, {**policy.params(problem), **result.notes}, result.assignment, name, settings)


def prepare(problem: PlacementProblem, policy_name: str) -> tuple[Policy, PlacementProblem, dict[str, int | None]]:
    """(the policy, the problem with its default cache reserves, the free bytes of every tier after the
    non-expert weights and caches), or a BudgetError saying what does not fit."""
    if problem.tile < 1:
        raise BudgetError(f"tile size must be >= 1 neuron, got {problem.tile}.")
    if problem.shard_count < 1:
        raise BudgetError(f"shard count must be >= 1, got {problem.shard_count}.")
    policy = create_policy(policy_name)
    policy.params(problem)  # validates policy options (e.g. the adaptive mode) before any work
    budgets = problem.budgets
    if not budgets.caches and policy.default_caches(problem):
        budgets = replace(budgets, caches=policy.default_caches(problem))
        problem = replace(problem, budgets=budgets)
    topo = problem.topology
    fastest = budgets.tiers[0]
    if not tier(fastest.tier).compute:
        raise BudgetError(
            f"the fastest tier in the budget is '{fastest.tier}', which cannot compute; give a cuda or cpu "
            "budget for the non-expert weights, e.g. --budget cpu=8GiB."
        )
    free: dict[str, int | None] = {}
    for tb in budgets.tiers:
        if tb.capacity is None:
            free[tb.tier] = None
            continue
        fixed = topo.non_expert_bytes if tb is fastest else 0
        cache = budgets.cache_bytes(tb.tier)
        if fixed > tb.capacity:
            missing = fixed - tb.capacity
            raise BudgetError(
                "impossible budget: the non-expert weights (attention, norms, routers, embeddings, LM head) "
                f"need {format_bytes(fixed)} in the fastest tier '{tb.tier}', but its budget is "
                f"{format_bytes(tb.capacity)}: {format_bytes(missing)} ({missing} bytes) missing; raise "
                f"{tb.tier} to at least {format_bytes(fixed)}."
            )
        if fixed + cache > tb.capacity:
            raise BudgetError(
                f"the cache reserve of tier '{tb.tier}' ({format_bytes(cache)}) does not fit in what its "
                f"budget leaves ({format_bytes(tb.capacity - fixed)}); reserve less."
            )
        free[tb.tier] = tb.capacity - fixed - cache
    return policy, problem, free


def assemble(
    problem: PlacementProblem,
    policy_name: str,
    params: dict[str, Any],
    assignment: dict,
    name: str,
    settings: dict[str, Any] | None,
) -> Plan:
    """Lay out the store, compute usage and the objective, and check coverage and budgets."""
    topo, budgets = problem.topology, problem.budgets
    _check_coverage(problem, assignment)
    entries, store_bytes = layout(list(assignment), topo.hidden_size, problem.fmt, topo)
    tiles = []
    for unit in sorted(assignment, key=store_order):
        for g in GROUPS:
            e = entries[(unit, g)]
            tiles.append(
                PlacedTile(
                    unit.key(g),
                    unit.layer,
                    unit.expert,
                    g,
                    unit.shard,
                    unit.start,
                    unit.end,
                    assignment[unit],
                    e.offset,
                    e.nbytes,
                    e.scale_offset,
                    e.scale_bytes,
                )  # fmt: skip
            )
    fastest = budgets.tiers[0].tier
    non_expert = tuple(NonExpertWeight(n, b, fastest) for n, b in topo.non_expert)
    usage = []
    for tb in budgets.tiers:
        tile_bytes = sum(t.total_bytes for t in tiles if t.tier == tb.tier)
        u = TierUsage(
            tb.tier,
            tb.capacity,
            budgets.cache_bytes(tb.tier),
            topo.non_expert_bytes if tb.tier == fastest else 0,
            tile_bytes,
        )
        if u.capacity is not None and u.used > u.capacity:
            raise PlanError(
                f"internal error: policy '{policy_name}' put {format_bytes(u.used)} in tier '{u.tier}' whose "
                f"budget is {format_bytes(u.capacity)}; please report this."
            )
        usage.append(u)
    profile = problem.profile
    return Plan(
        name=name or topo.family,
        topology=topo,
        fmt=problem.fmt,
        tile=problem.tile,
        shard_count=problem.shard_count,
        policy=policy_name,
        policy_params=params,
        tiers=tuple(usage),
        budget_source=budgets.source,
        non_expert=non_expert,
        tiles=tuple(tiles),
        store_bytes=store_bytes,
        profile={
            "sha256": profile.digest(),
            "workloads": list(profile.workloads),
            "source": profile.source,
            "tokens": profile.total_tokens,
            "phase": problem.phase,
        },
        expected_bytes_per_token=expected_bytes_per_token(
            [t for t in tiles if t.tier != REMOTE], non_expert, profile, budgets.names, problem.phase
        ),
        settings=dict(settings or {}),
    )


def _check_coverage(problem: PlacementProblem, assignment: dict) -> None:
    """Every FFN's neurons covered exactly once, within shard cuts (a policy bug otherwise)."""
    topo = problem.topology
    by_ffn: dict[tuple[int, int], list] = {}
    for u in assignment:
        by_ffn.setdefault(u.ffn, []).append(u)
    expected = set(always_active_ffns(topo)) | set(routed_ffns(topo))
    if set(by_ffn) != expected:
        raise PlanError("internal error: the policy left FFNs unplaced or invented some; please report this.")
    for ffn, units in by_ffn.items():
        width = ffn_width(topo, *ffn)
        shards = {s: (a, b) for s, a, b in split_ranges(width, width, problem.shard_count)}
        pos = 0
        for u in sorted(units, key=lambda u: u.start):
            lo, hi = shards[u.shard]
            if u.start != pos or not lo <= u.start < u.end <= hi:
                raise PlanError(f"internal error: tiles of {ffn} do not cover [0, {width}) exactly once.")
            pos = u.end
        if pos != width:
            raise PlanError(f"internal error: tiles of {ffn} stop at neuron {pos} of {width}.")
