"""Wire a plan into a loaded model: plan from a budget, tile store, tiered executor.

plan = make_plan(ckpt, "cpu=4GiB", "tilepo_fine", profile)
executor = attach_tiered(model, ckpt, plan, store_dir)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from tilemem.errors import ConfigError
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.placement.budgets import Budgets
from tilemem.placement.formats import tile_format
from tilemem.placement.plan import Plan
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem
from tilemem.placement.profile import Profile
from tilemem.runtime.tiered import TieredConfig, TieredExperts
from tilemem.runtime.tile_store import TileStore, convert


def load_profile(profile: Profile | str | Path | None, topology: Topology) -> Profile:
    """A Profile from an object, a profile.json path, or a uniform prior when None."""
    if profile is None:
        return Profile.uniform(topology)
    if isinstance(profile, Profile):
        profile.check_matches(topology)
        return profile
    return Profile.load(profile, topology)


def make_plan(
    ckpt: Checkpoint,
    budget: str,
    policy: str = "tilepo_fine",
    profile: Profile | str | Path | None = None,
    tile: int = 128,
    cache: str | None = None,
    dtype: str | None = None,
) -> Plan:
    """Plan `ckpt` under `budget` (e.g. `cpu=4GiB`) with `policy`."""
    topo = Topology.from_config(ckpt.config, dtype)
    budgets = Budgets.parse(budget, cache)
    problem = PlacementProblem(topo, load_profile(profile, topo), budgets, tile_format(topo.dtype), tile=tile)
    return build_plan(problem, policy, name=ckpt.path.name)


def residency_of(plan: Plan, topology: Topology) -> dict[tuple[int, int], dict[str, list[tuple[int, int]]]]:
    """tier -> neuron ranges of every routed expert, as the plan places them."""
    res = {}
    for lt in topology.layers:
        for e in range(lt.num_experts):
            ranges = plan.resident_ranges(lt.index, e)
            if "cuda" in ranges and not torch.cuda.is_available():
                raise ConfigError(
                    "the plan places tiles on 'cuda' but this machine has no CUDA device; plan with "
                    "--budget cpu=...,disk=... instead."
                )
            res[(lt.index, e)] = {("cpu" if t == "cuda" else t): r for t, r in ranges.items()}
    return res


def default_store_dir(ckpt: Checkpoint, tile: int) -> Path:
    """Where a checkpoint's tile store lives unless told otherwise: beside it."""
    return ckpt.path.parent / f"{ckpt.path.name}.tiles{tile}"


def attach_tiered(
    model,
    ckpt: Checkpoint,
    plan: Plan,
    store: str | Path | None = None,
    config: TieredConfig | None = None,
    profile: Profile | None = None,
    progress: bool = True,
) -> TieredExperts:
    """Convert (if needed) and open the tile store, then route the model's experts through the plan."""
    topo = plan.topology
    store = Path(store) if store else default_store_dir(ckpt, plan.tile)
    if not (store / "store.json").exists():
        convert(ckpt.path, store, tile_size=plan.tile, progress=progress)
    opened = TileStore(store, ckpt)
    config = config or TieredConfig()
    if "cpu" in {u.tier for u in plan.tiers}:
        reserved = plan.usage("cpu").cache
        if reserved:
            config = replace(config, cache_bytes=reserved)
    if profile is not None:
        probs = {}
        for lt in topo.layers:
            if lt.is_moe:
                p = profile.probabilities(lt.index)
                for e in range(lt.num_experts):
                    for t in opened.tiles_of(lt.index, e):
                        probs[(lt.index, e, t.start)] = float(p[e])
        config = replace(config, tile_weights=probs)
    executor = TieredExperts(model.moe_blocks(), opened, residency_of(plan, topo), config, model.dtype)
    model.set_executor(executor)
    return executor


def start_async_planning(executor: TieredExperts, plan: Plan, interval_s: float = 2.0):
    """Re-solve `plan` in the background from live routing and migrate tiles within its DRAM budget."""
    from tilemem.runtime.replanner import AsyncReplanner

    topo = plan.topology
    budgets = Budgets.parse(plan.budget_source) if "=" in plan.budget_source else None
    if budgets is None:
        raise ConfigError("async planning needs a plan made from a tier budget (e.g. cpu=4GiB).")
    cpu = plan.usage("cpu")
    resident_budget = (cpu.capacity or 0) - cpu.non_expert - cpu.cache

    def solve(profile: Profile) -> Plan:
        problem = PlacementProblem(topo, profile, budgets, plan.fmt, tile=plan.tile)
        return build_plan(problem, plan.policy, name=plan.name)

    return AsyncReplanner(executor, plan, solve, lambda p: residency_of(p, topo), resident_budget, interval_s).start()
