"""Policies: budgets are never exceeded, tiles cover every FFN once, plans are deterministic, the
knapsack is optimal on small cases, and the baselines relate to TilePO as they should."""

from itertools import combinations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tilemem.artifacts.mir import plan_checksum
from tilemem.models.topology import LayerTopology, Topology
from tilemem.placement.budgets import Budgets, TierBudget
from tilemem.placement.errors import BudgetError, PolicyError
from tilemem.placement.formats import tile_format
from tilemem.placement.knapsack import Item, solve
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem, policy_names
from tilemem.placement.profile import LayerProfile, ModelSignature, Profile
from tilemem.placement.tiles import always_active_ffns, ffn_width, routed_ffns

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_topology(draw) -> Topology:
    n_layers = draw(st.integers(1, 3))
    experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, experts))
    inter = draw(st.integers(1, 40))
    shared = draw(st.sampled_from([0, 0, 24, 7]))
    dense = draw(st.sets(st.integers(0, n_layers - 1), max_size=n_layers - 1))
    dense_inter = draw(st.integers(1, 30))
    layers = tuple(
        LayerTopology(i, True, experts, top_k, inter, shared, 0)
        if i not in dense
        else LayerTopology(i, False, 0, 0, 0, 0, dense_inter)
        for i in range(n_layers)
    )
    hidden = draw(st.integers(1, 8))
    return Topology("generic", hidden, "bfloat16", 2, layers, (("attn", draw(st.integers(0, 3000))),))


def make_profile(draw, topo: Topology) -> Profile:
    sig = ModelSignature.of(topo)
    layers = []
    for i in sig.moe_layers:
        tokens = draw(st.integers(0, 40))
        counts = tuple(draw(st.lists(st.integers(0, tokens), min_size=sig.num_experts, max_size=sig.num_experts)))
        layers.append(LayerProfile(i, counts, (0,) * sig.num_experts, tokens, 0))
    return Profile(sig, tuple(layers), ("random",), "random")


@st.composite
def problems(draw):
    topo = make_topology(draw)
    profile = make_profile(draw, topo)
    fmt = tile_format(draw(st.sampled_from(["bf16", "bf16", "fp8_e4m3"])))
    total = topo.non_expert_bytes + 4 * topo.ffn_bytes(sum(lt.expert_intermediate for lt in topo.layers) * 8 + 100)
    cuda = draw(st.integers(topo.non_expert_bytes, topo.non_expert_bytes + total))
    tiers = [TierBudget("cuda", cuda), TierBudget("cpu", draw(st.integers(0, total)))]
    tiers.append(TierBudget("disk", draw(st.sampled_from([None, None, total // 3]))))
    budgets = Budgets(tuple(tiers), source="random")
    if draw(st.booleans()):
        budgets = budgets.with_cache(f"cuda={draw(st.integers(0, 30))}%")
    return PlacementProblem(
        topology=topo,
        profile=profile,
        budgets=budgets,
        fmt=fmt,
        tile=draw(st.integers(1, 16)),
        shard_count=draw(st.integers(1, 3)),
        adaptive_mode=draw(st.sampled_from(["throughput", "balanced", "tail_latency"])),
    )


@SETTINGS
@given(problem=problems(), policy=st.sampled_from(policy_names()))
def test_no_budget_exceeded_tiles_cover_once_and_deterministic(problem, policy):
    try:
        plan = build_plan(problem, policy)
    except BudgetError:
        # Only legitimate when the tiers really cannot hold the model (bounded disk) or the cache
        # reserve leaves no room; never silently over budget.
        bounded = all(t.capacity is not None for t in problem.budgets.tiers)
        assert bounded or problem.budgets.caches
        return
    for u in plan.tiers:
        if u.capacity is not None:
            assert u.used <= u.capacity, (policy, u)
    assert plan.usage("cuda").non_expert == problem.topology.non_expert_bytes
    topo = problem.topology
    for layer, expert in always_active_ffns(topo) + routed_ffns(topo):
        for group in ("gate_up", "down"):
            tiles = sorted((t for t in plan.tiles if (t.layer, t.expert, t.group) == (layer, expert, group)),
                           key=lambda t: t.start)  # fmt: skip
            covered = [n for t in tiles for n in range(t.start, t.end)]
            assert covered == list(range(ffn_width(topo, layer, expert)))
    # Both groups of a neuron range share a tier (a partial FFN needs both).
    tiers = {(t.layer, t.expert, t.start): t.tier for t in plan.tiles if t.group == "gate_up"}
    assert all(tiers[(t.layer, t.expert, t.start)] == t.tier for t in plan.tiles if t.group == "down")
    assert plan_checksum(build_plan(problem, policy)) == plan_checksum(plan)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(0, 10), min_size=1, max_size=11),
    sizes=st.lists(st.sampled_from([3, 5, 8]), min_size=11, max_size=11),
    capacity=st.integers(0, 60),
)
def test_knapsack_matches_brute_force(values, sizes, capacity):
    items = [Item(v, s, (i,)) for i, (v, s) in enumerate(zip(values, sizes, strict=False))]
    best = max(
        sum(items[i].value for i in subset)
        for r in range(len(items) + 1)
        for subset in combinations(range(len(items)), r)
        if sum(items[i].size for i in subset) <= capacity
    )
    sol = solve(items, capacity)
    assert sol.exact and sol.size <= capacity
    assert sol.value == pytest.approx(best, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_tilepo_fine_matches_brute_force_optimum(data):
    experts = data.draw(st.integers(1, 3))
    inter = data.draw(st.integers(2, 12))
    tile = data.draw(st.integers(2, 6))
    layers = tuple(LayerTopology(i, True, experts, 1, inter, 0, 0) for i in range(2))
    topo = Topology("generic", 4, "bfloat16", 2, layers, (("attn", 100),))
    units = [(i, e, a, b) for i in range(2) for e in range(experts) for _, a, b in _ranges(inter, tile)]
    assume(len(units) <= 12)
    profile = make_profile(data.draw, topo)
    room = data.draw(st.integers(0, topo.ffn_bytes(inter) * experts * 2))
    budgets = Budgets((TierBudget("cuda", 100 + room), TierBudget("cpu", None)))
    plan = build_plan(PlacementProblem(topo, profile, budgets, tile_format("bf16"), tile=tile), "tilepo_fine")
    probs = {i: profile.probabilities(i) for i in range(2)}
    value = {u: probs[u[0]][u[1]] * topo.ffn_bytes(u[3] - u[2]) for u in units}
    size = {u: topo.ffn_bytes(u[3] - u[2]) for u in units}
    best = max(
        sum(value[u] for u in subset)
        for r in range(len(units) + 1)
        for subset in combinations(units, r)
        if sum(size[u] for u in subset) <= room
    )
    got = plan.expected_bytes_per_token["cuda"] - 100  # minus the always-read non-expert bytes
    assert got == pytest.approx(best, rel=1e-6, abs=1e-2)


def _ranges(width, tile):
    from tilemem.placement.tiles import split_ranges

    return split_ranges(width, tile)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_kt_expert_and_tilepo_coarse_agree_on_uniform_profile_and_k_experts(data):
    topo = make_topology(data.draw)
    experts = max(lt.num_experts for lt in topo.layers)
    k = data.draw(st.integers(0, experts))
    fmt = tile_format("bf16")
    problem = PlacementProblem(topo, Profile.uniform(topo, 100), Budgets.from_experts_per_layer(topo, k, fmt), fmt)
    kt, coarse = build_plan(problem, "kt_expert"), build_plan(problem, "tilepo_coarse")
    assert [(t.key, t.tier) for t in kt.tiles] == [(t.key, t.tier) for t in coarse.tiles]
    for layer in topo.moe_layers:
        fast = [e for e in range(experts) if kt.resident_ranges(layer, e).get("cuda")]
        assert fast == list(range(k))


def test_ranking_fine_coarse_kt_uniform_on_skewed_profile():
    layers = tuple(LayerTopology(i, True, 16, 2, 96, 0, 0) for i in range(4))
    topo = Topology("generic", 32, "bfloat16", 2, layers, (("attn", 5000),))
    fmt = tile_format("bf16")
    # Layers with different skews: the cross-layer knapsack gives the skewed ones more room.
    sig = ModelSignature.of(topo)
    lps = []
    for i, s in enumerate((0.2, 0.8, 1.5, 2.5)):
        p = Profile.synthetic(Topology("g", 32, "bfloat16", 2, layers[:1], ()), skew=s, seed=i).layers[0]
        lps.append(LayerProfile(i, p.prefill_counts, p.decode_counts, p.prefill_tokens, 0))
    profile = Profile(sig, tuple(lps), ("synthetic",), "synthetic")
    base = Budgets.from_experts_per_layer(topo, 5, fmt)
    extra = topo.ffn_bytes(96) * 4 // 3  # not a whole number of experts
    budgets = Budgets((TierBudget("cuda", base.tiers[0].capacity + extra), TierBudget("cpu", None)))
    slow = {
        p: build_plan(PlacementProblem(topo, profile, budgets, fmt, tile=16), p).expected_bytes_per_token["cpu"]
        for p in ("tilepo_fine", "tilepo_coarse", "kt_expert", "uniform")
    }
    assert slow["tilepo_fine"] < slow["tilepo_coarse"] < slow["kt_expert"] < slow["uniform"]


def _one_layer(non_expert: int = 10_000) -> Topology:
    layers = (LayerTopology(0, True, 4, 2, 32, 0, 0),)
    return Topology("generic", 16, "bfloat16", 2, layers, (("attn", non_expert),) if non_expert else ())


def _problem(topo: Topology, budget: str, **kw) -> PlacementProblem:
    return PlacementProblem(topo, Profile.uniform(topo), Budgets.parse(budget), tile_format("bf16"), **kw)


def test_a_budget_short_of_the_non_expert_weights_says_how_much_is_missing():
    with pytest.raises(BudgetError, match=r"non-expert weights .* 5.86 KiB \(6000 bytes\) missing"):
        build_plan(_problem(_one_layer(), "cuda=4000,cpu=1MiB"), "tilepo_fine")


def test_bounded_tiers_that_cannot_hold_the_model_are_refused():
    with pytest.raises(BudgetError, match="cannot hold the model"):
        build_plan(_problem(_one_layer(), "cuda=10000,cpu=1,disk=1"), "kt_expert")


def test_a_budget_with_no_compute_tier_is_refused():
    with pytest.raises(BudgetError, match="cannot compute"):
        build_plan(_problem(_one_layer(), "disk=1GiB"), "uniform")


def test_an_unknown_policy_lists_the_policies():
    with pytest.raises(PolicyError, match="unknown policy 'tilepo_magic'; policies: uniform, kt_expert"):
        build_plan(_problem(_one_layer(0), "cuda=1MiB"), "tilepo_magic")


def test_an_unknown_adaptive_mode_is_a_clear_error():
    with pytest.raises(PolicyError, match="unknown adaptive mode 'fast'"):
        build_plan(_problem(_one_layer(0), "cuda=1MiB", adaptive_mode="fast"), "tilepo_adaptive")


def test_adaptive_modes_change_granularity_and_tail_latency_reserves_cache():
    layers = tuple(LayerTopology(i, True, 8, 2, 512, 0, 0) for i in range(2))
    topo = Topology("generic", 16, "bfloat16", 2, layers, (("attn", 1000),))
    fmt = tile_format("bf16")
    profile = Profile.synthetic(topo, skew=1.2)
    budgets = Budgets.from_experts_per_layer(topo, 3, fmt)
    plans = {
        m: build_plan(PlacementProblem(topo, profile, budgets, fmt, tile=64, adaptive_mode=m), "tilepo_adaptive")
        for m in ("throughput", "balanced", "tail_latency")
    }
    counts = {m: len(p.tiles) for m, p in plans.items()}
    assert counts["throughput"] < counts["balanced"] < counts["tail_latency"]
    assert plans["tail_latency"].usage("cuda").cache > 0 and plans["balanced"].usage("cuda").cache == 0
