"""Placement across ranks: one complete Plan per rank of an expert-parallel run.

`build_rank_plans(problems, policy)` takes one PlacementProblem per rank (the same model, profile,
format and tile; each rank its own budgets), splits the MoE FFNs among the ranks (`rank_partition`:
whole experts or tile ranges, hot experts possibly replicated), then lets the policy place each rank's
share in that rank's tiers within its budgets, as a single process would. Every rank's plan lists every
tile of the model on the same tile grid (the same keys and store offsets on every rank, since every node
keeps the whole tile store): the tiles it computes in its own tiers, the others in the pseudo-tier
`remote`. Dense FFNs are computed whole on every rank. `balance(plans, profile)` measures the result.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from tilemem.models.topology import DENSE
from tilemem.placement.errors import BudgetError, PlanError, PolicyError
from tilemem.placement.plan import Plan
from tilemem.placement.planner import assemble, build_plan, prepare
from tilemem.placement.policies import PlacementProblem
from tilemem.placement.profile import Profile
from tilemem.placement.rank_partition import SPLITS, partition
from tilemem.placement.tiers import REMOTE, tier
from tilemem.placement.tiles import Unit, always_active_ffns, ffn_unit_bytes, routed_ffns, units_of

__all__ = ["SPLITS", "balance", "build_rank_plans"]
T = TypeVar("T")


def build_rank_plans(
    problems: list[PlacementProblem],
    policy_name: str,
    name: str = "",
    split: str = "tile",
    replicate: bool = True,
    settings: dict[str, Any] | None = None,
) -> list[Plan]:
    """One plan per rank: `plans[r]` places rank r's share of the model in `problems[r]`'s budgets (tiles other
    ranks compute in tier `remote`). `split`: `expert` (whole routed experts per rank) or `tile` (hot experts
    also split by tile ranges); `replicate`: hot experts may be held whole by several ranks with room to
    spare. One problem gives exactly `build_plan(problems[0], policy_name, name)`."""
    if not problems:
        raise BudgetError("world size must be at least 1 (one placement problem per rank); got none.")
    if split not in SPLITS:
        raise PolicyError(f"unknown rank split '{split}'; use one of {', '.join(SPLITS)}.")
    if len(problems) == 1:
        return [build_plan(problems[0], policy_name, name, settings)]
    _check_same_model(problems)
    prepared = [_for_rank(r, prepare, p, policy_name) for r, p in enumerate(problems)]
    quotas = [_quota(problem, free) for _, problem, free in prepared]
    shares = partition(prepared[0][1], quotas, split, replicate)
    world = len(problems)
    plans = []
    for r, (policy, problem, free) in enumerate(prepared):
        mine = replace(problem, owned=shares.owned[r])
        result = _for_rank(r, policy.assign, mine, free)
        assignment = _on_grid(mine, result.assignment)
        params = {**policy.params(mine), **result.notes, "ranks": {"rank": r, "world_size": world, **shares.notes}}
        plan = assemble(mine, policy_name, params, assignment, name, settings)
        plans.append(replace(plan, rank=r, world_size=world, replicas=shares.replicas[r]))
    report = balance(plans, problems[0].profile)
    summary = {k: report[k] for k in ("max_over_mean", "worst_layer", "bytes_per_rank")}
    for p in plans:
        p.policy_params["ranks"].update(summary)  # each plan's own params dict, built above
    return plans


def balance(plans: list[Plan], profile: Profile) -> dict[str, Any]:
    """How evenly `plans` (one per rank) share the expected work. Per MoE layer, max rank load over mean rank
    load (1.0 = perfect; the step waits for the slowest rank in every layer); `max_over_mean`: their mean
    weighted by each layer's load; `worst_layer`: the largest; `bytes_per_rank`: FFN tile bytes each rank
    computes; `load_per_rank`: expected FFN bytes each rank reads per token. A share's load is P(routed) x
    its bytes (1 x bytes for shared experts), a replica's the expert's over its replica count."""
    if not plans:
        raise PlanError("balance() needs at least one plan.")
    phase = str(plans[0].profile.get("phase", "all"))
    probs = {layer: profile.probabilities(layer, phase) for layer in profile.model.moe_layers}
    moe = [lt.index for lt in plans[0].topology.layers if lt.is_moe]
    loads = {layer: [0.0] * len(plans) for layer in moe}
    nbytes = [0] * len(plans)
    for r, plan in enumerate(plans):
        for t in plan.tiles:
            if t.tier == REMOTE:
                continue
            nbytes[r] += t.total_bytes
            if t.layer not in loads or t.expert == DENSE:
                continue
            rep = plan.replica_of(t.layer, t.expert)
            p = 1.0 if t.expert < 0 else probs[t.layer][t.expert]
            loads[t.layer][r] += p * t.total_bytes / (rep[1] if rep else 1)
    ratios, weights = {}, {}
    for layer, per_rank in loads.items():
        mean = sum(per_rank) / len(per_rank)
        ratios[layer] = max(per_rank) / mean if mean > 0 else 1.0
        weights[layer] = sum(per_rank)
    total = sum(weights.values())
    weighted = sum(ratios[k] * weights[k] for k in ratios) / total if total > 0 else 1.0
    return {
        "world_size": len(plans),
        "layers": {layer: round(v, 6) for layer, v in ratios.items()},
        "max_over_mean": round(weighted, 6),
        "worst_layer": round(max(ratios.values(), default=1.0), 6),
        "bytes_per_rank": nbytes,
        "load_per_rank": [round(sum(loads[layer][r] for layer in loads), 3) for r in range(len(plans))],
    }


def _for_rank(rank: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, a budget error naming the rank whose budget it is about."""
    try:
        return fn(*args)
    except BudgetError as exc:
        raise BudgetError(f"rank {rank}: {exc}") from None


def _check_same_model(problems: list[PlacementProblem]) -> None:
    """Every rank plans the same model, profile, format and tiling (only the budgets differ)."""
    first = problems[0]
    for r, p in enumerate(problems[1:], start=1):
        for what in ("topology", "profile", "fmt", "tile", "shard_count", "phase", "adaptive_mode"):
            if getattr(p, what) != getattr(first, what):
                raise PlanError(
                    f"rank {r}'s placement problem has another {what} than rank 0's; every rank must plan the "
                    "same model, profile, format and tile size (only the budgets may differ)."
                )
        if p.owned is not None:
            raise PlanError(f"rank {r}'s placement problem already restricts its FFNs (owned); pass whole problems.")


def _quota(problem: PlacementProblem, free: dict[str, int | None]) -> int | None:
    """A rank's room for routed and shared experts in its compute tiers (after its non-expert weights, caches
    and dense FFNs, which every rank holds); None when a compute tier is unbounded."""
    room = 0
    for name, value in free.items():
        if tier(name).compute:
            if value is None:
                return None
            room += value
    topo = problem.topology
    dense = sum(
        ffn_unit_bytes(topo, layer, e, u.neurons, problem.fmt)
        for layer, e in always_active_ffns(topo)
        if e == DENSE
        for u in units_of(topo, layer, e, problem.tile, problem.shard_count)
    )
    return max(0, room - dense)


def _on_grid(problem: PlacementProblem, local: dict[Unit, str]) -> dict[Unit, str]:
    """Every tile-grid unit of the model with its tier on this rank: the tier of the policy's unit holding it,
    `remote` where the rank does not compute it (so every rank's plan has the same keys and store layout)."""
    topo = problem.topology
    by_ffn: dict[tuple[int, int], list[Unit]] = {}
    for u in local:
        by_ffn.setdefault(u.ffn, []).append(u)
    for units in by_ffn.values():
        units.sort(key=lambda u: u.start)
    out: dict[Unit, str] = {}
    for layer, e in always_active_ffns(topo) + routed_ffns(topo):
        mine = by_ffn.get((layer, e), [])
        starts = [u.start for u in mine]
        for g in units_of(topo, layer, e, problem.tile, problem.shard_count):
            i = bisect_right(starts, g.start) - 1
            if i >= 0 and g.end <= mine[i].end:
                out[g] = local[mine[i]]
            elif (i >= 0 and g.start < mine[i].end) or (i + 1 < len(mine) and mine[i + 1].start < g.end):
                raise PlanError(f"internal error: a policy unit cuts tile {g.key()}; please report this.")
            else:
                out[g] = REMOTE
    return out
