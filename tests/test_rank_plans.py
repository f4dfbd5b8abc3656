"""Placement across ranks: every tile computed by exactly one rank (or by each replica), dense FFNs on every
rank, each rank within its own budget, world size 1 = build_plan, tile splitting balances at least as well as
whole experts, rank plans round-trip through their files, and `tilemem plan --world-size` writes them."""

import argparse
import json
import shutil
from collections import defaultdict
from dataclasses import replace

import pytest

from tilemem.artifacts.heatmap import residency_matrix
from tilemem.artifacts.mir import load_plan, load_rank_plan, plan_checksum, save_plan
from tilemem.cli import plan_commands
from tilemem.errors import ConfigError
from tilemem.models.topology import DENSE, SHARED, LayerTopology, Topology
from tilemem.placement.budgets import Budgets
from tilemem.placement.errors import BudgetError, PlanError, PolicyError
from tilemem.placement.formats import tile_format
from tilemem.placement.planner import build_plan
from tilemem.placement.policies import PlacementProblem
from tilemem.placement.profile import LayerProfile, ModelSignature, Profile
from tilemem.placement.ranks import balance, build_rank_plans
from tilemem.placement.tiers import REMOTE, tier

HIDDEN = 8
BF16 = tile_format("bf16")


def topology(experts: int = 6, top_k: int = 2, width: int = 32, shared: int = 16) -> Topology:
    """A dense layer 0, then three MoE layers of `experts` routed experts (and shared experts of `shared`)."""
    layers = (LayerTopology(0, False, 0, 0, 0, 0, 48),) + tuple(
        LayerTopology(i, True, experts, top_k, width, shared, 0) for i in (1, 2, 3)
    )
    return Topology("generic", HIDDEN, "bfloat16", 2, layers, (("attn", 1000),))


def skewed(topo: Topology, counts: tuple[int, ...], tokens: int = 100) -> Profile:
    """The same routing counts in every MoE layer, rotated so each layer has another hottest expert."""
    sig = ModelSignature.of(topo)
    layers = []
    for n, i in enumerate(sig.moe_layers):
        rot = counts[n:] + counts[:n]
        layers.append(LayerProfile(i, rot, (0,) * len(rot), tokens, 0))
    return Profile(sig, tuple(layers), ("skewed",), "test")


def problems(topo: Topology, profile: Profile, *budgets: str, tile: int = 8) -> list[PlacementProblem]:
    return [PlacementProblem(topo, profile, Budgets.parse(b), BF16, tile=tile) for b in budgets]


def computed_by(plans):
    """(layer, expert, group, start, end) -> ranks that compute that tile."""
    out = defaultdict(set)
    for plan in plans:
        for t in plan.tiles:
            if t.tier != REMOTE:
                out[(t.layer, t.expert, t.group, t.start, t.end)].add(plan.rank)
    return out


CASES = [
    (split, replicate, policy)
    for split in ("expert", "tile")
    for replicate in (False, True)
    for policy in ("tilepo_fine", "kt_expert", "tilepo_coarse", "tilepo_adaptive")
]


@pytest.mark.parametrize(("split", "replicate", "policy"), CASES)
def test_each_tile_is_computed_once_or_by_each_replica(split, replicate, policy):
    topo = topology(experts=6)  # 6 experts on 4 ranks: not divisible
    profile = skewed(topo, (90, 40, 30, 20, 15, 5))
    plans = build_rank_plans(problems(topo, profile, *["cpu=inf"] * 4), policy, split=split, replicate=replicate)
    assert [(p.rank, p.world_size) for p in plans] == [(r, 4) for r in range(4)]
    # The same tiles, keys and store offsets on every rank.
    layout = [[(t.key, t.offset, t.nbytes) for t in p.tiles] for p in plans]
    assert all(x == layout[0] for x in layout)
    who = computed_by(plans)
    assert len(who) == len(plans[0].tiles)  # every tile computed somewhere
    for (layer, expert, _, _, _), ranks in who.items():
        if expert == DENSE:
            assert ranks == {0, 1, 2, 3}
            continue
        reps = [p.replica_of(layer, expert) for p in plans if p.rank in ranks]
        if any(reps):
            n = len(ranks)
            assert replicate and expert >= 0 and n > 1
            assert sorted(reps) == [(i, n) for i in range(n)]
        else:
            assert len(ranks) == 1
    for layer in (1, 2, 3):
        for expert in [SHARED, *range(6)]:
            holders = [p for p in plans if set(p.resident_ranges(layer, expert)) - {REMOTE}]
            if split == "expert":
                # whole: one rank (or each replica) holds the whole FFN, the others none of it
                for p in holders:
                    assert REMOTE not in p.resident_ranges(layer, expert)
                if not any(p.replica_of(layer, expert) for p in holders):
                    assert len(holders) == 1
            # ranges of one FFN cover it exactly once across ranks (replicas: each holds it whole)
            covered = sorted(
                r
                for p in holders
                if not p.replica_of(layer, expert)
                for t, rs in p.resident_ranges(layer, expert).items()
                if t != REMOTE
                for r in rs
            )
            if covered:
                assert covered[0][0] == 0 and covered[-1][1] == (16 if expert == SHARED else 32)
                assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False))


def test_even_split_gives_every_rank_an_equal_range_of_every_expert():
    """`even`: each of 2 ranks computes half of every routed and shared expert, whatever the profile, so the ranks
    balance for every token (not only on average); both halves together cover each FFN once."""
    topo = topology(experts=6)
    profile = skewed(topo, (90, 40, 30, 20, 15, 5))
    plans = build_rank_plans(problems(topo, profile, "cpu=inf", "cpu=inf"), "tilepo_fine", split="even")
    for layer in (1, 2, 3):
        for expert, width in [(SHARED, 16), *((e, 32) for e in range(6))]:
            mine = [[r for t, rs in p.resident_ranges(layer, expert).items() if t != REMOTE for r in rs] for p in plans]
            assert [sum(b - a for a, b in rs) for rs in mine] == [width // 2] * 2
            assert sorted(r for rs in mine for r in rs) in ([(0, width // 2), (width // 2, width)],)
    assert balance(plans, profile)["max_over_mean"] == pytest.approx(1.0)


def test_each_rank_keeps_its_own_budget_and_spills_in_proportion():
    topo = topology()
    profile = skewed(topo, (90, 40, 30, 20, 15, 5))
    unit = HIDDEN * 2 * 3  # bytes per neuron: gate, up and down rows in bf16
    moe, dense = 3 * (6 * 32 + 16) * unit, 48 * unit  # 29952 + 2304 bytes
    # Together the ranks hold the model (1000 B of non-expert weights each): nothing on disk, each within its
    # own cpu budget.
    plans = build_rank_plans(problems(topo, profile, "cpu=15000", "cpu=22000"), "tilepo_fine")
    for plan in plans:
        cpu = plan.usage("cpu")
        assert cpu.used <= cpu.capacity and plan.usage("disk").tiles == 0
        assert REMOTE not in [u.tier for u in plan.tiers] and plan.tiles_in(REMOTE)
    # They do not: both spill to their disk tier.
    assert balance(plans, profile)["bytes_per_rank"] == [sum(p.usage("cpu").tiles for p in [q]) for q in plans]
    assert sum(balance(plans, profile)["bytes_per_rank"]) == moe + 2 * dense
    tight = build_rank_plans(problems(topo, profile, "cpu=9000", "cpu=13000"), "tilepo_fine")
    assert all(p.usage("cpu").used <= p.usage("cpu").capacity for p in tight)
    disk = [p.usage("disk").tiles for p in tight]
    assert all(d > 0 for d in disk)
    assert sum(balance(tight, profile)["bytes_per_rank"]) == moe + 2 * dense


@pytest.mark.parametrize("policy", ["tilepo_fine", "uniform", "tilepo_hybrid"])
def test_world_size_one_is_build_plan(policy):
    topo = topology()
    [problem] = problems(topo, skewed(topo, (90, 40, 30, 20, 15, 5)), "cpu=5000")
    [plan] = build_rank_plans([problem], policy, "m")
    assert plan == build_plan(problem, policy, "m")
    assert (plan.rank, plan.world_size, plan.replicas) == (0, 1, ())
    assert plan_checksum(plan) == plan_checksum(build_plan(problem, policy, "m"))


def test_tile_split_balances_a_skewed_profile_better_than_whole_experts():
    topo = topology(experts=8, top_k=2, width=64, shared=0)  # Mixtral-like: few, large experts
    profile = skewed(topo, (80, 50, 30, 15, 10, 8, 5, 2))
    probs = problems(topo, profile, *["cpu=inf"] * 4)
    expert = balance(build_rank_plans(probs, "tilepo_fine", split="expert", replicate=False), profile)
    tile = balance(build_rank_plans(probs, "tilepo_fine", split="tile", replicate=False), profile)
    assert tile["max_over_mean"] <= expert["max_over_mean"]
    assert all(tile["layers"][k] <= expert["layers"][k] + 1e-9 for k in expert["layers"])
    assert expert["max_over_mean"] > 1.3 and tile["max_over_mean"] < 1.05
    # Replicating the hot experts helps whole-expert partitioning too (memory permitting).
    replicated = build_rank_plans(probs, "tilepo_fine", split="expert", replicate=True)
    assert balance(replicated, profile)["max_over_mean"] < expert["max_over_mean"]
    assert any(p.replicas for p in replicated)


def test_plans_are_deterministic():
    topo = topology()
    probs = problems(topo, skewed(topo, (90, 40, 30, 20, 15, 5)), "cpu=6000", "cpu=9000", "cpu=7000")
    a = [plan_checksum(p) for p in build_rank_plans(probs, "tilepo_fine")]
    b = [plan_checksum(p) for p in build_rank_plans(probs, "tilepo_fine")]
    assert a == b and len(set(a)) == 3


def test_rank_plans_round_trip_through_files(tmp_path):
    topo = topology(experts=8, top_k=2, width=64, shared=0)
    profile = skewed(topo, (80, 50, 30, 15, 10, 8, 5, 2))
    plans = build_rank_plans(problems(topo, profile, *["cpu=inf"] * 3), "tilepo_fine", "m", split="expert")
    assert any(p.replicas for p in plans)
    for plan in plans:
        save_plan(plan, tmp_path / f"rank{plan.rank}", heatmap=plan.rank == 0)
    for plan in plans:
        loaded = load_rank_plan(tmp_path, plan.rank)
        assert loaded == plan and plan_checksum(loaded) == plan_checksum(plan)
        assert [loaded.replica_of(*ffn) for ffn in [(1, e) for e in range(8)]] == [
            plan.replica_of(*ffn) for ffn in [(1, e) for e in range(8)]
        ]
    assert (tmp_path / "rank0" / "heatmap.png").stat().st_size > 0
    assert all(0 <= v <= 1 for row in residency_matrix(plans[0], REMOTE)[1:] for v in row)
    with pytest.raises(PlanError, match=r"no plan for rank 3 .*rank0, rank1, rank2.*--world-size N"):
        load_rank_plan(tmp_path, 3)
    shutil.rmtree(tmp_path / "rank2")
    shutil.copytree(tmp_path / "rank1", tmp_path / "rank2")
    with pytest.raises(PlanError, match="plan of rank 1 of 3, not of rank 2"):
        load_rank_plan(tmp_path, 2)
    # The checksum covers the rank fields.
    assert plan_checksum(replace(plans[1], rank=2)) != plan_checksum(plans[1])
    assert plan_checksum(replace(plans[1], replicas=())) != plan_checksum(plans[1])
    # A single-process plan's files keep their form (no `ranks` section) and load as rank 0 of 1.
    single = build_plan(problems(topo, profile, "cpu=inf")[0], "tilepo_fine")
    save_plan(single, tmp_path / "single")
    assert "ranks" not in json.loads((tmp_path / "single" / "mir.json").read_text())
    loaded = load_plan(tmp_path / "single")
    assert loaded == single and (loaded.rank, loaded.world_size, loaded.replicas) == (0, 1, ())


def test_bad_input_is_refused_clearly():
    topo = topology()
    profile = skewed(topo, (90, 40, 30, 20, 15, 5))
    with pytest.raises(BudgetError, match="world size must be at least 1"):
        build_rank_plans([], "tilepo_fine")
    with pytest.raises(PolicyError, match="unknown rank split 'layer'"):
        build_rank_plans(problems(topo, profile, "cpu=inf", "cpu=inf"), "tilepo_fine", split="layer")
    other = problems(topology(experts=6, width=16), profile, "cpu=inf")
    with pytest.raises(PlanError, match="rank 1's placement problem has another topology"):
        build_rank_plans(problems(topo, profile, "cpu=inf") + other, "tilepo_fine")
    with pytest.raises(BudgetError, match=r"^rank 1: impossible budget: the non-expert weights"):
        build_rank_plans(problems(topo, profile, "cpu=inf", "cpu=500"), "tilepo_fine")
    with pytest.raises(BudgetError, match=r"^rank 0: the tiers cannot hold the model"):
        build_rank_plans(problems(topo, profile, "cpu=2000,disk=100", "cpu=inf"), "tilepo_fine")
    assert tier(REMOTE).compute is False
    with pytest.raises(BudgetError, match="'remote' is not a memory tier a budget can name"):
        Budgets.parse("cpu=1GiB,remote=2GiB")
    with pytest.raises(ConfigError, match="--world-size must be at least 1"):
        plan_commands.parse_rank_budgets(0, [])
    with pytest.raises(ConfigError, match="names rank 2, but --world-size 2 has ranks 0..1"):
        plan_commands.parse_rank_budgets(2, ["2=cpu=6GiB"])
    with pytest.raises(ConfigError, match="is not RANK=BUDGET"):
        plan_commands.parse_rank_budgets(2, ["cpu=6GiB"])
    with pytest.raises(ConfigError, match="gives rank 1 twice"):
        plan_commands.parse_rank_budgets(2, ["1=cpu=6GiB", "1=cpu=7GiB"])
    assert plan_commands.parse_rank_budgets(3, ["1=cpu=6GiB"]) == {1: "cpu=6GiB"}


def test_cli_writes_one_plan_directory_per_rank(make_ckpt, tmp_path, capsys):
    ckpt = make_ckpt("olmoe", dtype="bf16")
    parser = argparse.ArgumentParser(prog="tilemem")
    plan_commands.register(parser.add_subparsers(dest="command", required=True))
    argv = ["plan", str(ckpt / "config.json"), "--budget", "cpu=1MiB", "--world-size", "2", "--rank-budget",
            "1=cpu=2MiB", "--tile-size", "8", "--no-heatmap", "--out", str(tmp_path / "p")]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "max/mean rank load" in printed and "FFN bytes computed" in printed
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["rank0", "rank1"]
    plans = [load_rank_plan(tmp_path / "p", r) for r in range(2)]
    assert [p.budget_source for p in plans] == ["cpu=1MiB", "cpu=2MiB"]
    assert all(p.world_size == 2 for p in plans)
    assert len(computed_by(plans)) == len(plans[0].tiles)
