"""Request bodies at the HTTP boundary (no server): every numeric field's range is declared on the
pydantic models, bodies Python's json cannot read get 400, and 16.0 passes as the integer 16."""

from __future__ import annotations

import json

import pytest

from tilemem.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body

COMPLETION = {"model": "m", "prompt": "x"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
UNBOUNDED_ABOVE = {"max_tokens", "max_completion_tokens", "top_k", "stop_token_ids[]", "prompt[]", "prompt[][]"}
"""Bounded above by the model, not the protocol: generation stops at the context; top_k past the
vocabulary keeps every token; token ids past the vocabulary get 400 when the request is run."""


def parse(body: dict | bytes, model=CompletionRequest):
    return parse_body(body if isinstance(body, bytes) else json.dumps(body).encode(), model)


def numbers(schema: dict, components: dict, path: str = ""):
    """(path, JSON schema) of every integer/number in a JSON schema, through refs, unions and containers."""
    if "$ref" in schema:
        yield from numbers(components[schema["$ref"].rsplit("/", 1)[-1]], components, path)
        return
    if schema.get("type") in ("integer", "number"):
        yield path, schema
    for alt in schema.get("anyOf", []):
        yield from numbers(alt, components, path)
    for name, sub in schema.get("properties", {}).items():
        yield from numbers(sub, components, f"{path}.{name}".lstrip("."))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from numbers(schema[key], components, f"{path}[]")


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest], ids=lambda m: m.__name__)
def test_every_numeric_field_has_a_declared_range(model):
    schema = model.model_json_schema()
    found = list(numbers(schema, schema.get("$defs", {})))
    assert {"temperature", "n", "seed"} <= {p for p, _ in found}
    for path, s in found:
        assert "minimum" in s or "exclusiveMinimum" in s, f"{model.__name__}.{path} has no lower bound"
        if path not in UNBOUNDED_ABOVE:
            assert "maximum" in s or "exclusiveMaximum" in s, f"{model.__name__}.{path} has no upper bound"


OUT_OF_RANGE = [
    (COMPLETION, "temperature", -0.1, "temperature"),
    (COMPLETION, "temperature", 2.1, "temperature"),
    (COMPLETION, "top_p", 1.01, "top_p"),
    (COMPLETION, "n", 0, "n"),
    (COMPLETION, "n", 17, "n"),
    (COMPLETION, "seed", 2**64, "seed"),
    (COMPLETION, "seed", -(2**63) - 1, "seed"),
    (COMPLETION, "presence_penalty", 2.5, "presence_penalty"),
    (COMPLETION, "frequency_penalty", -2.5, "frequency_penalty"),
    (COMPLETION, "top_k", -2, "top_k"),
    (COMPLETION, "stop_token_ids", [3, -1], "stop_token_ids.1"),
    (COMPLETION, "logit_bias", {"5": 101}, "logit_bias.5"),
    (COMPLETION, "max_tokens", 0, "max_tokens"),
    (COMPLETION, "logprobs", 21, "logprobs"),
    (COMPLETION, "best_of", 17, "best_of"),
    (COMPLETION, "prompt", [4, -1], "prompt.1"),
    (COMPLETION, "prompt", [[4], [-1]], "prompt.1.0"),
    (CHAT, "max_tokens", 0, "max_tokens"),
    (CHAT, "max_completion_tokens", 0, "max_completion_tokens"),
    (CHAT, "top_logprobs", 21, "top_logprobs"),
]


@pytest.mark.parametrize(("base", "field", "value", "param"), OUT_OF_RANGE, ids=lambda x: str(x)[:24])
def test_an_out_of_range_value_gets_422_naming_the_field(base, field, value, param):
    model = ChatCompletionRequest if "messages" in base else CompletionRequest
    with pytest.raises(APIError) as exc:
        parse({**base, field: value}, model)
    assert exc.value.status == 422 and exc.value.param == param, exc.value.message


def test_an_integral_float_is_an_integer():
    req = parse({**COMPLETION, "max_tokens": 5.0, "n": 2.0, "seed": 1e3, "prompt": [1.0, 2.0]})
    assert (req.max_tokens, req.n, req.seed, req.prompt) == (5, 2, 1000, [1, 2])
    assert type(req.max_tokens) is int


def test_a_fractional_float_is_not_an_integer():
    with pytest.raises(APIError) as exc:
        parse({**COMPLETION, "max_tokens": 5.5})
    assert exc.value.status == 422 and exc.value.param == "max_tokens"


def test_a_number_with_thousands_of_digits_gets_400():
    with pytest.raises(APIError) as exc:
        parse(b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}")
    assert exc.value.status == 400 and exc.value.code == "invalid_json" and "digits" in exc.value.message


def test_deeply_nested_json_gets_400():
    with pytest.raises(APIError) as exc:
        parse(b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert exc.value.status == 400 and exc.value.code == "invalid_json" and "deeply" in exc.value.message
