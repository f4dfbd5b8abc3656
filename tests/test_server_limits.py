"""The server's limits on a tiny fp32 checkpoint: request-body size (413), prompts tokenized off the
event loop and once per request, a request larger than slots + queue (400, not 429), and what
in-flight requests are told when the server shuts down (503 / an error event, not an empty 200)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tilemem.engine.llm import LLM
from tilemem.server import BackgroundServer, ServerConfig

MODEL = "ckpt"  # make_ckpt's directory name, served as the model name
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("olmoe")


@pytest.fixture(scope="module")
def server(ckpt):
    llm = LLM(ckpt, dtype="fp32", max_batch=2)
    config = ServerConfig(port=0, max_batch=2, max_queue=4, max_body_bytes=MAX_BODY, log_level="warning")
    with BackgroundServer(llm, config) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def padded_body(size: int) -> bytes:
    """A valid completion request of exactly `size` bytes (padded in the `user` field)."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "user": ""}
    pad = size - len(json.dumps(body).encode())
    return json.dumps({**body, "user": "u" * pad}).encode()


def assert_openai_error(r: httpx.Response, status: int, code: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    return err


# -- request-body size ------------------------------------------------------------------------------------------
def test_a_body_at_the_limit_is_served(http):
    r = http.post("/v1/completions", content=padded_body(MAX_BODY), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_a_body_over_the_limit_gets_413(http):
    r = http.post("/v1/completions", content=padded_body(MAX_BODY + 1), headers={"content-type": "application/json"})
    err = assert_openai_error(r, 413, "request_too_large")
    assert f"{MAX_BODY + 1:,} bytes" in err["message"] and "--max-body-bytes" in err["message"]


def test_a_chunked_body_over_the_limit_gets_413(http):
    body = padded_body(4 * MAX_BODY)

    def chunks():
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, "request_too_large")


def test_health_answers_while_a_prompt_is_tokenized(server, http, monkeypatch):
    tok = server.state.llm.tokenizer
    real = tok.encode
    entered, release = threading.Event(), threading.Event()

    def encode(text: str) -> list[int]:
        entered.set()
        release.wait(30)
        return real(text)

    monkeypatch.setattr(tok, "encode", encode)
    result = {}
    body = {"model": MODEL, "prompt": "a long prompt", "max_tokens": 1}
    slow = threading.Thread(target=lambda: result.update(r=http.post("/v1/completions", json=body)))
    slow.start()
    try:
        assert entered.wait(10)
        # The tokenizer is held until /health answers: if tokenizing ran on the event loop, this would time out.
        health = httpx.get(f"{server.url}/health", timeout=10)
        assert health.status_code == 200
    finally:
        release.set()
        slow.join(30)
    assert result["r"].status_code == 200


def test_each_prompt_is_tokenized_once_whatever_n(server, http, monkeypatch):
    tok = server.state.llm.tokenizer
    real = tok.encode
    calls = []
    monkeypatch.setattr(tok, "encode", lambda text: calls.append(text) or real(text))
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": ["one", "two"], "n": 3, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 6
    assert sorted(calls) == ["one", "two"]


def test_a_stop_token_id_outside_the_vocabulary_gets_400(http):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "stop_token_ids": [1, 10**9]}
    err = assert_openai_error(http.post("/v1/completions", json=body), 400, None)
    assert err["param"] == "stop_token_ids" and "1000000000 is outside the vocabulary" in err["message"]


# -- a request larger than the server -------------------------------------------------------------------------
def test_a_request_larger_than_slots_plus_queue_gets_400(http):
    body = {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}  # 9 > 2 slots + 4 waiting
    r = http.post("/v1/completions", json=body)
    err = assert_openai_error(r, 400, "too_many_sequences")
    assert err["param"] == "n" and err["type"] == "invalid_request_error"
    assert "needs 9 sequences" in err["message"] and "at most 6" in err["message"]
    assert "never be served" in err["message"] and "--max-queue" in err["message"]


def test_a_chat_with_too_many_choices_gets_400(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 7, "max_tokens": 1}
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, "too_many_sequences")


def test_a_request_that_fills_slots_plus_queue_is_served(http):
    body = {"model": MODEL, "prompt": ["a", "b"], "n": 3, "max_tokens": 1}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 6


# -- shutdown under load ----------------------------------------------------------------------------------------
@pytest.fixture
def stopping_server(ckpt):
    """A server with a 0.3 s shutdown grace whose engine steps take 50 ms (400 tokens take 20 s)."""
    llm = LLM(ckpt, dtype="fp32", max_batch=2)
    srv = BackgroundServer(llm, ServerConfig(port=0, max_batch=2, shutdown_grace_s=0.3, log_level="warning"))
    real = srv.state.engine.step

    def step():
        time.sleep(0.05)
        return real()

    srv.state.engine.step = step
    srv.start()
    yield srv
    srv.stop()


def wait_running(srv, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not srv.state.engine.scheduler.running:
        assert time.monotonic() < deadline, "the request did not start"
        time.sleep(0.01)


LONG = {"model": MODEL, "prompt": "x", "max_tokens": 400, "ignore_eos": True}


def test_a_request_cut_off_by_shutdown_gets_503(stopping_server):
    srv, result = stopping_server, {}
    call = threading.Thread(
        target=lambda: result.update(r=httpx.post(f"{srv.url}/v1/completions", json=LONG, timeout=60))
    )
    call.start()
    wait_running(srv)
    srv.stop()
    call.join(30)
    err = assert_openai_error(result["r"], 503, "shutting_down")
    assert err["type"] == "server_error" and "shut down before this request finished" in err["message"]
    assert "--shutdown-grace 0.3 s" in err["message"]


def test_a_stream_cut_off_by_shutdown_ends_with_an_error_event(stopping_server):
    srv, events = stopping_server, []
    with httpx.stream("POST", f"{srv.url}/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line.removeprefix("data: "))
                if len(events) == 2:
                    threading.Thread(target=srv.stop).start()
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "shutting_down" and "shut down before this request finished" in err["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])  # tokens before the end were plain chunks
