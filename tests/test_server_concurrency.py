"""16 concurrent greedy streams through the server, under a DRAM budget that forces tile reads from
disk: each stream gives exactly what the same request gives alone; nothing lost, duplicated or mixed."""

from __future__ import annotations

import threading

import openai
import pytest

from tilemem.engine.llm import LLM
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.server import BackgroundServer, ServerConfig

MODEL = "ckpt"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def requests() -> list[dict]:
    """16 prompts of different lengths (one longer than several prefill chunks), 16 lengths."""
    out = []
    for i in range(16):
        prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 + 3 * i))
        if i == 5:
            prompt = " ".join(WORDS * 8)  # > 100 tokens: prefilled in chunks beside running decodes
        out.append({"prompt": prompt, "max_tokens": 6 + (i * 7) % 30})
    return out


@pytest.fixture(scope="module")
def server(make_ckpt):
    path = make_ckpt("olmoe")
    topo = Topology.from_config(Checkpoint.open(path).config, "fp32")
    budget = topo.non_expert_bytes + int(0.3 * topo.routed_expert_bytes)
    llm = LLM(path, dtype="fp32", budget=f"cpu={budget}B", policy="tilepo_fine", tile=16, max_batch=8)
    assert llm.tiered is not None and llm.plan.tiles_in("disk")
    config = ServerConfig(port=0, max_batch=8, max_queue=16, prefill_chunk=32, log_level="warning")
    with BackgroundServer(llm, config) as srv:
        yield srv


def run_stream(client: openai.OpenAI, req: dict) -> dict:
    stream = client.completions.create(
        model=MODEL,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **req,
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    return {
        "text": "".join(texts),
        "ids": {c.id for c in chunks},
        "finish": [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason],
        "tokens": chunks[-1].usage.completion_tokens,
        "prompt_tokens": chunks[-1].usage.prompt_tokens,
    }


def test_sixteen_concurrent_streams_match_their_solo_runs_with_disk_fetches(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    reqs = requests()
    alone = [run_stream(client, r) for r in reqs]
    assert len({a["text"] for a in alone}) == 16  # the requests really differ
    before = server.state.metrics.live.snapshot()["cache"]

    results: list[dict | None] = [None] * 16
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = run_stream(client, reqs[i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results, alone, strict=True)):
        assert got["text"] == want["text"], f"stream {i} differs from its solo run"
        assert got["tokens"] == want["tokens"] == reqs[i]["max_tokens"]
        assert got["prompt_tokens"] == want["prompt_tokens"]
        assert got["finish"] == ["length"]
        assert len(got["ids"]) == 1  # every chunk of a stream carries its own id...
    assert len(set().union(*(r["ids"] for r in results))) == 16  # ...and no two streams share one

    after = server.state.metrics.live.snapshot()["cache"]
    assert after["misses"] > before["misses"] and after["disk_bytes"] > before["disk_bytes"]  # really tiered
    steps = server.state.engine.counters.steps
    assert max(s.batch for s in steps) >= 4  # continuous batching: requests share steps (arrival timing varies)
    assert any(s.prefill_tokens and s.decode_tokens for s in steps)  # prefill chunks rode along decodes
