"""Wire a plan into a loaded model: plan from a budget, tile store, tiered executor.

plan = make_plan(ckpt, "cpu=4GiB", "tilepo_fine", profile)
executor = attach_tiered(model, ckpt, plan, store_dir)
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from tilemem import memlimit, sysinfo
from tilemem.errors import BudgetError, ConfigError
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import FP8_FORMAT, LayerTopology, Topology
from tilemem.placement.budgets import Budgets, CacheReserve, TierBudget
from tilemem.placement.errors import PlanError
from tilemem.placement.formats import TileFormat, bf16_store_format, tile_format
from tilemem.placement.plan import Plan
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem
from tilemem.placement.profile import Profile
from tilemem.placement.tiles import always_active_ffns, routed_ffns
from tilemem.runtime.gguf_source import GgufSource, gguf_tile_format, plan_types, quantized_bytes, store_source
from tilemem.runtime.tiered import TieredConfig, TieredExperts
from tilemem.runtime.tile_format import fp8_tile_size_message
from tilemem.runtime.tile_store import StoreError, TileStore, convert, held_format, store_codec
from tilemem.units import format_bytes


def load_profile(profile: Profile | str | Path | None, topology: Topology) -> Profile:
    """A Profile from an object, a profile.json path, or a uniform prior when None."""
    if profile is None:
        return Profile.uniform(topology)
    if isinstance(profile, Profile):
        profile.check_matches(topology)
        return profile
    return Profile.load(profile, topology)


DEFAULT_TILE = 128
"""Neurons per tile when none is given (a multiple of FP8's 128-blocks)."""


def default_tile(codec_or_ckpt) -> int:
    """Neurons per tile when none is given: DEFAULT_TILE, or a GGUF model's down-projection block where that is
    larger (256 for K-quants). Takes a store codec or a checkpoint."""
    codec = codec_or_ckpt
    if not hasattr(codec, "tile_block"):
        source = store_source(codec_or_ckpt)
        codec = store_codec(source) if isinstance(source, GgufSource) else None
    return math.lcm(DEFAULT_TILE, codec.tile_block) if codec is not None and codec.gguf else DEFAULT_TILE


def make_plan(
    ckpt: Checkpoint,
    budget: str,
    policy: str = "tilepo_fine",
    profile: Profile | str | Path | None = None,
    tile: int | None = None,
    cache: str | None = None,
    dtype: str | None = None,
    memory_limit: str | int | None = None,
    context: int = 4096,
    sequences: int = 1,
    store: str | Path | None = None,
) -> Plan:
    """Plan `ckpt` under `budget` (e.g. `cpu=4GiB`, or `auto`: within `memory_limit`, e.g. `6GiB`, else
    the limit measured here, less the KV cache of `sequences` sequences of `context` tokens) with `policy`.
    A GGUF model's FFN bytes are its quant blocks' (`dtype` counts its other weights). `tile` None: 128 neurons,
    or a GGUF model's down-projection block where that is larger (256 for K-quants). bf16 tiles count as the tile
    store (`store`, else the one beside the checkpoint) holds them, or will: x12 or plain (`expert_format`)."""
    problem, policy = plan_problem(
        ckpt, budget, policy, profile, tile, cache, dtype, memory_limit, context, sequences, store
    )
    return build_plan(problem, policy, name=ckpt.path.name)


def plan_problem(
    ckpt: Checkpoint,
    budget: str,
    policy: str = "tilepo_fine",
    profile: Profile | str | Path | None = None,
    tile: int | None = None,
    cache: str | None = None,
    dtype: str | None = None,
    memory_limit: str | int | None = None,
    context: int = 4096,
    sequences: int = 1,
    store: str | Path | None = None,
) -> tuple[PlacementProblem, str]:
    """What `make_plan` solves, and with which policy (`auto` resolved)."""
    topo, codec = _topology(ckpt, dtype)
    gguf = codec is not None
    if tile is None:
        tile = default_tile(codec)
    prof = load_profile(profile, topo)
    learn = budget == "auto" and cache is None  # with no profile, auto learns the hot experts in a cache
    if budget == "auto" or policy == "auto":  # the cost model picks (tilemem.tmap)
        from tilemem.tmap.auto import resolve_auto

        limit = memlimit.memory_limit(memory_limit) if budget == "auto" else None
        budget, policy, tile = resolve_auto(
            topo, budget, policy, prof, tile, model=ckpt.path.name, limit=limit, context=context,
            sequences=sequences,
        )  # fmt: skip
    budgets = Budgets.parse(budget, cache)
    if learn:
        from tilemem.tmap.auto import with_learning_cache

        budgets = with_learning_cache(topo, budgets, prof)
    if topo.dtype == FP8_FORMAT and tile % 128:
        raise ConfigError(fp8_tile_size_message(tile) + ".")
    if gguf:
        try:
            codec.check_tile_size(tile)
        except ValueError as exc:
            raise ConfigError(f"{exc}.") from None
    gpu_tier = any(t.tier == "cuda" and t.capacity != 0 for t in budgets.tiers)
    fmt = gguf_tile_format(codec.ggml_units) if gguf else expert_format(ckpt, topo, tile, store, gpu_tier)
    return PlacementProblem(topo, prof, budgets, fmt, tile=tile), policy


def expert_format(
    ckpt: Checkpoint, topo: Topology, tile: int, store: str | Path | None = None, gpu_tier: bool = False
) -> TileFormat:
    """The format a plan counts `ckpt`'s expert tiles in: x12 where the weights are counted as bf16 and the tile
    store (`store`, else beside the checkpoint) is, or converted now will be, x12; else the topology's dtype. With
    a `gpu_tier` (the cuda tier holds x12 tiles decoded to bf16) bf16, which overcounts the x12 tiles in DRAM. FP8
    tiles count as stored in every tier, the cuda tier's too (it holds them as stored: `layers.gpu_ffn.Fp8Slab`)."""
    fmt = tile_format(topo.dtype)
    if fmt.name != "bf16" or gpu_tier:
        return fmt
    store = Path(store) if store else default_store_dir(ckpt, tile)
    if not (store / "store.json").exists():
        return bf16_store_format(topo.hidden_size, tile)
    # an unreadable store.json is converted again when used: counted as the plain tiles it may become
    return tile_format("x12") if held_format(store) == "x12" else fmt


def _topology(ckpt: Checkpoint, dtype: str | None):
    """(what planning knows of `ckpt`'s shapes and bytes, the GGUF store codec or None): a GGUF model's FFN bytes
    are its quant blocks' (`dtype` counts its other weights)."""
    source = store_source(ckpt)
    codec = store_codec(source) if isinstance(source, GgufSource) else None
    if codec is None or not codec.gguf:
        return Topology.from_config(ckpt.config, dtype), None
    return Topology.from_config(ckpt.config, dtype, plan_types(codec.ggml_units), quantized_bytes(ckpt)), codec


def rank_budget(
    ckpt: Checkpoint,
    budget: str | None,
    tile: int | None = None,
    dtype: str | None = None,
    memory_limit: str | int | None = None,
    context: int = 4096,
    sequences: int = 1,
    share: int = 1,
) -> str:
    """Expert parallelism: this rank's budget as text: `budget`, or (None, `auto`) what `--budget auto` makes of
    this machine's memory limit divided among the `share` ranks that run on it, resolved here because rank 0 plans
    for every rank."""
    if budget not in (None, "auto"):
        return budget
    from tilemem.tmap.auto import auto_budget

    topo, codec = _topology(ckpt, dtype)
    limit = memlimit.memory_limit(memory_limit)
    if share > 1:
        limit = replace(limit, available=limit.available // share)
    tile = tile or default_tile(codec)
    return auto_budget(topo, context=context, batch=sequences, limit=limit, tile=tile).text


def make_rank_plans(
    ckpt: Checkpoint,
    budgets: list[str],
    policy: str = "tilepo_fine",
    profile: Profile | str | Path | None = None,
    tile: int | None = None,
    dtype: str | None = None,
    split: str = "tile",
    replicate: bool = True,
) -> list[Plan]:
    """Expert parallelism: one plan per rank, rank r within `budgets[r]` (texts, `rank_budget`), the routed experts
    shared out by `placement.ranks.build_rank_plans` (`split`: whole experts, or hot experts split by tiles too)."""
    from tilemem.placement.ranks import build_rank_plans

    solved = [plan_problem(ckpt, b, policy, profile, tile, dtype=dtype) for b in budgets]
    return build_rank_plans([p for p, _ in solved], solved[0][1], ckpt.path.name, split=split, replicate=replicate)


def residency_of(plan: Plan, topology: Topology) -> dict[tuple[int, int], dict[str, list[tuple[int, int]]]]:
    """tier (`cuda`, `cpu`, `disk`) -> neuron ranges of every routed expert, shared-expert FFN
    (unit SHARED) and dense FFN (DENSE), as the plan places them."""
    res = {}
    for layer, e in routed_ffns(topology) + always_active_ffns(topology):
        ranges = plan.resident_ranges(layer, e)
        if "cuda" in ranges and not torch.cuda.is_available():
            raise ConfigError(
                "the plan places tiles on 'cuda' but this machine has no CUDA device; plan with "
                "--budget cpu=...,disk=... instead."
            )
        res[(layer, e)] = dict(ranges)
    return res


def default_store_dir(ckpt: Checkpoint, tile: int) -> Path:
    """Where a checkpoint's tile store lives unless told otherwise: beside it."""
    return ckpt.path.parent / f"{ckpt.path.name}.tiles{tile}"


def _shape(family: str, hidden: int, layers: tuple[LayerTopology, ...]) -> tuple:
    """What a plan depends on: the family (its weight names) and every layer's FFN shape."""
    ffns = tuple(
        (lt.is_moe, lt.num_experts, lt.top_k, lt.expert_intermediate, lt.shared_intermediate, lt.dense_intermediate)
        for lt in layers
    )
    return family, hidden, ffns


def _describe(family: str, hidden: int, layers: tuple[LayerTopology, ...]) -> str:
    """`olmoe, 2 layers (2 MoE x 8 experts, top-2, width 32), hidden 64`."""
    moe = [lt for lt in layers if lt.is_moe]
    experts = f" x {moe[0].num_experts} experts, top-{moe[0].top_k}, width {moe[0].expert_intermediate}" if moe else ""
    return f"{family}, {len(layers)} layers ({len(moe)} MoE{experts}), hidden {hidden}"


def check_plan_matches(plan: Plan, ckpt: Checkpoint) -> None:
    """Refuse a plan made for another model: its family or FFN shapes differ from `ckpt`'s."""
    topo, cfg = plan.topology, ckpt.config
    theirs = (topo.family, topo.hidden_size, topo.layers)
    ours = (cfg.family, cfg.hidden_size, Topology.layers_of(cfg))
    if _shape(*theirs) == _shape(*ours):
        return
    raise PlanError(
        f"plan '{plan.name}' was made for another model: {_describe(*theirs)}, but {ckpt.path} is "
        f"{_describe(*ours)}; make a plan for this model with `tilemem plan {ckpt.path} --budget ...`, "
        "or pass --budget instead of --plan."
    )


def check_fits_in_ram(dram_bytes: int) -> None:
    """Refuse a plan that keeps more in DRAM than this machine has (a budget for a bigger machine)."""
    total = sysinfo.memory().total
    if dram_bytes > total:
        raise BudgetError(
            f"the plan keeps {format_bytes(dram_bytes)} in DRAM (non-expert weights and resident tiles), more than "
            f"this machine's {format_bytes(total)}; give a cpu budget below that (--budget cpu=SIZE)."
        )


def ensure_store(ckpt: Checkpoint, plan: Plan, store: str | Path | None = None, progress: bool = True) -> Path:
    """The plan's tile store directory (`store`, else beside the checkpoint), converted first when missing."""
    store = Path(store) if store else default_store_dir(ckpt, plan.tile)
    if not (store / "store.json").exists():
        convert(ckpt.path, store, tile_size=plan.tile, progress=progress)
    return store


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
    check_plan_matches(plan, ckpt)
    topo = plan.topology
    store = ensure_store(ckpt, plan, store, progress)
    opened = TileStore(store, ckpt)
    if plan.fmt.name == "x12" and not opened.codec.x12:
        raise StoreError(
            f"the plan counts x12 tiles (12 bits per weight) but {store} holds plain bf16 tiles, a third larger; "
            "plan again (a plan made now counts this store's tiles), or delete the store to convert it as x12."
        )
    if config is None:  # a plan compiled with `prefetch = off` turns it off; else on while it is used
        config = TieredConfig(prefetch="auto" if plan.settings.get("prefetch", True) else False)
    cpu = plan.usage("cpu") if "cpu" in {u.tier for u in plan.tiers} else None
    if cpu is not None:
        check_fits_in_ram(cpu.non_expert + cpu.tiles)
    if cpu is not None and cpu.capacity is not None:
        # The tile cache gets what the plan leaves free in DRAM (its cache reserve plus bytes no tile
        # took), never more: the budget covers the cache too (only the staging slots may exceed it).
        room = cpu.capacity - cpu.non_expert - cpu.tiles
        config = replace(config, cache_bytes=room if config.cache_bytes is None else min(config.cache_bytes, room))
    if profile is not None:
        probs = {}
        for lt in topo.layers:
            if lt.is_moe:
                p = profile.probabilities(lt.index)
                for e in range(lt.num_experts):
                    for t in opened.tiles_of(lt.index, e):
                        probs[(lt.index, e, t.start)] = float(p[e])
        config = replace(config, tile_weights=probs)
    residency = residency_of(plan, topo)
    executor = TieredExperts(model.moe_blocks(), opened, residency, config, model.dtype, model.device)
    if plan.world_size > 1:  # expert parallelism: the tokens of this rank's replicas
        executor.replicas = {
            (layer, e): share for layer, e in routed_ffns(topo) if (share := plan.replica_of(layer, e)) is not None
        }
    model.set_executor(executor)
    for (layer, unit), mlp in model.always_active_ffns().items():
        mlp.tiled = partial(executor.unit, layer, unit)
    return executor


def start_async_planning(executor: TieredExperts, plan: Plan, interval_s: float = 2.0):
    """Re-solve `plan` in the background from live routing and migrate tiles within its DRAM budget."""
    from tilemem.runtime.replanner import AsyncReplanner

    topo = plan.topology
    if executor.device.type != "cpu":
        raise ConfigError(
            "async planning migrates tiles within DRAM and disk only; for a plan with a cuda tier, run "
            "without async planning (or plan with --budget cpu=...)."
        )
    cpu = next((u for u in plan.tiers if u.tier == "cpu"), None)
    if cpu is None or cpu.capacity is None:
        raise ConfigError("async planning needs a plan made from a bounded DRAM budget (e.g. cpu=4GiB).")
    # Re-solve under exactly the plan's tier capacities and cache reserves (the budget text alone
    # would drop a reserve given apart, and new plans would then count on the cache's bytes).
    budgets = Budgets(
        tuple(TierBudget(u.tier, u.capacity) for u in plan.tiers),
        tuple(CacheReserve(u.tier, nbytes=u.cache) for u in plan.tiers if u.cache),
        plan.budget_source,
    )
    # Tiles (routed, shared and dense FFNs alike) may use the DRAM budget less the non-expert weights
    # and the tile cache as allocated.
    cache = executor.config.cache_bytes if executor.config.cache_bytes is not None else cpu.cache
    resident_budget = cpu.capacity - cpu.non_expert - cache
    options = dict(
        tile=plan.tile,
        shard_count=plan.shard_count,
        phase=plan.profile.get("phase", "all"),
        adaptive_mode=plan.policy_params.get("mode", "balanced"),
    )

    def solve(profile: Profile) -> Plan:
        problem = PlacementProblem(topo, profile, budgets, plan.fmt, **options)
        return build_plan(problem, plan.policy, name=plan.name)

    return AsyncReplanner(executor, plan, solve, lambda p: residency_of(p, topo), resident_budget, interval_s).start()
