"""Default = fit (`tilemem.engine.fit`): with no --budget or --plan, a model that fits its memory limit
runs all resident; one that does not is planned automatically, within the limit, and says so; one whose
non-expert weights alone do not fit stops with the numbers."""

from __future__ import annotations

import resource
from functools import partial

import pytest
from test_memory_limit import fake_tree

from tilemem import memlimit
from tilemem.engine import fit
from tilemem.engine.args import EngineArgs
from tilemem.errors import BudgetError
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.tmap.auto import SAFETY_MARGIN, kv_reserve

RSS = 100 << 20  # the fake tree's VmRSS
CONTEXT = 64


@pytest.fixture
def olmoe(make_ckpt, tmp_path, monkeypatch):
    """The tiny checkpoint, its topology, and a machine that is huge, unlimited and without a GPU (only
    --memory-limit limits it)."""
    monkeypatch.delenv("TILEMEM_FAKE_RAM", raising=False)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY,) * 2)
    measure = partial(memlimit.memory_limit, root=fake_tree(tmp_path / "root", available=64 << 30))
    monkeypatch.setattr(memlimit, "memory_limit", measure)
    monkeypatch.setattr(fit, "memory_limit", measure)
    monkeypatch.setattr(memlimit.sysinfo, "gpu", lambda: None)
    ckpt = Checkpoint.open(make_ckpt("olmoe"))
    return ckpt, Topology.from_config(ckpt.config, "fp32")


def cap_for(topo: Topology, resident: int) -> int:
    """The --memory-limit under which `resident` bytes plus the KV cache just fit after the margin."""
    return int((resident + kv_reserve(topo, CONTEXT, 1)) / (1 - SAFETY_MARGIN)) + RSS + 1


def test_a_model_that_fits_runs_all_resident(olmoe, capsys):
    ckpt, topo = olmoe
    args = EngineArgs(ckpt.path, dtype="fp32", memory_limit=str(cap_for(topo, topo.total_bytes)))
    assert fit.default_plan(args, ckpt, CONTEXT) is None
    assert "planning automatically" not in capsys.readouterr().out


def test_a_model_larger_than_its_limit_is_planned_within_it_and_says_so(olmoe):
    ckpt, topo = olmoe
    experts = topo.total_bytes - topo.non_expert_bytes
    cap = cap_for(topo, topo.non_expert_bytes + experts // 2)
    lines: list[str] = []
    args = EngineArgs(ckpt.path, dtype="fp32", memory_limit=str(cap), tile=16)
    plan = fit.default_plan(args, ckpt, CONTEXT, log=lines.append)
    assert plan is not None and plan.tiles_in("disk")
    cpu = plan.usage("cpu")
    assert topo.non_expert_bytes < cpu.used <= cpu.capacity <= (cap - RSS) * (1 - SAFETY_MARGIN)
    assert len(lines) == 1 and "planning automatically (--budget auto --policy auto)" in lines[0]
    assert "(--memory-limit " in lines[0] and f"KV cache ({CONTEXT} tokens)" in lines[0]
    # a policy given on the command line is kept
    args = EngineArgs(ckpt.path, dtype="fp32", memory_limit=str(cap), tile=16, policy="kt_expert")
    plan = fit.default_plan(args, ckpt, CONTEXT, log=lines.append)
    assert plan.policy == "kt_expert" and "--policy kt_expert" in lines[-1]


def test_too_small_for_the_non_expert_weights_stops_with_the_numbers(olmoe):
    ckpt, topo = olmoe
    cap = cap_for(topo, topo.non_expert_bytes) - 2 * kv_reserve(topo, CONTEXT // 2, 1)  # room for ~CONTEXT/2 tokens
    args = EngineArgs(ckpt.path, dtype="fp32", memory_limit=str(cap))
    with pytest.raises(BudgetError, match=r"cannot run within memory limit .* non-expert weights \+ .* KV cache") as e:
        fit.default_plan(args, ckpt, CONTEXT)
    tokens = int(str(e.value).split("--max-model-len ")[1].split(",")[0])
    assert 0 < tokens < CONTEXT
    assert kv_reserve(topo, tokens, 1) + topo.non_expert_bytes <= (cap - RSS) * (1 - SAFETY_MARGIN)


def test_the_server_reserves_kv_for_every_slot(olmoe, monkeypatch):
    """The server allocates `max_batch` full-length KV slots up front, so default = fit counts all of them: a
    model that fits all resident with one sequence's cache is planned when 2 are reserved, and a limit that
    cannot hold 8 caches beside the non-expert weights names --max-batch among the fixes; `create_app`
    builds with its max_batch."""
    ckpt, topo = olmoe
    cap = cap_for(topo, topo.total_bytes)  # all resident with one sequence's KV cache, not with two
    args = EngineArgs(ckpt.path, dtype="fp32", memory_limit=str(cap), tile=16)
    assert fit.default_plan(args, ckpt, CONTEXT) is None
    lines: list[str] = []
    plan = fit.default_plan(args, ckpt, CONTEXT, log=lines.append, sequences=2)
    assert plan is not None and f"KV cache ({CONTEXT} tokens x 2 sequences)" in lines[0]
    assert plan.usage("cpu").capacity <= (cap - RSS - kv_reserve(topo, CONTEXT, 2)) * (1 - SAFETY_MARGIN)
    tight = cap_for(topo, topo.non_expert_bytes)
    args = EngineArgs(ckpt.path, dtype="fp32", memory_limit=str(tight))
    with pytest.raises(BudgetError, match=r"x 8 sequences.*a smaller --max-batch"):
        fit.default_plan(args, ckpt, CONTEXT, sequences=8)

    from tilemem.engine.llm import LLM
    from tilemem.server.app import create_app
    from tilemem.server.config import ServerConfig

    seen = []
    monkeypatch.setattr(LLM, "_setup", lambda self, a, kv_sequences=1: seen.append(kv_sequences) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        create_app(args, ServerConfig(max_batch=3))
    assert seen == [3]


def test_llm_with_only_a_memory_limit_runs_tiered_and_matches_all_resident(olmoe, tmp_path, capsys):
    from tilemem.engine.llm import LLM
    from tilemem.engine.sampling import SamplingParams

    ckpt, topo = olmoe
    experts = topo.total_bytes - topo.non_expert_bytes
    cap = cap_for(topo, topo.non_expert_bytes + experts // 3)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    small = LLM(ckpt.path, dtype="fp32", memory_limit=str(cap), max_model_len=CONTEXT, tile=16, store=tmp_path / "s")
    assert small.tiered is not None and "planning automatically" in capsys.readouterr().out
    resident = LLM(ckpt.path, dtype="fp32", max_model_len=CONTEXT)
    assert resident.tiered is None
    prompt = [1, 2, 3, 4, 5]
    assert small.generate(prompt, greedy)[0].token_ids == resident.generate(prompt, greedy)[0].token_ids


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "q4_k_m"])
def test_the_kv_reserve_is_the_kv_cache_whatever_the_weights_format(fmt, tmp_path):
    """The KV cache holds activations (bf16): its reserve is the cache's bytes for an FP8 or GGUF model too, not
    the quantized k/v weights' bytes over the hidden size (FP8 was 2x, Q4_K ~3.5x too small), and a saved plan
    keeps the widths it is counted from."""
    from tilemem.artifacts.mir import build_artifacts, plan_from_artifacts
    from tilemem.engine.llm import LLM
    from tilemem.runtime.setup import _topology, default_tile, make_plan
    from tilemem.synth.gguf_writer import synthesize_gguf
    from tilemem.synth.writer import synthesize

    if fmt == "q4_k_m":
        path = synthesize_gguf("olmoe", "tiny", tmp_path / "m.gguf", "q4_k_m", progress=False)
    else:
        path = synthesize("olmoe", "tiny", tmp_path / "m", dtype=fmt, progress=False)
    ckpt = Checkpoint.open(path)
    topo, _ = _topology(ckpt, None)
    llm = LLM(path, dtype="bf16")
    block = 16
    assert kv_reserve(topo, 64 * block, 1) == 64 * llm.model.kv_block_bytes(block)
    # a plan saved before the widths counts them from bytes: right for plain and FP8 weights, not GGUF blocks
    stale = Topology(**{**topo.__dict__, "kv_widths": ()})
    assert (kv_reserve(stale, 1024, 1) == kv_reserve(topo, 1024, 1)) == (fmt != "q4_k_m")
    plan = make_plan(ckpt, "cpu=1GiB", "tilepo_fine", None, default_tile(ckpt))
    assert plan_from_artifacts(*build_artifacts(plan)).topology.kv_widths == topo.kv_widths
