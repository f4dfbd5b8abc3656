"""The OpenAI-compatible server on a tiny fp32 checkpoint: the official `openai` client for
completions and chat (whole and streamed), raw HTTP for every error case, auth, the bounded queue,
cancellation on disconnect, failure isolation, metrics, and graceful shutdown."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tilemem.engine.llm import LLM
from tilemem.engine.sampling import SamplingParams
from tilemem.server import BackgroundServer, ServerConfig
from tilemem.server.run import free_port

MODEL = "ckpt"  # make_ckpt's directory name, served as the model name
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("olmoe")


@pytest.fixture(scope="module")
def ref(ckpt) -> LLM:
    """A second LLM for expected outputs (the served one belongs to the server's engine thread)."""
    return LLM(ckpt, dtype="fp32", max_batch=4)


@pytest.fixture(scope="module")
def server(ckpt):
    llm = LLM(ckpt, dtype="fp32", max_batch=4)
    with BackgroundServer(
        llm, ServerConfig(port=0, max_batch=4, max_queue=8, prefill_chunk=16, log_level="warning")
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def expected(ref: LLM, prompt, max_tokens: int, **kw):
    return ref.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw))[0]


@contextlib.contextmanager
def engine_held(server):
    """Hold the engine thread before its next step until the block ends (deterministic queueing)."""
    engine, gate = server.state.engine, threading.Event()
    real = engine.step

    def step():
        gate.wait(30)
        return real()

    engine.step = step
    try:
        yield
    finally:
        gate.set()
        del engine.step


@contextlib.contextmanager
def engine_slowed(server, seconds: float):
    engine = server.state.engine
    real = engine.step

    def step():
        time.sleep(seconds)
        return real()

    engine.step = step
    try:
        yield
    finally:
        del engine.step


def wait_idle(server, timeout: float = 10.0) -> float:
    """Seconds until no sequence holds a KV-cache slot."""
    t0 = time.monotonic()
    eng = server.state.engine
    while eng.scheduler.running or eng.scheduler.waiting or server.state.worker.queue_depth() != (0, 0):
        assert time.monotonic() - t0 < timeout, "requests still hold KV-cache slots"
        time.sleep(0.01)
    assert len(eng.scheduler.free_slots) == eng.max_batch and eng.pool.used == 0
    return time.monotonic() - t0


# -- the openai client ------------------------------------------------------------------------------------
def test_models_lists_the_checkpoint(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_is_what_llm_generate_gives(client, ref):
    prompt = "def fibonacci(n):"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    want = expected(ref, prompt, 12)
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.object == "text_completion" and out.model == MODEL


def test_streamed_completion_concatenates_to_the_whole(client):
    kw = dict(model=MODEL, prompt="class Stack:", max_tokens=20, **GREEDY)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_uses_the_checkpoint_template(client, ref):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, **GREEDY)
    want = expected(ref, ref.tokenizer.apply_chat_template(MESSAGES), 10)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == want.text
    assert out.usage.prompt_tokens == len(want.prompt_token_ids)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_choices_with_a_seed_are_reproducible_and_differ(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kw, extra_body={"ignore_eos": True})
    b = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) == 3
    # Choice i samples with seed + i: choice 1 is what a single request with seed 8 gives.
    single = client.completions.create(**{**kw, "n": 1, "seed": 8}, extra_body={"ignore_eos": True})
    assert single.choices[0].text == a.choices[1].text
    assert a.usage.completion_tokens == 36


def test_list_prompts_and_token_ids(client, ref):
    prompts = ["Hello there", "import os"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for i, c in enumerate(out.choices):
        assert c.text == expected(ref, prompts[i // 2], 6).text
    ids = [17, 300, 45, 9]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == expected(ref, ids, 6).text
    assert by_ids.usage.prompt_tokens == 4


def test_stop_strings_and_max_tokens(client):
    kw = dict(model=MODEL, prompt="def fibonacci(n):\n    ", max_tokens=24, **GREEDY)
    full = client.completions.create(**kw).choices[0].text
    pieces = (full[i : i + 2] for i in range(4, len(full) - 2))
    piece = next(p for p in pieces if "\ufffd" not in p and not any(c.isspace() for c in p))
    cut = client.completions.create(**kw, stop=[piece, "zzzz"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(piece)]
    streamed = list(client.completions.create(**kw, stop=piece, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(piece)]
    assert streamed[-1].choices[0].finish_reason == "stop"
    short = client.completions.create(**{**kw, "max_tokens": 3})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt="x = ", max_tokens=5, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        # Keyed by token text, as OpenAI does: two byte fragments may share one key.
        assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values()))  # greedy: the top token
    chat = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
    plain = client.completions.create(model=MODEL, prompt="x = ", max_tokens=5, **GREEDY)
    assert plain.choices[0].logprobs is None


# -- errors (raw HTTP) -----------------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 422, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 422, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "x"}}, 422, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 422, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, 422, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 50}, 422, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 100000]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 422, "messages"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
        422,
        "messages.0.role",
    ),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(http, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_a_prompt_longer_than_the_context_gets_400(http, client):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [7] * 600, "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "600 tokens" in err["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert http.get("/v1/completions").status_code == 405


def test_queue_full_gets_429(server, client):
    state = server.state
    held = []
    with engine_held(server):  # nothing runs: 4 sequences take the slots, 8 may wait
        kw = dict(model=MODEL, prompt="hi", max_tokens=2, **GREEDY)
        threads = [threading.Thread(target=lambda: held.append(client.completions.create(**kw))) for _ in range(3)]
        for t in threads:
            t.start()
        big = threading.Thread(target=lambda: held.append(client.completions.create(**{**kw, "n": 9})))
        big.start()
        deadline = time.monotonic() + 10
        while state.worker.queue_depth() != (4, 8):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as exc:
            client.completions.create(**kw)
        assert exc.value.status_code == 429
        assert "queue is full" in exc.value.body["message"] and "--max-queue" in exc.value.body["message"]
    for t in [*threads, big]:
        t.join(30)
    assert len(held) == 4 and sum(len(r.choices) for r in held) == 12
    wait_idle(server)


# -- cancellation, failures ------------------------------------------------------------------------------------
def test_a_disconnected_stream_frees_its_slot_at_once(server):
    body = {
        "model": MODEL,
        "prompt": "Tell me a story",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    with engine_slowed(server, 0.05):  # 400 tokens would take > 20 s
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data:")
                if got == 3:
                    break
            sched = server.state.engine.scheduler
            assert sched.running or sched.waiting  # in flight (running, or preempted and queued again)
        assert wait_idle(server, timeout=30) < 8.0  # far sooner than the 20 s the request would run
    assert server.state.metrics.live.snapshot()["finished"].get("abort", 0) >= 1


def test_a_dropped_connection_cancels_a_whole_request(server):
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with engine_slowed(server, 0.05):  # 400 tokens would take > 20 s
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 10
            while not server.state.engine.scheduler.running:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert wait_idle(server, timeout=30) < 8.0  # far sooner than the 20 s the request would run


def test_one_failing_request_neither_stops_the_server_nor_touches_others(server, client, monkeypatch, ref):
    import tilemem.engine.engine as engine_module

    real = engine_module.sample

    def sample(logits, params, gen):
        if params.seed == 666:
            raise RuntimeError("sampler exploded")
        return real(logits, params, gen)

    monkeypatch.setattr(engine_module, "sample", sample)
    kw = dict(model=MODEL, max_tokens=10, **GREEDY)
    results, errors = {}, {}

    def call(i, prompt, **extra):
        try:
            out = client.completions.create(prompt=prompt, **kw, **extra)
            results[i] = list(out) if extra.get("stream") else out
        except openai.APIError as exc:
            errors[i] = exc

    calls = [(0, "alpha", {}), (1, "beta", {"stream": True}), (2, "gamma", {"seed": 666})]
    threads = [threading.Thread(target=call, args=(i, p), kwargs=extra) for i, p, extra in calls]
    with engine_held(server):  # all three join one batch
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while server.state.worker.queue_depth()[0] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert set(results) == {0, 1} and set(errors) == {2}
    assert errors[2].status_code == 500 and "sampler exploded" in errors[2].message
    assert results[0].choices[0].text == expected(ref, "alpha", 10).text
    assert "".join(c.choices[0].text for c in results[1]) == expected(ref, "beta", 10).text
    # A streamed failure ends with an error event.
    with pytest.raises(openai.APIError, match="sampler exploded"):
        list(client.completions.create(prompt="gamma", seed=666, stream=True, **kw))
    assert client.completions.create(prompt="alpha", **kw).choices[0].text == results[0].choices[0].text
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


# -- observability ---------------------------------------------------------------------------------------------
def test_metrics_plan_and_stats(server, client, http):
    client.completions.create(model=MODEL, prompt="count", max_tokens=5, **GREEDY)
    text = http.get("/metrics").text
    for name in (
        "tilemem_http_requests_total",
        "tilemem_requests_finished_total",
        "tilemem_prompt_tokens_total",
        "tilemem_generation_tokens_total",
        "tilemem_time_to_first_token_seconds_bucket",
        "tilemem_time_per_output_token_seconds_bucket",
        "tilemem_queue_depth",
        "tilemem_batch_size_bucket",
        "tilemem_tier_bytes_total",
        "tilemem_cache_hit_rate",
    ):
        assert name in text, name
    generated = next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("tilemem_generation_tokens_total"))
    assert generated >= 5
    plan = http.get("/v1/tilemem/plan").json()
    assert plan["plan"] is None and plan["tiers"] == ["cpu"]  # all resident
    assert len(plan["residency"]["cpu"]) == len(plan["layers"]) and plan["residency"]["cpu"][0][0] == 1.0
    stats = http.get("/v1/tilemem/stats").json()
    assert stats["tokens"]["generated"] >= 5 and stats["requests"] == {"running": 0, "waiting": 0, "max_queue": 8}
    assert stats["latency"]["ttft_p50_s"] > 0 and stats["state"] == "ok"
    assert "<canvas" in http.get("/").text


def test_api_key_guards_everything_but_health(ckpt):
    llm = LLM(ckpt, dtype="fp32", max_batch=2)
    with BackgroundServer(llm, ServerConfig(port=0, max_batch=2, api_key="sk-test", log_level="warning")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            for method, path in [
                ("GET", "/"),
                ("GET", "/metrics"),
                ("GET", "/v1/models"),
                ("GET", "/v1/tilemem/plan"),
                ("GET", "/v1/tilemem/stats"),
                ("POST", "/v1/completions"),
                ("POST", "/v1/chat/completions"),
            ]:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
                    r = c.request(method, path, headers=headers, json={})
                    assert r.status_code == 401, (path, headers)
                    assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/tilemem/stats", headers={"Authorization": "Bearer sk-test"}).status_code == 200
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-test", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-nope", max_retries=0).models.list()


# -- shutdown ------------------------------------------------------------------------------------------------------
def test_graceful_stop_lets_running_streams_finish(ckpt, ref):
    llm = LLM(ckpt, dtype="fp32", max_batch=2)
    srv = BackgroundServer(llm, ServerConfig(port=0, max_batch=2, shutdown_grace_s=30, log_level="warning")).start()
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    with engine_slowed(srv, 0.01):
        stream = client.completions.create(model=MODEL, prompt="Once", max_tokens=60, stream=True, **GREEDY)
        first = next(iter(stream))
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        rest = list(stream)
    stopper.join(30)
    assert not srv.thread.is_alive()
    assert first.choices[0].text + "".join(c.choices[0].text for c in rest) == expected(ref, "Once", 60).text
    assert rest[-1].choices[0].finish_reason == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.url}/health")


SERVE = (
    "import argparse, sys; from tilemem.cli import serve_command as s; p = argparse.ArgumentParser(); "
    "s.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
)


def test_sigterm_ends_in_flight_streams_cleanly(ckpt):
    port = free_port()
    cmd = [sys.executable, "-c", SERVE, "serve", str(ckpt), "--port", str(port), "--dtype", "fp32"]
    cmd += ["--shutdown-grace", "0.5", "--log-level", "warning", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 480, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        if "error" in last:  # cut off by the shutdown, and told so
            assert last["error"]["code"] == "shutting_down"
        else:  # it finished within the grace
            assert last["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_rejects_plan_and_budget_together():
    from tilemem.cli.serve_command import cmd_serve, register
    from tilemem.errors import ConfigError

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["serve", "ckpt", "--plan", "p", "--budget", "cpu=1GiB"])
    with pytest.raises(ConfigError, match="either --plan or --budget"):
        cmd_serve(args)
