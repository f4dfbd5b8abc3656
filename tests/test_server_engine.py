"""The engine loop the server relies on: mixed prefill + decode steps (a long prompt never stalls
running decodes), per-request failures, and the engine worker thread."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tilemem.engine.engine import Engine
from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.engine.scheduler import Scheduler
from tilemem.engine.sequence import Sequence
from tilemem.server.worker import EngineWorker, QueueFullError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def seq(n_prompt: int, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), torch.Generator())


# -- scheduler (pure Python) ------------------------------------------------------------------------
def test_long_prompt_is_chunked_beside_running_decodes():
    sched = Scheduler(slots=3, prefill_chunk=8)
    a = seq(3)
    sched.add(a)
    first = sched.schedule()
    assert first.seqs == [a] and first.prefill == [True] and first.chunks == [[1, 2, 3]]
    a.cached, a.output_ids = 3, [9]  # prefilled, first token sampled
    b = seq(30)
    sched.add(b)
    for step in range(4):  # 30 prompt tokens in chunks of <= 8, each step with a's decode row
        batch = sched.schedule()
        assert batch.seqs == [a, b]
        assert batch.prefill == [False, True]
        assert batch.chunks[0] == [a.output_ids[-1]]
        assert batch.chunks[1] == b.prompt_ids[8 * step : 8 * step + 8]
        assert batch.decode_tokens == 1 and batch.prefill_tokens == len(batch.chunks[1])
        a.cached += 1
        a.output_ids.append(10 + step)
        b.cached += len(batch.chunks[1])
    assert b.cached == 30


def test_prompt_budget_is_shared_in_arrival_order():
    sched = Scheduler(slots=4, prefill_chunk=10)
    seqs = [seq(6), seq(6), seq(6)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [len(c) for c in batch.chunks] == [6, 4]  # the third waits for budget, not for a slot
    assert batch.seqs == seqs[:2] and all(s.slot >= 0 for s in seqs[:2])
    assert list(sched.waiting) == seqs[2:] and not seqs[2].blocks  # it holds no KV blocks while it waits


# -- engine on a tiny model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(make_ckpt) -> LLM:
    return LLM(make_ckpt("olmoe"), dtype="fp32", max_batch=4)


def fresh_engine(llm: LLM, prefill_chunk: int = 512) -> Engine:
    return Engine(llm.model, llm.tokenizer, llm.eos_ids, 4, llm.max_model_len, prefill_chunk=prefill_chunk)


def run(engine: Engine, seqs: list[Sequence]) -> dict[str, list[int]]:
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    return {s.request_id: s.output_ids for s in seqs}


def test_a_long_prompt_joining_mid_decode_neither_stalls_nor_changes_outputs(llm):
    short, long_prompt = [5, 6, 7], list(range(40, 140))
    alone_short = llm.generate(short, GREEDY)[0].token_ids
    alone_long = llm.generate(long_prompt, GREEDY)[0].token_ids
    eng = fresh_engine(llm, prefill_chunk=16)
    a = llm._sequence(short, GREEDY)
    eng.add(a)
    eng.step()
    eng.step()  # a is decoding
    b = llm._sequence(long_prompt, GREEDY)
    eng.add(b)
    steps = 0
    while b.cached < len(b.prompt_ids):
        before = len(a.output_ids)
        eng.step()
        steps += 1
        assert len(a.output_ids) == before + 1  # a decodes every step while b's prompt is prefilled
        assert eng.counters.steps[-1].prefill_tokens <= 16
    assert steps == 7  # 100 prompt tokens in chunks of 16
    while eng.has_work():
        eng.step()
    assert a.output_ids == alone_short
    assert b.output_ids == alone_long
    c = eng.counters
    assert c.prefill_tokens == len(short) + len(long_prompt)
    assert c.decode_tokens == len(a.output_ids) - 1 + len(b.output_ids) - 1


def test_a_failing_forward_fails_only_its_request(llm):
    prompts = [[11, 12, 13, 14], [21, 22, 23, 499, 24], [31, 32]]
    alone = [llm.generate(p, GREEDY)[0].token_ids for p in prompts]
    eng = fresh_engine(llm)
    real = eng.model

    def model(ids, ctx, logits_at=None):
        if ids.shape[1] > 1 and bool((ids == 499).any()):  # the poisoned prompt's prefill fails
            raise RuntimeError("poisoned prompt")
        return real(ids, ctx, logits_at=logits_at)

    eng.model = model
    seqs = [llm._sequence(p, GREEDY) for p in prompts]
    out = run(eng, seqs)
    assert seqs[1].finish_reason == "error" and "poisoned prompt" in seqs[1].error
    assert out[seqs[0].request_id] == alone[0] and out[seqs[2].request_id] == alone[2]
    assert sorted(eng.scheduler.free_slots) == [0, 1, 2, 3]


def test_a_failing_sampler_fails_only_its_request(llm, monkeypatch):
    import tilemem.engine.engine as engine_module

    real = engine_module.sample

    def sample(logits, params, gen):
        if params.seed == 666:
            raise RuntimeError("sampler exploded")
        return real(logits, params, gen)

    monkeypatch.setattr(engine_module, "sample", sample)
    eng = fresh_engine(llm)
    good = llm._sequence([5, 6, 7], GREEDY)
    bad = llm._sequence([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, seed=666))
    run(eng, [good, bad])
    assert bad.finish_reason == "error" and "sampler exploded" in bad.error
    assert good.output_ids == llm.generate([5, 6, 7], GREEDY)[0].token_ids


# -- worker ---------------------------------------------------------------------------------------------
def test_worker_streams_deltas_and_bounds_its_queue(llm):
    async def main():
        loop = asyncio.get_running_loop()
        worker = EngineWorker(fresh_engine(llm), max_queue=1).start()
        try:
            seqs = [llm._sequence([5, 6, 7], GREEDY) for _ in range(5)]
            handle = worker.submit(seqs[:4], loop)  # 4 slots
            worker.submit(seqs[4:], loop)  # 1 may wait
            with pytest.raises(QueueFullError, match="queue is full"):
                worker.submit([llm._sequence([1, 2], GREEDY)], loop)
            tokens = {i: [] for i in range(4)}
            open_ = 4
            while open_:
                for d in await asyncio.wait_for(handle.deltas.get(), 30):
                    if d.token_id is not None:
                        tokens[d.index].append(d.token_id)
                    open_ -= d.finish_reason is not None
            return tokens
        finally:
            worker.stop()

    tokens = asyncio.run(main())
    expected = llm.generate([5, 6, 7], GREEDY)[0].token_ids
    assert all(t == expected for t in tokens.values())


def test_worker_survives_a_broken_step(llm):
    async def main():
        loop = asyncio.get_running_loop()
        engine = fresh_engine(llm)
        real = engine.step
        calls = []

        def step():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("scheduler bug")
            return real()

        engine.step = step
        worker = EngineWorker(engine).start()
        try:
            first = worker.submit([llm._sequence([5, 6, 7], GREEDY)], loop)
            (delta,) = await asyncio.wait_for(first.deltas.get(), 30)
            assert delta.finish_reason == "error" and "scheduler bug" in delta.error
            second = worker.submit([llm._sequence([5, 6, 7], GREEDY)], loop)
            tokens = []
            while True:
                deltas = await asyncio.wait_for(second.deltas.get(), 30)
                tokens += [d.token_id for d in deltas if d.token_id is not None]
                if deltas[-1].finish_reason is not None:
                    return deltas[-1].finish_reason, tokens, worker.queue_depth()
        finally:
            worker.stop()

    reason, tokens, depth = asyncio.run(main())
    assert reason == "length" and tokens == llm.generate([5, 6, 7], GREEDY)[0].token_ids
    assert depth == (0, 0)
