"""The HTTP boundary: OpenAI request bodies as pydantic models, and OpenAI-style errors.

Bodies are validated strictly (no "5" for 5; but 16.0 is 16, JSON having one number type): malformed
JSON and unrecognized arguments get 400, wrong types and out-of-range values 422, each with an OpenAI
error body naming the parameter. Every numeric field's range is declared here, so that it shows in the
server's OpenAPI schema; only bounds that depend on the model (vocabulary, context) are checked later.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


TokenId = Annotated[int, Field(ge=0)]
"""A token id (its upper bound, the vocabulary size, is the model's: checked when the request is run)."""


class StreamOptions(BaseModel):
    """`stream_options`: whether the last chunk carries `usage`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions (OpenAI ranges; some OpenAI knobs only at
    their neutral value; `top_k`, `ignore_eos` and `stop_token_ids` are extensions, as in vLLM)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None

    def check_supported(self) -> None:
        """400 for OpenAI features this server accepts only at their neutral value."""
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise APIError(400, f"'stop' takes at most 4 sequences, got {len(self.stop)}.", param="stop")
        if self.stop is not None and any(not s for s in ([self.stop] if isinstance(self.stop, str) else self.stop)):
            raise APIError(400, "'stop' sequences must be non-empty strings.", param="stop")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"'{name}' is not supported by this server; leave it at 0.", param=name)
        if self.logit_bias:
            raise APIError(400, "'logit_bias' is not supported by this server.", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true.", param="stream_options")

    @property
    def stop_list(self) -> tuple[str, ...]:
        """Stop strings as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "'prompt' is an empty list; give at least one prompt.", param="prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "'best_of' other than 'n' is not supported.", param="best_of")
        if self.suffix:
            raise APIError(400, "'suffix' (insertion) is not supported by this model.", param="suffix")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "'echo' with 'logprobs' (prompt log-probabilities) is not supported.", param="echo")

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)


class TextPart(BaseModel):
    """One text part of a message's content."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as plain text."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens, else the deprecated max_tokens."""
        return self.max_completion_tokens or self.max_tokens


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Validate a request body, raising APIError (400 bad JSON / unknown argument, 422 bad value)."""
    try:
        data = json.loads(raw, parse_float=_json_number)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}.", code="invalid_json") from exc
    except RecursionError as exc:
        raise APIError(400, "the request body nests JSON arrays/objects too deeply.", code="invalid_json") from exc
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise APIError(
            400, f"the request body has a number this server cannot read: {exc}.", code="invalid_json"
        ) from exc
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object.", code="invalid_json")
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    req.check_supported()
    return req


def _json_number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: JSON has one number type, so 16.0 is the integer 16
    (as JSON Schema reads it) and passes as an integer field; 16.5 stays a float."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _validation_error(exc: ValidationError) -> APIError:
    errors = exc.errors(include_url=False)
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        name = ".".join(str(x) for x in extra[0]["loc"])
        return APIError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    missing = [e for e in errors if e["type"] == "missing"]
    if missing:
        name = ".".join(str(x) for x in missing[0]["loc"])
        return APIError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    # Of a union's alternatives, name the one that got furthest (a bound, not a type mismatch).
    same_field = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
    first = next((e for e in same_field if not e["type"].endswith("_type")), errors[0])
    loc = [str(x) for x in first["loc"] if isinstance(x, int) or not _is_type_tag(str(x))]
    name = ".".join(loc)
    got = json.dumps(first.get("input"), default=str)
    if len(got) > 80:
        got = got[:77] + "..."
    return APIError(422, f"Invalid value for '{name}': {first['msg']} (got {got}).", param=name, code="invalid_value")


def _is_type_tag(part: str) -> bool:
    """pydantic names union members in error locations (`str`, `list[int]`, ...): not a field."""
    return part in {"str", "int", "float", "bool"} or part.startswith(("list[", "dict[")) or part[:1].isupper()
