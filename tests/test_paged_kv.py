"""The paged KV cache, prefix caching and preemption: block bookkeeping, the paged layout's reads and writes,
and generation through the engine compared with the slot cache's forward passes and with cold runs."""

from __future__ import annotations

import random

import pytest
import torch

from tilemem.engine.kv_blocks import ROOT, BlockPool, block_hash
from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.errors import ConfigError
from tilemem.layers.kv_cache import ForwardContext, KVCache

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0)


# -- the block pool -----------------------------------------------------------------------------------
def test_pool_hands_out_and_takes_back_blocks():
    pool = BlockPool(4, 16)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.available == 1
    assert pool.allocate(2) is None and pool.available == 1  # nothing taken on failure
    pool.release(a)
    assert pool.available == 4 and pool.used == 0
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([a[0]])


def test_prefix_match_follows_the_chain_and_leaves_a_token_to_compute():
    pool = BlockPool(8, 4)
    tokens = list(range(100, 113))  # 13 tokens: 3 full blocks
    blocks = pool.allocate(4)
    parent = ROOT
    for i in range(3):
        parent = block_hash(parent, tokens[4 * i : 4 * i + 4])
        pool.register(blocks[i], parent)
    found, hashes = pool.match(tokens)
    assert found == blocks[:3] and len(hashes) == 3
    assert pool.match(tokens[:12])[0] == blocks[:2]  # 12 tokens: the last block is computed, not reused
    assert pool.match([0] + tokens[1:])[0] == []  # a different first token: no block matches
    other = tokens[:4] + [7, 7, 7, 7] + tokens[8:]
    assert pool.match(other)[0] == blocks[:1]  # the chain: block 2 never matches after a different block 1


def test_released_cached_blocks_are_evicted_least_recently_released_first():
    pool = BlockPool(3, 2)
    a, b = pool.allocate(1), pool.allocate(1)
    pool.register(a[0], block_hash(ROOT, [1, 2]))
    pool.register(b[0], block_hash(ROOT, [3, 4]))
    pool.release(b)
    pool.release(a)  # a released last: b goes first
    assert pool.available == 3 and pool.cached == 2
    pool.hold(pool.match([3, 4, 5])[0])  # b taken again: a is the only evictable one
    assert pool.allocate(2) == [2, a[0]] and pool.stats.evictions == 1
    assert pool.match([1, 2, 9])[0] == [] and pool.match([3, 4, 9])[0] == b


# -- the paged layout -----------------------------------------------------------------------------------
def test_paged_reads_and_writes_equal_the_slot_layout():
    torch.manual_seed(0)
    slot = KVCache.allocate(1, 3, 40, 2, 8, 8, torch.float32)
    paged = KVCache.paged(1, 18, 4, 2, 8, 8, torch.float32)
    tables = [[5, 2, 9, 0, 11, 7, 3, 1, 4, 13], [6, 8, 10, 12, 14, 15], [17, 16]]  # shuffled, not in row order
    starts, lengths = [0, 0, 0], [37, 23, 5]
    k, v = torch.randn(3, 2, 37, 8), torch.randn(3, 2, 37, 8)  # [B, H, T, D]
    for _step in range(2):  # a prefill, then one decode token on top
        ctx_s = ForwardContext.build(slot, [0, 1, 2], starts, lengths)
        ctx_p = ForwardContext.paged(paged, tables, starts, lengths)
        t = max(lengths)
        ks, vs = ctx_s.store(0, k[:, :, :t], v[:, :, :t])
        kp, vp = ctx_p.store(0, k[:, :, :t], v[:, :, :t])
        mask = ctx_s.mask[:, 0, -1]  # [B, L] the keys the last query of each row sees
        for b in range(3):
            n = int(mask[b].sum())
            assert torch.equal(ks[b, :, :n], kp[b, :, :n]) and torch.equal(vs[b, :, :n], vp[b, :, :n])
        starts, lengths = [s + n for s, n in zip(starts, lengths, strict=True)], [1, 1, 1]
        k, v = torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)


def test_a_block_table_too_short_is_refused():
    cache = KVCache.paged(1, 4, 4, 1, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="cannot hold 9 positions"):
        ForwardContext.paged(cache, [[0, 1]], [0], [9])
    with pytest.raises(ValueError, match="outside the cache's 4 blocks"):
        ForwardContext.paged(cache, [[0, 4]], [0], [5])


# -- the engine -----------------------------------------------------------------------------------------
def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and logits [V] of each step from the model's forward on a slot cache (no engine)."""
    cache = model.allocate_cache(1, len(prompt) + steps + 1)
    ids, start, tokens, logits = prompt, 0, [], []
    for _ in range(steps):
        ctx = ForwardContext.build(cache, [0], [start], [len(ids)])
        out = model(torch.tensor([ids]), ctx, logits_at=torch.tensor([len(ids) - 1]))[0]  # [V]
        start += len(ids)
        tokens.append(int(out.argmax()))
        logits.append(out)
        ids = [tokens[-1]]
    return tokens, logits


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_engine_equals_the_slot_cache_forward(make_ckpt, family):
    llm = LLM(make_ckpt(family), dtype="fp32", kv_block_size=4, prefill_chunk=7, max_batch=3)
    rng = random.Random(family)
    vocab = llm.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (13, 5, 22)]
    outs = llm.generate(prompts, greedy(6))
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, logits = reference_greedy(llm.model, prompt, 6)
        assert out.token_ids == tokens
        for lp, ref in zip(out.logprobs, logits, strict=True):
            assert lp == pytest.approx(float(torch.log_softmax(ref, -1).max()), abs=1e-4)
    llm.close()


@pytest.fixture(scope="module")
def olmoe(make_ckpt):
    return make_ckpt("olmoe")


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v32"])
def test_a_cached_prefix_gives_what_a_cold_run_gives(make_ckpt, family):
    path = make_ckpt(family)  # GQA, and MLA latents with DSA indexer keys
    rng = random.Random(1)
    history = [rng.randrange(500) for _ in range(50)]
    turn2 = history + [rng.randrange(500) for _ in range(9)]
    warm = LLM(path, dtype="fp32", kv_block_size=8)
    cold = LLM(path, dtype="fp32", kv_block_size=8, prefix_caching=False)
    first = warm.generate(history, greedy(8))[0]
    assert first.cached_tokens == 0
    second = warm.generate(turn2, greedy(8))[0]
    assert second.cached_tokens == 48  # 6 full blocks of the 50-token history
    assert warm.stats().prefill_tokens == len(turn2) - 48
    assert warm.stats().kv["prefix_hit_tokens"] == 48
    ref = cold.generate(turn2, greedy(8))[0]
    assert ref.cached_tokens == 0 and cold.stats().prefill_tokens == len(turn2)
    assert second.token_ids == ref.token_ids
    assert second.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    again = warm.generate(turn2, greedy(8))[0]  # the whole prompt is cached but its last block
    assert again.cached_tokens == 56 and again.token_ids == ref.token_ids
    for llm in (warm, cold):
        llm.close()


def test_preempted_sequences_resume_with_the_same_output(olmoe):
    rng = random.Random(2)
    prompts = [[rng.randrange(500) for _ in range(n)] for n in (40, 33, 47, 38)]
    free = LLM(olmoe, dtype="fp32", kv_block_size=8, max_batch=4)
    want = free.generate(prompts, greedy(24))
    assert free.stats().kv["preemptions"] == 0
    block = free.model.kv_block_bytes(8)
    tight = LLM(olmoe, dtype="fp32", kv_block_size=8, max_batch=4, max_model_len=96, kv_memory=14 * block)
    got = tight.generate(prompts, greedy(24))  # 4 x 64-71 tokens need 32+ blocks: 14 hold two at a time
    kv = tight.stats().kv
    assert kv["preemptions"] > 0 and kv["kv_blocks"] <= 14
    assert sum(o.preemptions for o in got) == kv["preemptions"]
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    for llm in (free, tight):
        llm.close()


def test_kv_memory_grows_with_tokens_in_use_and_never_past_the_budget(olmoe):
    llm = LLM(olmoe, dtype="fp32", kv_block_size=4, max_batch=2, max_model_len=64, prefix_caching=False)
    block = llm.model.kv_block_bytes(4)
    llm.close()
    budget = 40 * block
    llm = LLM(olmoe, dtype="fp32", kv_block_size=4, max_batch=2, max_model_len=64, kv_memory=budget)
    eng = llm.engine()
    assert eng.cache.nbytes() <= budget
    seqs = [llm._sequence([5] * 30, greedy(30)), llm._sequence([6] * 20, greedy(30))]
    for s in seqs:
        eng.add(s)
    used = []
    while eng.has_work():
        eng.step()
        kv = eng.kv_stats()
        held = sum(len(s.blocks) for s in seqs)
        assert kv["kv_blocks_used"] <= held and kv["kv_bytes"] <= budget
        used.append(kv["kv_blocks_used"])
    assert max(used) > used[0]  # it grew as the sequences did
    assert eng.kv_stats()["kv_blocks_used"] == 0  # and everything went back at the end
    llm.close()


def test_kv_memory_too_small_for_one_sequence_is_refused(olmoe):
    with pytest.raises(ConfigError, match="cannot hold one sequence of --max-model-len 64"):
        LLM(olmoe, dtype="fp32", max_model_len=64, kv_memory="1KiB").engine()


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v32", "glm_moe_dsa"])
def test_mla_caches_only_the_latent_and_the_rope_key(make_ckpt, family):
    llm = LLM(make_ckpt(family), dtype="fp32")
    cfg = llm.config
    cache = llm.model.allocate_paged(2, 16)
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert tuple(cache.keys[0].shape) == (2, 1, 16, latent) and cache.values[0].shape[-1] == 0
    index = cfg.index_head_dim if cfg.is_dsa else 0
    per_token = cfg.num_layers * (latent + index * (cfg.is_dsa and cfg.has_indexer(0))) * 4
    assert llm.model.kv_block_bytes(16) <= 16 * per_token * 2  # no per-head keys or values anywhere
    expanded = cfg.num_layers * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    assert llm.model.kv_block_bytes(16) < 16 * expanded
    llm.close()


def test_kv_memory_is_what_plans_keep_free(make_ckpt):
    from tilemem.engine.args import EngineArgs
    from tilemem.engine.build import kv_reservation
    from tilemem.loader.checkpoint import Checkpoint

    path = make_ckpt("olmoe")
    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    assert kv_reservation(EngineArgs(path, dtype="fp32"), ckpt, 256, 8) == (256, 8)
    args = EngineArgs(path, dtype="fp32", kv_memory=f"{1000 * per_token}B")
    assert kv_reservation(args, ckpt, 256, 8) == (1000, 1)
    with pytest.raises(ConfigError, match=r"kv_memory \(--kv-memory\) must be a positive byte size"):
        EngineArgs(path, kv_memory="lots")


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa"])
def test_latent_mla_decode_logits_match_transformers_in_bf16(make_ckpt, family):
    """bf16: the absorbed latent decode's logits at every step are within bf16 rounding of transformers' (which
    expands the keys and values), teacher-forced on transformers' own greedy tokens."""
    from test_parity import hf_greedy, hf_model, prompts, rel_err

    path = make_ckpt(family, "bf16", routing_skew=1.0)
    hf = hf_model(path, torch.bfloat16)
    llm = LLM(path, dtype="bf16", kv_block_size=4)
    prompt = prompts(llm.config.vocab_size, seed=2)[0]
    tokens, ref, _ = hf_greedy(hf, prompt, 8)  # [8, V] logits of each step
    cache = llm.model.allocate_paged(16, 4)
    table = list(range(15, -1, -1))  # blocks in reverse: not in position order
    ids, start = prompt, 0
    for step in range(8):
        ctx = ForwardContext.paged(cache, [table], [start], [len(ids)])
        logits = llm.model(torch.tensor([ids]), ctx, logits_at=torch.tensor([len(ids) - 1]))[0]
        assert rel_err(logits, ref[step]) < 0.03, f"step {step}"
        start += len(ids)
        ids = [tokens[step]]
    llm.close()


def test_latent_attention_off_the_cpu_kernel_equals_the_kernel():
    """MLA's latent attention with torch ops (what a GPU runs) equals the paged kernel's, dense and top-k."""
    from tilemem.kernels.paged import paged_attention
    from tilemem.layers.mla import MLAttention

    torch.manual_seed(0)
    mla = MLAttention.__new__(MLAttention)  # only its rank and scale are read
    mla.rank, mla.scale = 6, 0.3
    pool = torch.randn(10, 1, 4, 8)  # [N, 1, bs, R+dr]
    tables = torch.tensor([[3, 1, 7, 0], [9, 2, 0, 0]])
    lengths = torch.tensor([13, 6])
    q = torch.randn(2, 3, 8)
    for select in (None, torch.tensor([[0, 5, 12, -1], [1, 3, -1, -1]])):
        want = paged_attention(q, pool, pool[..., :6], tables, lengths, 0.3, select)
        got = mla._latent_gathered(q, pool, tables, lengths, select)
        assert torch.allclose(got, want, atol=1e-5)


def test_a_sequence_longer_than_the_whole_kv_budget_fails_alone_with_an_event(olmoe):
    """Defensive: a sequence the whole KV budget cannot hold (start-up refuses a budget below one max_model_len
    sequence, so here the pool is cut to 20 positions behind the engine's back) ends with an error event that
    names the fix, and the engine goes on with the others."""
    llm = LLM(olmoe, dtype="fp32", kv_block_size=4, max_batch=2, max_model_len=40)
    eng = llm.engine()
    eng.pool = eng.scheduler.pool = BlockPool(5, 4)
    eng.max_blocks = 5
    small, big = llm._sequence([6] * 3, greedy(2)), llm._sequence([5] * 30, greedy(4))
    eng.add(big)
    eng.add(small)
    events = []
    while eng.has_work():
        events += eng.step()
    assert big.finish_reason == "error" and "raise --kv-memory" in big.error
    assert any(e.seq is big and e.finished for e in events)
    assert small.finish_reason == "length" and len(small.output_ids) == 2
    llm.close()
