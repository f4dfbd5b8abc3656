"""Property-based fuzzing of the running server from its own OpenAPI schema (schemathesis): valid and
invalid requests to every operation; no 5xx, no hang, and every error in the OpenAI error shape.

Bounded: a tiny checkpoint with a 32-token context, a few dozen examples per operation, and a timeout
on every call."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tilemem.engine.llm import LLM
from tilemem.server import BackgroundServer, ServerConfig

CALL_TIMEOUT_S = 60.0
"""A call that takes longer counts as a hang (a generous bound: the machine may be loaded)."""
EXAMPLES = {"GET": 3, "POST": 40}
"""Examples per operation and generation mode."""


@pytest.fixture(scope="module")
def server(make_ckpt):
    llm = LLM(make_ckpt("olmoe"), dtype="fp32", max_batch=4, max_model_len=32)
    with BackgroundServer(llm, ServerConfig(port=0, max_batch=4, max_queue=8, log_level="warning")) as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_schema_describes_the_request_bodies(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["model"]["enum"] == ["ckpt"] and props["temperature"]["anyOf"][0]["maximum"] == 2


def check_response(case, response, mode: GenerationMode) -> None:
    """No server error; an error is an OpenAI error body; a success is JSON or a finished SSE stream;
    a body valid by the schema is never refused as malformed (422: the schema and the validator agree)."""
    where = f"{case.method} {case.path} {json.dumps(case.body, default=str)[:300]}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    if mode == GenerationMode.POSITIVE:
        assert response.status_code != 422, f"{where} -> {response.text[:300]}"
    if response.status_code >= 400:
        err = response.json().get("error")
        assert isinstance(err, dict), f"{where} -> {response.text[:300]}"
        assert set(err) == {"message", "type", "param", "code"} and err["message"], f"{where} -> {err}"
        return
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        events = [x.removeprefix("data: ") for x in response.text.split("\n\n") if x]
        if not response.stream_cut_short:  # (schemathesis reads at most so many events)
            assert events[-1] == "[DONE]", f"{where} -> {events[-3:]}"
        for e in events:
            data = None if e == "[DONE]" else json.loads(e)
            assert data is None or "error" not in data, f"{where} -> {data}"
    elif case.path.startswith("/v1/") or case.path in ("/health", "/openapi.json"):
        response.json()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzz_every_operation(server, schema, mode):
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/health"}
    for op in operations:
        if mode == GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @settings(
            max_examples=EXAMPLES[op.method.upper()],
            deadline=None,
            database=None,
            derandomize=True,  # the same examples on every run
            phases=[Phase.explicit, Phase.generate],  # no shrinking: the failure message names the request
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            response = case.call(base_url=server.url, timeout=CALL_TIMEOUT_S)
            check_response(case, response, mode)

        fuzz()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert server.state.worker.queue_depth() == (0, 0)
