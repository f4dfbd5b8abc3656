"""The DRAM budget holds: during generation, during async migration, and in process RSS.

Accounting (what the plan's `cpu` budget C must cover): the non-expert weights N, the FFN tiles resident
in DRAM (routed experts, shared experts and dense FFN layers S alike: the plan places them all) and the
tile cache slab. The stated fixed overhead beyond the budget is the staging slots for reads in flight:
io_depth slots of one (padded) store tile each, which the runtime needs even when the plan leaves no
room for a cache. So at every moment: resident_bytes + slab.nbytes <= C - N + io_depth * slot_bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.registry import families
from tilemem.models.topology import Topology, is_ffn_weight
from tilemem.placement.policies import policy_names
from tilemem.runtime.setup import make_plan
from tilemem.runtime.tiered import TieredConfig
from tilemem.runtime.tile_store import convert

FAMILIES = sorted(families())
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
MiB = 1 << 20


def prompts(vocab: int, lens=(13, 7, 4), seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lens]


def topology(path) -> Topology:
    return Topology.from_config(Checkpoint.open(path).config, "fp32")


class BudgetSpy:
    """Samples the executor's DRAM use after every MoE layer, every step-boundary migration and every
    promotion read by the planner thread (whose blocks exist before the engine swaps them in)."""

    def __init__(self, llm: LLM) -> None:
        self.ex = ex = llm.tiered
        self.samples: list[tuple[str, int]] = []
        self.overfull: list[str] = []
        self.lock = threading.Lock()

        def layer_call(layer, x, weights, ids):
            out = ex(layer, x, weights, ids)
            self.sample("layer")
            c = ex.cache
            if len(c.entries) > c.capacity:
                self.overfull.append(f"{len(c.entries)} cached tiles > capacity {c.capacity}")
            if len(c.slab.free) + len(c.entries) + len(ex.prefetching) > c.slab.slots:
                self.overfull.append("a slab slot is counted twice")
            return out

        llm.model.set_executor(layer_call)
        if ex.step_hook is not None:
            hook = ex.step_hook

            def step_hook():
                hook()
                self.sample("migration")

            ex.step_hook = step_hook
        load = ex.load_blocks

        def load_blocks(key, ranges):
            blocks = load(key, ranges)
            self.sample("promotion read", sum(b.numel() * b.element_size() for b in blocks))
            return blocks

        ex.load_blocks = load_blocks

    def sample(self, what: str, extra: int = 0) -> None:
        with self.lock:
            self.samples.append((what, self.ex.resident_bytes + self.ex.cache.slab.nbytes + extra))

    def peak(self, what: str | None = None) -> int:
        return max(v for w, v in self.samples if what is None or w == what)


def drive_migrations(llm: LLM, batch: list[list[int]], rounds: int = 2) -> list[list[list[int]]]:
    """Re-plan `rounds` times from live routing (planner thread) while the engine generates; returns
    every generation's tokens."""
    rp = llm.replanner
    rp.stop()  # drive re-planning by hand: deterministic, and no idle re-plans
    rp.stop_event.clear()
    outs = [[o.token_ids for o in llm.generate(batch, GREEDY)]]
    for _ in range(rounds):
        t = threading.Thread(target=rp.replan_once)
        t.start()
        outs.append([o.token_ids for o in llm.generate(batch, GREEDY)])  # also routing for the next round
        while t.is_alive():  # the engine applies migrations between its steps
            outs.append([o.token_ids for o in llm.generate(batch, GREEDY)])
        t.join()
    outs.append([o.token_ids for o in llm.generate(batch, GREEDY)])
    return outs


@pytest.mark.parametrize("family", FAMILIES)
def test_dram_use_stays_within_budget_during_generation_and_migration(family, make_ckpt, tmp_path):
    path = make_ckpt(family, "fp32", routing_skew=1.0)
    topo = topology(path)
    i = FAMILIES.index(family)
    adaptive = [p for p in policy_names() if p != "uniform"]  # uniform ignores routing: nothing to migrate
    policy = adaptive[i % len(adaptive)]
    S, R, N = topo.shared_and_dense_bytes, topo.routed_expert_bytes, topo.non_expert_bytes
    C = N + S + int(0.5 * R)  # room for the shared/dense FFNs and half the routed experts
    cache = f"cpu={int(0.15 * R)}B" if i % 2 else None  # with and without a cache reserve
    plan = make_plan(Checkpoint.open(path), f"cpu={C}B", policy, None, 16, cache=cache, dtype="fp32")
    assert plan.usage("cpu").capacity == C
    io_depth = 2 + i % 3
    llm = LLM(
        path,
        dtype="fp32",
        plan=plan,
        store=tmp_path / "store",
        runtime=TieredConfig(io_depth=io_depth, prefetch=True),
        async_planning=True,
        replan_interval_s=3600,
    )
    try:
        ex = llm.tiered
        staging = io_depth * ex.cache.slab.slot_bytes
        limit = C - N + staging  # every FFN tile (routed, shared, dense) and the cache share the budget
        spy = BudgetSpy(llm)
        spy.sample("start")
        ref = LLM(path, dtype="fp32")
        batch = prompts(llm.config.vocab_size)
        want = [o.token_ids for o in ref.generate(batch, GREEDY)]
        for tokens in drive_migrations(llm, batch):
            assert tokens == want
        stats = llm.replanner.stats
        assert stats.replans == 2 and stats.promoted > 0 and stats.demoted > 0, stats
        assert spy.peak("migration") > 0 and spy.peak("promotion read") > 0
        assert not spy.overfull, spy.overfull[:3]
        worst = max(spy.samples, key=lambda s: s[1])
        assert worst[1] <= limit, f"{worst[0]}: {worst[1]} B of FFN tiles + cache > {limit} B allowed"
        assert stats.peak_resident_bytes + ex.cache.slab.nbytes <= limit
        assert llm.replanner.resident_budget + ex.cache.slab.nbytes <= limit
    finally:
        llm.replanner.stop()
        llm.tiered.close()


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_budget_extremes_and_explicit_cache_size(family, make_ckpt, tmp_path):
    path = make_ckpt(family, "fp32", routing_skew=1.0)
    topo = topology(path)
    N, S, R = topo.non_expert_bytes, topo.shared_and_dense_bytes, topo.routed_expert_bytes
    store = tmp_path / "store"
    batch = prompts(512)

    # Only the non-expert weights: no routed tile resident, the slab is just the staging slots.
    llm = LLM(path, dtype="fp32", budget=f"cpu={N}B", policy="tilepo_fine", tile=16, store=store)
    ex = llm.tiered
    assert ex.resident_bytes == 0 and ex.cache.capacity == 0
    assert ex.cache.slab.nbytes == ex.config.io_depth * ex.cache.slab.slot_bytes
    llm.generate(batch, GREEDY)
    assert llm.stats().runtime["disk_bytes"] > 0
    assert ex.resident_bytes == 0 and not ex.cache.entries  # nothing to keep: every read was staged
    ex.close()

    # Everything fits: no tile on disk, nothing read.
    llm = LLM(path, dtype="fp32", budget=f"cpu={N + S + R}B", policy="kt_expert", tile=16, store=store)
    assert not any(llm.tiered.on_disk.values()) and llm.tiered.resident_bytes == R + S
    llm.generate(batch, GREEDY)
    assert llm.stats().runtime["disk_bytes"] == 0
    llm.tiered.close()

    # An explicit cache size beyond what the plan leaves free is cut to it (the budget covers the cache).
    C = N + S + R // 3
    runtime = TieredConfig(cache_bytes=64 * MiB, io_depth=2)
    llm = LLM(path, dtype="fp32", budget=f"cpu={C}B", policy="tilepo_fine", tile=16, store=store, runtime=runtime)
    ex = llm.tiered
    room = C - N - llm.plan.usage("cpu").tiles
    assert ex.config.cache_bytes == room
    assert ex.resident_bytes + ex.cache.slab.nbytes <= C - N + 2 * ex.cache.slab.slot_bytes
    ex.close()


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
@pytest.mark.parametrize("room", [0.0, 0.4])
def test_shared_and_dense_ffns_follow_the_plan(family, room, make_ckpt, tmp_path):
    """Shared-expert and dense FFNs are tiles like the routed experts: resident in DRAM as far as the
    plan puts them there, read from the store otherwise; the checkpoint's copies are never loaded."""
    path = make_ckpt(family, "fp32", routing_skew=1.0)
    topo = topology(path)
    assert topo.shared_and_dense_bytes > 0
    budget = topo.non_expert_bytes + int(room * (topo.shared_and_dense_bytes + topo.routed_expert_bytes))
    llm = LLM(path, dtype="fp32", budget=f"cpu={budget}B", tile=16, store=tmp_path / "s")
    try:
        ex = llm.tiered
        planned = sum(t.total_bytes for t in llm.plan.tiles if t.tier == "cpu" and t.expert < 0)
        loaded = sum(
            p.numel() * p.element_size()
            for name, p in llm.model.named_parameters()
            if is_ffn_weight(name) and ".experts." not in name and p.device.type != "meta"
        )
        assert loaded == 0, f"{loaded} B of shared/dense FFN weights loaded from the checkpoint"
        tiles = sum(
            b.numel() * b.element_size() for (_, unit), blocks in ex.resident.items() if unit < 0 for b in blocks
        )
        assert tiles == planned
        on_disk = sum(t.nbytes for (_, unit), ts in ex.on_disk.items() if unit < 0 for t in ts)
        assert tiles + on_disk == topo.shared_and_dense_bytes
        if room == 0.0:
            assert tiles == 0
        batch = prompts(llm.config.vocab_size)
        want = [o.token_ids for o in LLM(path, dtype="fp32").generate(batch, GREEDY)]
        assert [o.token_ids for o in llm.generate(batch, GREEDY)] == want
        assert llm.stats().runtime["disk_bytes"] > 0 or on_disk == 0
    finally:
        ex.close()


RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    def status():
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    path, warmup, store, budget = sys.argv[1:5]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    # Warm up on a tiny model: lazy imports, kernel and allocator set-up are not the model's memory.
    w = LLM(warmup, dtype="bf16")
    w.generate([[5, 6, 7, 8], [9, 10]], params)
    del w
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        peak_key = "VmHWM"
    except OSError:
        peak_key = "VmRSS"
    before = status()
    if budget == "resident":
        llm = LLM(path, dtype="bf16")
    else:
        llm = LLM(path, dtype="bf16", budget=budget, policy="tilepo_fine", tile=64, store=store)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, llm.config.vocab_size, (n,), generator=gen).tolist() for n in (24, 16, 8)]
    tokens = [o.token_ids for o in llm.generate(prompts, params)]
    first = status()
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompts, params)] == tokens
    last = status()
    ex = llm.tiered
    print(json.dumps({
        "growth": first[peak_key] - before["VmRSS"],
        "anon_growth": first["RssAnon"] - before["RssAnon"],
        "file_growth": first["RssFile"] - before["RssFile"],
        "later_growth": last[peak_key] - first[peak_key],
        "kv": llm._engine.cache.nbytes(),
        "resident": ex.resident_bytes if ex else None,
        "slab": ex.cache.slab.nbytes if ex else None,
        "staging": ex.config.io_depth * ex.cache.slab.slot_bytes if ex else None,
        "tokens": tokens,
    }))
    """
)


def measure_rss(path, warmup, store, budget: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), str(warmup), str(store), budget],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rss_growth_of_a_larger_model_stays_within_budget(make_ckpt, tmp_path):
    """olmoe `small` (235 MB bf16) under 35% of its expert bytes, each run in a fresh process.

    Bound: RSS growth <= C (non-expert weights + 35% of experts) + KV cache + staging slots + the
    compute overhead the all-resident run shows beyond its weights (activations, allocator; measured
    as its anonymous-memory growth) + 64 MiB slack (allocator fragmentation, I/O threads)."""
    path = make_ckpt("olmoe", "bf16", preset="small", routing_skew=1.0)
    warmup = make_ckpt("olmoe", "bf16")
    topo = Topology.from_config(Checkpoint.open(path).config, "bf16")
    C = topo.non_expert_bytes + int(0.35 * topo.routed_expert_bytes)
    store = tmp_path / "store"
    convert(path, store, tile_size=64, progress=False)  # here, so conversion's reads are not measured

    tiered = measure_rss(path, warmup, store, f"cpu={C}B")
    resident = measure_rss(path, warmup, store, "resident")
    assert tiered["tokens"] == resident["tokens"]
    assert tiered["resident"] <= 0.35 * topo.routed_expert_bytes
    overhead = max(resident["anon_growth"], 0)
    bound = C + tiered["kv"] + tiered["staging"] + overhead + 64 * MiB
    detail = {k: v for k, v in tiered.items() if k != "tokens"} | {"bound": bound, "resident_run": resident["growth"]}
    assert tiered["growth"] <= bound, detail
    # The budget is what makes the difference: the resident run maps (nearly) every expert.
    assert tiered["growth"] < resident["growth"] - 32 * MiB, detail
    # Repeated generation does not grow memory (no leak of slots, blocks or buffers).
    assert tiered["later_growth"] <= 8 * MiB, detail
