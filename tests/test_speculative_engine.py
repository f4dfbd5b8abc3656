"""Speculative decoding inside the engine step: drafts are part of a decode row's scheduled chunk, the
step runs the engine's one forward path (one model call per pass), verification happens in
post-processing, and a failing row fails alone."""

from __future__ import annotations

import pytest
import torch

from tilemem.engine.engine import Engine
from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.engine.scheduler import ScheduledBatch, Scheduler
from tilemem.engine.sequence import Sequence
from tilemem.speculative.drafters import DraftModelDrafter, NgramDrafter
from tilemem.speculative.speculator import Speculator

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
K = 3


@pytest.fixture(scope="module")
def llm(make_ckpt) -> LLM:
    return LLM(make_ckpt("olmoe"), dtype="fp32", max_batch=4)


def spec_engine(llm: LLM, drafter, prefill_chunk: int = 8, length: int = 256) -> Engine:
    speculator = Speculator(drafter, K)
    return Engine(llm.model, llm.tokenizer, llm.eos_ids, 4, length, prefill_chunk, speculator=speculator)


def self_drafter(llm: LLM) -> DraftModelDrafter:
    """The target drafting for itself: k drafts every step, all of them accepted under greedy decoding."""
    return DraftModelDrafter(str(llm.path), 4, 256, "fp32", llm.model.cfg.vocab_size)


def count_forwards(monkeypatch, model) -> list[tuple[int, ...]]:
    """Shapes of the input ids of every call of `model.forward` from now on."""
    calls: list[tuple[int, ...]] = []
    real = model.forward

    def forward(ids, ctx, *args, **kw):
        calls.append(tuple(ids.shape))
        return real(ids, ctx, *args, **kw)

    monkeypatch.setattr(model, "forward", forward)
    return calls


def spy_schedule(monkeypatch, engine: Engine) -> list[ScheduledBatch]:
    batches: list[ScheduledBatch] = []
    real = engine.scheduler.schedule

    def schedule():
        batch = real()
        batches.append(batch)
        return batch

    monkeypatch.setattr(engine.scheduler, "schedule", schedule)
    return batches


def test_scheduler_appends_drafts_to_decode_rows_within_the_slot():
    class Fixed:
        def propose(self, seq, limit):
            from tilemem.engine.drafts import Draft

            return Draft([7, 8, 9][:limit])

    sched = Scheduler(slots=2, prefill_chunk=8, max_len=6)
    sched.speculation = Fixed()
    a = Sequence([1, 2, 3], SamplingParams(max_tokens=10), torch.Generator())
    b = Sequence(list(range(1, 20)), SamplingParams(max_tokens=10), torch.Generator())
    sched.add(a)
    assert sched.schedule().drafts == [None]  # a prompt chunk carries no drafts
    a.cached, a.output_ids = 3, [5]
    sched.add(b)
    batch = sched.schedule()
    assert batch.prefill == [False, True] and batch.speculative
    assert batch.chunks[0] == [5, 7, 8] and batch.draft(0).tokens == [7, 8]  # 6 - 3 cached - 1: room for 2
    assert batch.draft(1) is None and batch.decode_tokens == 1 and batch.prefill_tokens == 8


def test_a_speculative_step_is_one_forward_per_pass_through_the_scheduler(llm, monkeypatch):
    short, long_prompt = [5, 6, 7, 5, 6], list(range(40, 70))
    alone = [llm.generate(p, GREEDY)[0].token_ids for p in (short, long_prompt)]
    eng = spec_engine(llm, self_drafter(llm))
    a, b = llm._sequence(short, GREEDY), llm._sequence(long_prompt, GREEDY)
    eng.add(a)
    eng.step()  # a's prompt
    calls = count_forwards(monkeypatch, llm.model)
    batches = spy_schedule(monkeypatch, eng)
    eng.step()  # a decodes alone: one pass over [pending token, 3 drafts]
    assert calls == [(1, 1 + K)] and len(a.output_ids) == 1 + (1 + K)
    eng.add(b)
    mixed = 0
    while b.cached < len(b.prompt_ids) and not a.finished:
        calls.clear()
        before = len(a.output_ids)
        eng.step()
        batch = batches[-1]
        assert batch.prefill == [False, True] and batch.draft(1) is None  # b's prompt chunk, no drafts
        assert batch.chunks[0] == [a.tokens[before - 1 + len(a.prompt_ids)]] + batch.draft(0).tokens
        assert len(calls) == 2  # the prompt-chunk pass and the decode pass, no other forward
        assert calls[0] == (1, len(batch.chunks[1])) and calls[1] == (1, len(batch.chunks[0]))
        assert len(a.output_ids) == min(before + len(batch.draft(0).tokens) + 1, GREEDY.max_tokens)
        mixed += len(batch.draft(0).tokens) > 0
    assert mixed >= 2  # drafted decode rows ran in the same step as prompt chunks
    while eng.has_work():
        eng.step()
    assert [a.output_ids, b.output_ids] == alone
    c = eng.counters
    assert c.decode_tokens == len(a.output_ids) - 1 + len(b.output_ids) - 1  # drafts count once accepted
    assert eng.speculator.stats.tokens == c.decode_tokens and max(eng.speculator.stats.accepted) == 1 + K


def test_a_failing_speculative_row_fails_alone(llm):
    prompts = [[11, 12, 13, 11, 12], [21, 22, 23, 21, 22], [31, 32, 31, 32]]
    alone = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    eng = spec_engine(llm, NgramDrafter())
    seqs = [llm._sequence(p, GREEDY) for p in prompts]
    bad = seqs[1]
    real = eng.model

    def model(ids, ctx, logits_at=None, **kw):
        decoding = bad.cached >= len(bad.prompt_ids) and len(bad.output_ids) >= 3
        if decoding and bad.blocks in ctx.rows:  # fails once it decodes with drafts
            raise RuntimeError("poisoned row")
        return real(ids, ctx, logits_at=logits_at, **kw)

    eng.model = model
    for s in seqs:
        eng.add(s)
    while eng.has_work():
        eng.step()
    assert bad.finish_reason == "error" and "poisoned row" in bad.error
    assert 3 <= len(bad.output_ids) < GREEDY.max_tokens
    assert [seqs[0].output_ids, seqs[2].output_ids] == [alone[0], alone[2]]
    assert sorted(eng.scheduler.free_slots) == [0, 1, 2, 3]


def test_mtp_drafts_from_the_prefill_pass_hidden_states(make_ckpt, monkeypatch):
    """The MTP drafter reads the hidden states of each prompt chunk from the engine's own pass (no second
    prefill): after a chunked prefill its first drafts equal those drafted from a one-pass prompt."""
    from tilemem.layers.kv_cache import ForwardContext

    llm = LLM(make_ckpt("deepseek_v3", "fp32", mtp=True), dtype="fp32", speculative="mtp", num_draft=K, prefill_chunk=5)
    eng = llm.engine()
    prompt = [7, 42, 99, 13, 250, 8, 77, 301, 5, 64, 3, 9]
    seq = llm._sequence(prompt, GREEDY)
    eng.add(seq)
    calls = count_forwards(monkeypatch, llm.model)
    while seq.cached < len(prompt):
        eng.step()
    assert calls == [(1, 5), (1, 5), (1, 2)]  # the prompt's chunks, nothing else
    monkeypatch.undo()
    model = llm.model
    ctx = ForwardContext.build(model.allocate_cache(1, 64), [0], [0], [len(prompt)])
    _, hidden = model(torch.tensor([prompt]), ctx, return_hidden=True)  # [1, T, D]
    following = torch.tensor([prompt[1:] + seq.output_ids[:1]])  # [1, T]
    assert eng.speculator.drafter.propose(seq, K).tokens == model.mtp.draft(hidden, following, ctx, K)[0].tolist()
