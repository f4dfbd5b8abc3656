"""Placement never changes what the model computes: tiered logits and greedy tokens equal the all-resident
engine for every family, policy, DRAM budget, tile size, cache setting, prefetch and async planning.

The full cross product is too slow for the default tier, so a seeded sample of combinations is run:
every (family, policy) pair once, with the other axes balanced over the sample and shuffled
(`test_sample_covers_every_axis` checks the sample still reaches every value of every axis).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
from dataclasses import dataclass, replace

import pytest
import torch

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.layers.kv_cache import ForwardContext
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.registry import families
from tilemem.models.topology import Topology
from tilemem.placement.policies import policy_names
from tilemem.placement.profile import Profile
from tilemem.runtime.setup import make_plan
from tilemem.runtime.tiered import TieredConfig

FAMILIES = sorted(families())
POLICIES = policy_names()
PROMPT_LENS = [9, 5, 3]
TEACHER_STEPS = 3
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
REL_TOL = 1e-4


@dataclass(frozen=True)
class Combo:
    """One tiered configuration to compare against the resident engine."""

    family: str
    policy: str
    tile: str
    """`16` or `full` (the expert width: one tile per expert)."""
    budget: float
    """Share of the FFN bytes (routed + shared + dense) the DRAM budget holds beyond the non-expert weights."""
    cache_share: float
    """Share of that room reserved as dynamic tile cache (0: none)."""
    prefetch: bool
    async_planning: bool
    io_depth: int
    cache_policy: str
    skewed_profile: bool
    """Plan from a Zipf profile rather than the uniform prior."""

    def __str__(self) -> str:
        return (
            f"{self.family}-{self.policy}-t{self.tile}-b{self.budget:.2f}-c{self.cache_share:g}"
            f"-{'pf' if self.prefetch else 'nopf'}-{'async' if self.async_planning else 'sync'}"
            f"-io{self.io_depth}-{self.cache_policy}-{'zipf' if self.skewed_profile else 'uniform'}"
        )


def sample_combos(seed: int = 7) -> list[Combo]:
    """Every (family, policy) once; other axes balanced over the sample, then shuffled."""
    rng = random.Random(seed)
    pairs = [(f, p) for f in FAMILIES for p in POLICIES]

    def balanced(values: list) -> list:
        out = [values[i % len(values)] for i in range(len(pairs))]
        rng.shuffle(out)
        return out

    budgets = [b if b != "mid" else round(rng.uniform(0.1, 0.9), 2) for b in balanced([0.0, "mid", 1.0, "mid"])]
    axes = zip(
        balanced(["16", "full"]),
        budgets,
        balanced([0.0, 0.5]),
        balanced([True, False]),
        balanced([True, False, False]),
        balanced([1, 2, 4]),
        balanced(["lru", "lfu", "profile"]),
        balanced([False, True]),
        strict=True,
    )
    return [
        Combo(f, p, tile, budget, cache if 0 < budget < 1 else 0.0, pf, asy, io, cp, skew)
        for (f, p), (tile, budget, cache, pf, asy, io, cp, skew) in zip(pairs, axes, strict=True)
    ]


COMBOS = sample_combos(int(os.environ.get("TILEMEM_TIERED_SEED", "7")))
"""Set TILEMEM_TIERED_SEED to run another sample of the cross product."""


def test_sample_covers_every_axis():
    assert {c.family for c in COMBOS} == set(FAMILIES)
    assert {c.policy for c in COMBOS} == set(POLICIES)
    assert {c.tile for c in COMBOS} == {"16", "full"}
    assert {c.prefetch for c in COMBOS} == {True, False}
    assert {c.io_depth for c in COMBOS} == {1, 2, 4}
    assert {c.cache_policy for c in COMBOS} == {"lru", "lfu", "profile"}
    budgets = {c.budget for c in COMBOS}
    assert 0.0 in budgets and 1.0 in budgets and any(0 < b < 1 for b in budgets)
    assert any(c.cache_share for c in COMBOS)
    # Async planning only migrates when the budget holds some but not all experts.
    assert any(c.async_planning and 0 < c.budget < 1 for c in COMBOS)
    assert any(not c.async_planning for c in COMBOS)
    for family in FAMILIES:  # each family sees both tile sizes and more than one budget
        mine = [c for c in COMBOS if c.family == family]
        assert len({c.tile for c in mine}) == 2 and len({c.budget for c in mine}) >= 2


def cycled_combos(tiles: list[str]) -> list[Combo]:
    """One combination per family, the other axes cycled so that each value occurs (tile sizes from `tiles`)."""
    policies = itertools.cycle(policy_names())
    axes = zip(
        itertools.cycle(tiles),
        itertools.cycle([0.0, 0.45, 1.0, 0.7]),
        itertools.cycle([0.0, 0.5, 0.0]),
        itertools.cycle([True, False]),
        itertools.cycle([False, True, False]),
        itertools.cycle([1, 4, 2]),
        itertools.cycle(["lfu", "lru", "profile"]),
        itertools.cycle([True, False, False]),
    )
    out = []
    for family, (tile, budget, cache, pf, asy, io, cp, skew) in zip(FAMILIES, axes, strict=False):
        out.append(Combo(family, next(policies), tile, budget, cache if 0 < budget < 1 else 0.0, pf, asy, io, cp, skew))
    return out


def check_cycled_axes(combos: list[Combo], tiles: list[str]) -> None:
    """Every value of every axis occurs in `cycled_combos(tiles)`."""
    assert len({c.policy for c in combos}) == min(len(combos), len(policy_names()))
    assert {c.tile for c in combos} == set(tiles) and {c.prefetch for c in combos} == {True, False}
    assert {c.async_planning for c in combos} == {True, False}
    assert {0.0, 1.0} <= {c.budget for c in combos} and any(0 < c.budget < 1 for c in combos)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def prompts(vocab: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def forward_logits(model, batch: list[list[int]], teacher: list[list[int]]) -> list[torch.Tensor]:
    """Logits of a right-padded batched prefill, then TEACHER_STEPS decode steps fed `teacher` tokens.

    Returns [prefill logits of row i [len_i, V] for each row] + [decode logits [B, V] per step]."""
    cache = model.allocate_cache(len(batch), max(PROMPT_LENS) + TEACHER_STEPS + 1)
    ids = torch.zeros(len(batch), max(PROMPT_LENS), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, : len(p)] = torch.tensor(p)
    ctx = ForwardContext.build(cache, list(range(len(batch))), [0] * len(batch), PROMPT_LENS)
    logits = model(ids, ctx)  # [B, T, V]
    out = [logits[i, :n] for i, n in enumerate(PROMPT_LENS)]
    for step in range(TEACHER_STEPS):
        feed = torch.tensor([[t[step]] for t in teacher])
        starts = [n + step for n in PROMPT_LENS]
        ctx = ForwardContext.build(cache, list(range(len(batch))), starts, [1] * len(batch))
        out.append(model(feed, ctx)[:, 0])  # [B, V]
    return out


def resident_references(make_ckpt, weights: str):
    """get(family) -> (checkpoint path, prompts, resident logits, resident greedy tokens) of the family's tiny
    checkpoint stored in `weights` (fp32 activations), computed once per family."""
    refs: dict[str, tuple] = {}

    def get(family: str):
        if family not in refs:
            path = make_ckpt(family, weights, routing_skew=1.0)
            llm = LLM(path, dtype="fp32")
            batch = prompts(llm.config.vocab_size)
            tokens = [o.token_ids for o in llm.generate(batch, GREEDY)]
            refs[family] = (path, batch, forward_logits(llm.model, batch, tokens), tokens)
        return refs[family]

    return get


@pytest.fixture(scope="module")
def reference(make_ckpt):
    """Per family: (checkpoint path, prompts, resident logits, resident greedy tokens)."""
    return resident_references(make_ckpt, "fp32")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """One tile store per (family, tile size), converted by the first LLM that uses it."""
    root = tmp_path_factory.mktemp("stores")
    return lambda family, tile: root / f"{family}-t{tile}"


def make_tiered_llm(path, combo: Combo, store, weights: str | None = "fp32") -> LLM:
    """The tiered LLM of `combo` (fp32 activations; the plan counts the weights as `weights`, None: as stored)."""
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config, weights)
    width = topo.layers[topo.moe_layers[0]].expert_intermediate
    tile = width if combo.tile == "full" else int(combo.tile)
    ffn = topo.routed_expert_bytes + topo.shared_and_dense_bytes
    room = int(combo.budget * ffn)
    budget = f"cpu={topo.non_expert_bytes + room}B"
    cache = f"cpu={int(combo.cache_share * room)}B" if combo.cache_share else None
    profile = Profile.synthetic(topo, skew=1.2, seed=11) if combo.skewed_profile else None
    plan = make_plan(ckpt, budget, combo.policy, profile, tile, cache=cache, dtype=weights)
    runtime = TieredConfig(prefetch=combo.prefetch, io_depth=combo.io_depth, cache_policy=combo.cache_policy)
    return LLM(
        path,
        dtype="fp32",
        plan=plan,
        profile=profile,
        store=store(combo.family, tile),
        tile=tile,
        runtime=runtime,
        async_planning=combo.async_planning,
        replan_interval_s=0.02,
    )


@pytest.mark.parametrize("combo", COMBOS, ids=str)
def test_tiered_matches_resident(combo, reference, store_dir):
    path, batch, ref_logits, ref_tokens = reference(combo.family)
    llm = make_tiered_llm(path, combo, store_dir)
    try:
        assert llm.tiered is not None
        if combo.budget == 0.0:
            assert llm.tiered.resident_bytes == 0  # every routed tile is read from disk
        if combo.budget == 1.0:
            assert not any(llm.tiered.on_disk.values())  # everything fits: nothing read from disk
        ours = forward_logits(llm.model, batch, ref_tokens)
        for i, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            assert rel_err(a, b) < REL_TOL, f"logits block {i}: rel err {rel_err(a, b):.2e}"
        # Greedy generation; with async planning repeat until a migration happened mid-generation
        # (bounded), checking every round.
        can_migrate = llm.replanner is not None and llm.replanner.resident_budget > 0 and 0 < combo.budget < 1
        rounds = 4 if can_migrate else 1
        for _ in range(rounds):
            outs = llm.generate(batch, GREEDY)
            for out, tokens in zip(outs, ref_tokens, strict=True):
                assert out.error is None and out.finish_reason == "length"
                assert out.token_ids == tokens
            if llm.replanner is not None and llm.replanner.stats.promoted + llm.replanner.stats.demoted:
                break
        assert llm.stats().runtime["tiles_computed"] > 0
    finally:
        if llm.replanner is not None:
            llm.replanner.stop()
        llm.tiered.close()


def test_async_migration_keeps_tokens_exact(reference, store_dir):
    """Force re-plans between generations (skewed live routing vs a uniform plan): tokens stay exact
    and tiles really moved."""
    combo = Combo("olmoe", "tilepo_fine", "16", 0.4, 0.0, True, True, 4, "lfu", False)
    path, batch, _, ref_tokens = reference(combo.family)
    llm = make_tiered_llm(path, combo, store_dir)
    try:
        rp = llm.replanner
        rp.stop()  # drive re-planning by hand so the test is deterministic
        rp.stop_event.clear()
        for _ in range(3):
            outs = llm.generate(batch, GREEDY)
            assert [o.token_ids for o in outs] == ref_tokens
            # Re-plan in a helper thread while the engine applies migrations between steps.
            t = threading.Thread(target=rp.replan_once)
            t.start()
            while t.is_alive():
                outs = llm.generate(batch, GREEDY)
                assert [o.token_ids for o in outs] == ref_tokens
            t.join()
        assert rp.stats.replans > 0 and rp.stats.demoted > 0
        outs = llm.generate(batch, GREEDY)
        assert [o.token_ids for o in outs] == ref_tokens
    finally:
        llm.replanner.stop()
        llm.tiered.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_executor_output_matches_resident_experts(family, reference, store_dir):
    """The routed-expert sum itself, layer by layer (more sensitive than logits: no residual stream),
    over DRAM ranges, cache hits and disk reads alike, for prefill- and decode-shaped inputs."""
    path, *_ = reference(family)
    resident = LLM(path, dtype="fp32").model
    combo = Combo(family, "tilepo_fine", "16", 0.7, 0.2, True, False, 2, "lfu", True)
    llm = make_tiered_llm(path, combo, store_dir)
    try:
        ex = llm.tiered
        assert ex.resident_bytes > 0 and any(ex.on_disk.values())
        gen = torch.Generator().manual_seed(0)
        blocks = resident.moe_blocks()
        for layer, block in blocks.items():
            for tokens in (7, 1, 1):
                x = torch.randn(tokens, resident.cfg.hidden_size, generator=gen)  # [T, D]
                weights, ids = block.gate(x)  # [T, K], [T, K]
                want = block.executor(layer, x, weights, ids)
                for rnd in range(2):  # the second round finds fetched tiles in the cache
                    got = ex(layer, x, weights, ids)
                    assert rel_err(got, want) < 1e-5, f"layer {layer} T={tokens} round {rnd}"
        assert ex.counters.misses > 0 and ex.counters.hits > 0
    finally:
        llm.tiered.close()


def test_auto_prefetch_pauses_when_prefetched_tiles_go_unused(reference, store_dir, monkeypatch):
    """With a predictor that guesses wrong (the router's least likely experts), prefetched tiles go
    unused: `prefetch="auto"` pauses prefetching (always-on keeps issuing); with the real router, a
    prefetched tile that lands before its layer is used from its slot, even with no room for a cache.
    The tokens stay exact throughout."""
    from tilemem.runtime import tiered

    monkeypatch.setattr(tiered, "PREFETCH_WINDOW", 8)
    path, batch, _, ref_tokens = reference("olmoe")
    topo = Topology.from_config(Checkpoint.open(path).config, "fp32")

    def wrong(ex, layer, x):
        gate = ex.blocks[layer].gate
        return set(torch.topk(-gate.logits(x), gate.cfg.top_k, dim=-1)[1].unique().tolist())

    counters = {}
    for name, mode, predictor in [("auto-wrong", "auto", wrong), ("on-wrong", True, wrong), ("on-router", True, None)]:
        llm = LLM(
            path,
            dtype="fp32",
            budget=f"cpu={topo.non_expert_bytes}B",  # every tile on disk, staging slots only
            tile=16,
            store=store_dir("olmoe", 16),
            runtime=TieredConfig(prefetch=mode, io_depth=4),
        )
        ex = llm.tiered
        if predictor is not None:
            monkeypatch.setattr(ex, "_predict", lambda layer, x, ex=ex: wrong(ex, layer, x))
        try:
            assert ex.cache.capacity == 0
            for _ in range(2):
                assert [o.token_ids for o in llm.generate(batch, GREEDY)] == ref_tokens
            counters[name] = ex.counters
            assert ex.counters.prefetch_issued > 0
        finally:
            ex.close()
    auto, on = counters["auto-wrong"], counters["on-wrong"]
    # The predictor is wrong: judged over the always-on run's many prefetches (auto's handful is too few to
    # judge; how many of them land in time to be used depends on the I/O threads' timing).
    assert on.prefetch_used < tiered.PREFETCH_MIN_USE * on.prefetch_issued
    assert auto.prefetch_paused > 0 and on.prefetch_paused == 0 and auto.prefetch_issued < on.prefetch_issued
    assert counters["on-router"].prefetch_used > 0  # landed prefetches were used although nothing is cached


def test_a_landed_prefetch_waits_for_its_layer_even_without_cache_room(reference, store_dir):
    """A prefetched tile that lands before its layer runs is held in its slot and used by the layer,
    not offered to a full (here: zero-sized) cache and read again."""
    path, *_ = reference("olmoe")
    topo = Topology.from_config(Checkpoint.open(path).config, "fp32")
    llm = LLM(
        path,
        dtype="fp32",
        budget=f"cpu={topo.non_expert_bytes}B",
        tile=16,
        store=store_dir("olmoe", 16),
        runtime=TieredConfig(prefetch=True, io_depth=4),
    )
    ex = llm.tiered
    try:
        assert ex.cache.capacity == 0
        first, nxt = sorted(ex.blocks)[:2]
        x = torch.randn(1, topo.hidden_size, generator=torch.Generator().manual_seed(1))
        weights, ids = ex.blocks[first].gate(x)
        ex(first, x, weights, ids)  # prefetches `nxt`'s predicted tiles (as many as spare slots allow)
        for fut, _, _ in list(ex.prefetching.values()):
            fut.result()
        ex._harvest_prefetches()
        held = set(ex.landed)
        assert held and not ex.cache.entries and all(t[0] == nxt for t in held)
        ex.config = replace(ex.config, prefetch=False)  # count only the demand reads of `nxt` below
        before, used = ex.counters.disk_bytes, ex.counters.prefetch_used
        weights, ids = ex.blocks[nxt].gate(x)  # the prediction was made from this very x: it is exact
        needed = {(nxt, e, t.start): t for e in ids[0].tolist() for t in ex.on_disk[(nxt, e)]}
        assert held <= set(needed)
        got = ex(nxt, x, weights, ids)
        assert ex.counters.prefetch_used - used == len(held) and not held & set(ex.landed)
        assert ex.counters.disk_bytes - before == sum(t.padded for tid, t in needed.items() if tid not in held)
        resident = LLM(path, dtype="fp32").model.moe_blocks()[nxt].executor
        assert rel_err(got, resident(nxt, x, weights, ids)) < 1e-5
    finally:
        ex.close()
