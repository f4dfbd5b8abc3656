"""The bench's measured hit rate is the decode steps' (as its decode tok/s and TMAP's prediction are): a fresh
engine's prefill reads every disk tile it routes to cold, which would pull the rate down."""

from __future__ import annotations

from tilemem.bench.runner import run_once
from tilemem.engine.llm import LLM
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.runtime.setup import make_plan


def test_bench_hit_rate_counts_the_decode_steps(make_ckpt, tmp_path):
    path = make_ckpt("olmoe", "fp32", routing_skew=1.0)
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config, "fp32")
    routed = topo.routed_expert_bytes
    budget = topo.non_expert_bytes + topo.shared_and_dense_bytes + routed // 2
    plan = make_plan(ckpt, f"cpu={budget}B", "kt_expert", tile=16, cache=f"cpu={routed // 4}B", dtype="fp32")
    llm = LLM(path, dtype="fp32", plan=plan, store=tmp_path / "s")
    try:
        got = run_once(llm, list(range(3, 40)), 24)
        steps = llm.stats().steps
        decode = [s for s in steps if not s["prefill"]]
        hits, misses = sum(s["hits"] for s in decode), sum(s["misses"] for s in decode)
        assert hits > 0 and any(s["misses"] for s in steps if s["prefill"])  # the case this is about
        assert got["hit_rate"] == hits / (hits + misses)
        assert got["hit_rate"] > llm.stats().runtime["hit_rate"]  # the whole call's, prefill included
    finally:
        llm.close()
