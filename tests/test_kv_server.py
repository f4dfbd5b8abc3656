"""Many users on a small KV budget: 64 concurrent requests of mixed lengths on the `small` preset, served within a
KV memory that holds a quarter of them at full length, all complete (preempted and recomputed as blocks run out),
each answered with what a run with room for all of them gives; and the prefix cache reported in usage and /metrics."""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.server import BackgroundServer, ServerConfig

REQUESTS = 64
MAX_TOKENS = 16
CHUNK = 2048


def lengths(rng: random.Random) -> list[int]:
    """64 total lengths (prompt + output) from 16 to 2,000 tokens, log-uniform: many short, some long."""
    out = [round(math.exp(rng.uniform(math.log(MAX_TOKENS + 16), math.log(2000)))) for _ in range(REQUESTS - 2)]
    return [MAX_TOKENS + 16, 2000, *out]


@pytest.fixture(scope="module")
def workload(make_ckpt):
    path = make_ckpt("olmoe", "fp32", preset="small")
    rng = random.Random(23)
    prompts = [[rng.randrange(8192) for _ in range(n - MAX_TOKENS)] for n in lengths(rng)]
    return path, prompts


def hold_first_step_until_all_queued(srv, timeout: float = 60.0) -> None:
    """The engine's first step waits until every request has reached the server (at most `timeout`), so they all
    compete for the blocks however slowly a loaded machine starts the client threads: preemption is certain."""
    engine, worker = srv.state.engine, srv.state.worker

    def first_step():
        deadline = time.monotonic() + timeout
        while sum(worker.queue_depth()) < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.01)
        del engine.step  # the engine's own step from now on
        return engine.step()

    engine.step = first_step


def test_64_mixed_requests_within_a_quarter_of_their_kv_all_complete(workload):
    path, prompts = workload
    probe = LLM(path, dtype="fp32", max_batch=1, max_model_len=2048)
    block = probe.model.kv_block_bytes(16)
    probe.close()
    full = sum(math.ceil((len(p) + MAX_TOKENS) / 16) for p in prompts)  # blocks for every request at full length
    budget = full // 4 * block
    llm = LLM(path, dtype="fp32", max_batch=REQUESTS, max_model_len=2048, kv_memory=budget, prefill_chunk=CHUNK)
    config = ServerConfig(port=0, max_batch=REQUESTS, max_queue=REQUESTS, prefill_chunk=CHUNK, log_level="warning")
    with BackgroundServer(llm, config) as srv, httpx.Client(base_url=srv.url, timeout=600) as http:
        hold_first_step_until_all_queued(srv)

        def ask(prompt: list[int]) -> httpx.Response:
            body = {"model": "ckpt", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            return http.post("/v1/completions", json=body)

        with ThreadPoolExecutor(REQUESTS) as pool:
            answers = list(pool.map(ask, prompts))
        metrics = http.get("/metrics").text
        stats = http.get("/v1/tilemem/stats").json()["kv_cache"]
    assert [a.status_code for a in answers] == [200] * REQUESTS
    usage = [a.json()["usage"] for a in answers]
    assert all(u["completion_tokens"] == MAX_TOKENS for u in usage)
    assert [u["prompt_tokens"] for u in usage] == [len(p) for p in prompts]
    assert stats["preemptions"] > 0 and stats["kv_blocks_max"] * block <= budget
    assert stats["kv_bytes"] <= budget and stats["kv_blocks_used"] == 0
    preempted = next(line for line in metrics.splitlines() if line.startswith("tilemem_preemptions "))
    assert float(preempted.split()[1]) == stats["preemptions"]
    # Each answer is what a run with room for all of them gives (preempted ones recomputed exactly).
    ref = LLM(path, dtype="fp32", max_batch=8, max_model_len=2048)
    picks = [0, *random.Random(5).sample(range(2, REQUESTS), 3)]
    want = ref.generate([prompts[i] for i in picks], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    for i, w in zip(picks, want, strict=True):
        assert answers[i].json()["choices"][0]["text"] == w.text
    ref.close()


def test_usage_reports_the_cached_prompt_tokens(make_ckpt):
    llm = LLM(make_ckpt("olmoe"), dtype="fp32", kv_block_size=8)
    with BackgroundServer(llm, ServerConfig(port=0, log_level="warning")) as srv, httpx.Client(base_url=srv.url) as h:
        prompt = [random.Random(3).randrange(500) for _ in range(45)]
        body = {"model": "ckpt", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        first = h.post("/v1/completions", json=body).json()["usage"]
        second = h.post("/v1/completions", json={**body, "prompt": prompt + [7, 8, 9]}).json()["usage"]
        metrics = h.get("/metrics").text
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == 40  # 5 full blocks of 8 of the first prompt
    rate = next(line for line in metrics.splitlines() if line.startswith("tilemem_prefix_cache_hit_rate "))
    assert float(rate.split()[1]) == pytest.approx(40 / (45 + 48))
