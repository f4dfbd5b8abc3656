"""The GPU: the model on CUDA matches transformers there, and plans with a `cuda` tier compute their
tiles on the GPU (the rest on the host, or shipped over for large token groups) while the output stays
the all-resident output. Skipped without a CUDA device: CI has none; run them where one is."""

from __future__ import annotations

import pytest
import torch
from test_parity import FAMILIES, check_bf16_greedy, check_fp32_parity, rel_err
from test_tiered_exactness import GREEDY, forward_logits, prompts

from tilemem.engine.llm import LLM
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.placement.tiles import always_active_ffns, routed_ffns
from tilemem.runtime.setup import make_plan
from tilemem.runtime.tiered import TieredConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MiB = 1 << 20


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_fp32_matches_transformers(family, make_ckpt):
    check_fp32_parity(make_ckpt(family, "fp32", routing_skew=1.0), "cuda")


@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bf16_greedy_agrees_with_transformers(family, make_ckpt):
    check_bf16_greedy(make_ckpt(family, "bf16", routing_skew=1.0), "cuda")


# (family, policy, cuda share, cpu share of the FFN bytes, tile, gpu_min_tokens); the rest is on disk.
# gpu_min_tokens 1 ships every host tile to the GPU, 10**6 computes them all on the host.
CASES = [
    ("olmoe", "kt_expert", 0.3, 0.3, "16", 10**6),
    ("olmoe", "tilepo_fine", 0.3, 0.3, "16", 1),
    ("mixtral", "tilepo_adaptive", 0.5, 0.0, "full", 4),
    ("qwen2_moe", "tilepo_hybrid", 0.2, 0.5, "16", 10**6),
    ("qwen3_moe", "uniform", 1.0, 0.0, "16", 1),
    ("deepseek_v2", "tilepo_coarse", 0.0, 0.5, "16", 1),
    ("deepseek_v3", "tilepo_fine", 0.4, 0.2, "full", 10**6),
]


def cuda_plan_llm(path, policy, cuda_share, cpu_share, tile, gpu_min_tokens, store):
    ckpt = Checkpoint.open(path)
    topo = Topology.from_config(ckpt.config, "fp32")
    width = topo.layers[topo.moe_layers[0]].expert_intermediate
    tile = width if tile == "full" else int(tile)
    ffn = topo.routed_expert_bytes + topo.shared_and_dense_bytes
    budget = f"cuda={topo.non_expert_bytes + int(cuda_share * ffn)}B,cpu={int(cpu_share * ffn) + 1}B"
    plan = make_plan(ckpt, budget, policy, None, tile, dtype="fp32")
    runtime = TieredConfig(gpu_min_tokens=gpu_min_tokens)
    return LLM(path, dtype="fp32", plan=plan, store=store, tile=tile, runtime=runtime), plan


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_tier_matches_resident(case, make_ckpt, tmp_path):
    family, policy, cuda_share, cpu_share, tile, gpu_min_tokens = case
    path = make_ckpt(family, "fp32", routing_skew=1.0)
    resident = LLM(path, dtype="fp32", device="cuda")
    batch = prompts(resident.config.vocab_size)
    ref_tokens = [o.token_ids for o in resident.generate(batch, GREEDY)]
    ref_logits = forward_logits(resident.model, batch, ref_tokens)
    del resident
    llm, plan = cuda_plan_llm(path, policy, cuda_share, cpu_share, tile, gpu_min_tokens, tmp_path / "store")
    try:
        ex = llm.tiered
        cuda_tiles = sum(1 for t in plan.tiles_in("cuda") if t.group == "gate_up")  # routed, shared, dense
        assert llm.model.device.type == "cuda" and ex.device.type == "cuda"
        assert all(s.gate_up.is_cuda and s.down_t.is_cuda for s in ex.slabs.values())
        assert all(not b.is_cuda for blocks in ex.resident.values() for b in blocks)
        # The slabs hold exactly the plan's VRAM ranges cut into store tiles (whole-expert plans too).
        size, topo = ex.store.tile_size, plan.topology
        units = routed_ffns(topo) + always_active_ffns(topo)
        spans = [r for layer, e in units for r in plan.resident_ranges(layer, e).get("cuda", [])]
        want = sum(-(-(b - a) // size) for a, b in spans)
        assert (want > 0) == (cuda_tiles > 0)
        assert sum(s.gate_up.shape[0] for s in ex.slabs.values()) == want
        assert (ex.gpu_bytes > 0) == (cuda_tiles > 0)
        ours = forward_logits(llm.model, batch, ref_tokens)
        for i, (a, b) in enumerate(zip(ours, ref_logits, strict=True)):
            assert rel_err(a, b) < 1e-4, f"logits block {i}: rel err {rel_err(a, b):.2e}"
        outs = llm.generate(batch, GREEDY)
        assert [o.token_ids for o in outs] == ref_tokens
        c = ex.counters
        assert (c.gpu_bytes > 0) == (cuda_tiles > 0)
        host_tiles = bool(plan.tiles_in("cpu") or plan.tiles_in("disk"))
        if gpu_min_tokens == 1 and host_tiles:
            assert c.h2d_bytes > 0  # host tiles were shipped to the GPU
        if gpu_min_tokens > 1000:
            assert c.h2d_bytes == 0
    finally:
        llm.tiered.close()


def test_cuda_budget_holds(make_ckpt, tmp_path):
    """VRAM taken by loading a tiered model stays within the plan's cuda budget plus the rope tables
    and a fixed 8 MiB."""
    path = make_ckpt("olmoe", "fp32", preset="small")
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    llm, plan = cuda_plan_llm(path, "tilepo_fine", 0.3, 0.3, "16", 32, tmp_path / "store")
    try:
        used = torch.cuda.memory_allocated() - before
        topo = plan.topology
        cuda = plan.usage("cuda")
        assert llm.tiered.gpu_bytes <= cuda.tiles
        rope = sum(b.numel() * b.element_size() for b in llm.model.rope.buffers())
        assert used <= cuda.capacity + rope + 8 * MiB
        assert llm.tiered.gpu_bytes > 0 and used > topo.non_expert_bytes  # tiles really went to the GPU
    finally:
        llm.tiered.close()
