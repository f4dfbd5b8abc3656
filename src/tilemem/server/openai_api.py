"""`/v1/completions` and `/v1/chat/completions`: requests become sequences for the engine worker,
its token deltas become OpenAI responses, whole or streamed as server-sent events.

Each choice of a request (`n`, and every prompt of a list) is its own sequence; with a `seed`, choice
i samples with seed + i. Unset sampling fields take the checkpoint's generation_config.json defaults.
A stream whose client goes away, or a request whose connection drops, is cancelled at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tilemem.engine.sampling import SamplingParams
from tilemem.engine.sequence import Sequence
from tilemem.errors import RequestError
from tilemem.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from tilemem.server.worker import (
    EngineWorker,
    QueueFullError,
    RequestHandle,
    RequestTooLargeError,
    ShuttingDownError,
    TokenDelta,
)


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict[int, float] | None]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class OpenAIService:
    """Turns OpenAI requests into engine work for one served model."""

    def __init__(self, llm, worker: EngineWorker, model_name: str) -> None:
        self.llm = llm
        self.worker = worker
        self.model_name = model_name
        self.created = int(time.time())

    # -- endpoints ------------------------------------------------------------------------------------
    def models(self) -> dict:
        """The `/v1/models` body."""
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tilemem",
            "max_model_len": self.llm.max_model_len,
        }
        return {"object": "list", "data": [card]}

    async def completions(self, request: Request):
        """`POST /v1/completions`."""
        raw = await request.body()
        # Parsing and tokenizing a large body takes a while: off the event loop, so other requests
        # (and /health) are answered meanwhile.
        req, seqs, echo = await asyncio.to_thread(self._prepare_completion, raw)
        return await self._respond(request, req, seqs, "text_completion", "cmpl", echo=echo)

    async def chat(self, request: Request):
        """`POST /v1/chat/completions`."""
        raw = await request.body()
        req, seqs = await asyncio.to_thread(self._prepare_chat, raw)  # off the event loop, as above
        return await self._respond(request, req, seqs, "chat.completion", "chatcmpl")

    # -- requests -> sequences (on a worker thread) --------------------------------------------------------
    def _prepare_completion(self, raw: bytes) -> tuple[CompletionRequest, list[tuple[int, Sequence]], list | None]:
        req: CompletionRequest = parse_body(raw, CompletionRequest)
        self._check_model(req.model)
        prompts = req.prompts()
        self._check_fits(len(prompts) * req.n, "n" if req.n > 1 else "prompt")
        self._check_stop_token_ids(req)
        seqs = self._sequences(prompts, req, req.max_tokens or 16, req.logprobs, "prompt")
        echo = [self._prompt_text(p) for p in prompts] if req.echo else None
        return req, seqs, echo

    def _prepare_chat(self, raw: bytes) -> tuple[ChatCompletionRequest, list[tuple[int, Sequence]]]:
        req: ChatCompletionRequest = parse_body(raw, ChatCompletionRequest)
        self._check_model(req.model)
        self._check_fits(req.n, "n")
        self._check_stop_token_ids(req)
        if self.llm.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer, so it cannot chat; use /v1/completions.")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = self.llm.tokenizer.apply_chat_template(messages)
        except RequestError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        except jinja2.TemplateError as exc:
            raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        seqs = self._sequences([prompt], req, req.token_limit or self.llm.max_model_len, logprobs, "messages")
        return req, seqs

    def _check_fits(self, count: int, param: str) -> None:
        """400 (not 429: retrying cannot help) for a request larger than the server's slots + queue."""
        try:
            self.worker.check_fits(count)
        except RequestTooLargeError as exc:
            raise APIError(400, str(exc), param=param, code="too_many_sequences") from exc

    def _check_stop_token_ids(self, req) -> None:
        vocab = self.llm.config.vocab_size
        bad = [t for t in req.stop_token_ids or () if t >= vocab]
        if bad:
            message = f"stop token id {bad[0]} is outside the vocabulary (0..{vocab - 1})."
            raise APIError(400, message, param="stop_token_ids")

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{self.model_name}' (see /v1/models).",
                param="model",
                code="model_not_found",
            )

    def _sequences(self, prompts, req, max_tokens: int, logprobs: int | None, param: str) -> list[tuple[int, Sequence]]:
        """(prompt index, sequence) for every choice; 400 (naming `param`) for prompts that can never fit.
        Each prompt is tokenized once; its other choices reuse the token ids."""
        out = []
        for pi, prompt in enumerate(prompts):
            for j in range(req.n):
                seed = None if req.seed is None else (req.seed + j) % 2**64
                greedy = req.top_p == 0  # no probability mass may pass: only the top token
                params = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=0.0 if greedy else req.temperature,
                    top_k=req.top_k,
                    top_p=None if greedy else req.top_p,
                    seed=seed,
                    stop=req.stop_list,
                    stop_token_ids=tuple(req.stop_token_ids or ()),
                    ignore_eos=req.ignore_eos,
                    logprobs=logprobs,
                )
                try:
                    seq = self.llm._sequence(prompt, params)
                except RequestError as exc:
                    code = "context_length_exceeded" if "context" in str(exc) else None
                    raise APIError(400, str(exc), param=param, code=code) from exc
                prompt = seq.prompt_ids  # tokenized and checked: the next choices reuse the ids
                out.append((pi, seq))
        return out

    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.llm.tokenizer.decode(prompt) if self.llm.tokenizer is not None else ""

    def _submit(self, seqs: list[tuple[int, Sequence]]) -> RequestHandle:
        try:
            return self.worker.submit([s for _, s in seqs], asyncio.get_running_loop())
        except RequestTooLargeError as exc:
            raise APIError(400, str(exc), code="too_many_sequences") from exc
        except QueueFullError as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from exc
        except ShuttingDownError as exc:
            raise APIError(503, str(exc), "server_error", code="shutting_down", headers={"Retry-After": "5"}) from exc

    async def _respond(self, request: Request, req, seqs, kind: str, prefix: str, echo: list[str] | None = None):
        handle = self._submit(seqs)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        choices = [Choice(i, pi) for i, (pi, _) in enumerate(seqs)]
        prompts = [s for i, (pi, s) in enumerate(seqs) if i % req.n == 0]  # a prompt counts once
        fmt = ResponseFormat(self, rid, kind, choices, prompts)
        if req.stream:
            stream = self._stream(handle, req, fmt, echo)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        if not await self._collect(handle, request, choices):
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            raise APIError(500, f"generation failed: {failed[0].error}", type="server_error", code="generation_failed")
        cut = [c for c in choices if _ended_by_shutdown(c.finish_reason, c.error)]
        if cut:  # not a 200 with empty text: say that the server stopped
            raise _shutdown_error(cut[0].error)
        if echo is not None:
            for c in choices:
                c.text = echo[c.prompt_index] + c.text
        return JSONResponse(fmt.full())

    # -- engine deltas -> responses -----------------------------------------------------------------------
    async def _collect(self, handle: RequestHandle, request: Request, choices: list[Choice]) -> bool:
        """Gather every delta; False (and the request cancelled) if the client disconnects first."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            open_ = len(choices)
            while open_:
                getter = asyncio.ensure_future(handle.deltas.get())
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    self.worker.abort(handle)
                    return False
                for d in getter.result():
                    open_ -= _apply(choices[d.index], d)
            return True
        except asyncio.CancelledError:
            self.worker.abort(handle)
            raise
        finally:
            gone.cancel()

    async def _stream(self, handle: RequestHandle, req, fmt: ResponseFormat, echo) -> AsyncIterator[str]:
        done = False
        try:
            for c in fmt.choices:
                first = fmt.first_chunk(c, echo[c.prompt_index] if echo else None)
                if first is not None:
                    yield _sse(first)
            open_ = len(fmt.choices)
            while open_:
                for d in await handle.deltas.get():
                    c = fmt.choices[d.index]
                    open_ -= _apply(c, d)
                    if d.finish_reason == "error":
                        self.worker.abort(handle)
                        yield _sse(APIError(500, f"generation failed: {d.error}", "server_error").body())
                        yield "data: [DONE]\n\n"
                        done = True
                        return
                    if _ended_by_shutdown(d.finish_reason, d.error):  # an error event, then the end
                        yield _sse(_shutdown_error(d.error).body())
                        yield "data: [DONE]\n\n"
                        done = True
                        return
                    chunk = fmt.delta_chunk(c, d)
                    if chunk is not None:
                        yield _sse(chunk)
            if req.include_usage:
                yield _sse(fmt.usage_chunk())
            yield "data: [DONE]\n\n"
            done = True
        finally:  # the client went away (or the server is stopping): free the KV-cache slots now
            if not done:
                self.worker.abort(handle)


def _ended_by_shutdown(finish_reason: str | None, error: str | None) -> bool:
    """An abort that carries a reason comes from the server stopping (a client's cancel carries none)."""
    return finish_reason == "abort" and error is not None


def _shutdown_error(message: str | None) -> APIError:
    return APIError(
        503, message or "the server shut down.", "server_error", code="shutting_down", headers={"Retry-After": "5"}
    )


def _apply(choice: Choice, d: TokenDelta) -> int:
    """Add a delta to its choice; 1 if it ended the choice."""
    choice.text += d.text
    if d.token_id is not None:
        choice.token_ids.append(d.token_id)
        if d.logprob is not None:
            choice.logprobs.append((d.token_id, d.logprob, d.top_logprobs))
    if d.finish_reason is not None and choice.finish_reason is None:
        choice.finish_reason = d.finish_reason
        choice.error = d.error
        return 1
    return 0


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ResponseFormat:
    """Builds the OpenAI JSON of one request (completion or chat, whole or chunked)."""

    def __init__(self, service: OpenAIService, rid: str, kind: str, choices: list[Choice], prompts: list[Sequence]):
        self.service = service
        self.rid = rid
        self.kind = kind
        self.chat = kind == "chat.completion"
        self.choices = choices
        self.prompts = prompts
        """One sequence per prompt (its prompt length, and the prompt tokens the prefix cache held)."""
        self.prompt_tokens = sum(len(s.prompt_ids) for s in prompts)
        self.created = int(time.time())
        self.offsets = [0] * len(choices)  # text offset of the next token (completions logprobs)

    def _envelope(self, chunk: bool) -> dict:
        obj = self.kind + (".chunk" if chunk and self.chat else "")
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.service.model_name}

    def usage(self) -> dict:
        """Token counts (a prompt counts once, however many choices it has)."""
        completion = sum(len(c.token_ids) for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(s.cached_prompt for s in self.prompts)},
        }

    def full(self) -> dict:
        """The non-streamed response."""
        out = self._envelope(chunk=False)
        out["choices"] = [self._choice(c, c.text, c.logprobs, c.finish_reason, whole=True) for c in self.choices]
        out["usage"] = self.usage()
        return out

    def first_chunk(self, c: Choice, echo: str | None) -> dict | None:
        """Chat: the role announcement; completions: the echoed prompt, if any."""
        if self.chat:
            out = self._envelope(chunk=True)
            out["choices"] = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}]
            out["choices"][0]["finish_reason"] = None
            return out
        if echo:
            out = self._envelope(chunk=True)
            out["choices"] = [{"index": c.index, "text": echo, "logprobs": None, "finish_reason": None}]
            return out
        return None

    def delta_chunk(self, c: Choice, d: TokenDelta) -> dict | None:
        """One streamed chunk for a delta (None if it carries nothing to show)."""
        lps = [(d.token_id, d.logprob, d.top_logprobs)] if d.logprob is not None else []
        if not d.text and not lps and d.finish_reason is None:
            return None
        out = self._envelope(chunk=True)
        out["choices"] = [self._choice(c, d.text, lps, d.finish_reason, whole=False)]
        return out

    def usage_chunk(self) -> dict:
        """The final chunk of `stream_options.include_usage`."""
        out = self._envelope(chunk=True)
        out["choices"] = []
        out["usage"] = self.usage()
        return out

    def _choice(self, c: Choice, text: str, lps: list, finish: str | None, whole: bool) -> dict:
        if self.chat:
            key = "message" if whole else "delta"
            body = {"role": "assistant", "content": text} if whole else ({"content": text} if text else {})
            return {"index": c.index, key: body, "logprobs": self._chat_logprobs(lps), "finish_reason": finish}
        return {"index": c.index, "text": text, "logprobs": self._text_logprobs(c, lps), "finish_reason": finish}

    def _token(self, token_id: int) -> str:
        tok = self.service.llm.tokenizer
        if tok is None:
            return f"<{token_id}>"
        return tok.tok.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, lps: list) -> dict | None:
        if not lps:
            return None

        def entry(token_id: int, lp: float) -> dict:
            s = self._token(token_id)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        content = []
        for token_id, lp, top in lps:
            e = entry(token_id, lp)
            e["top_logprobs"] = [entry(t, v) for t, v in (top or {}).items()]
            content.append(e)
        return {"content": content}

    def _top_by_text(self, top: dict[int, float]) -> dict[str, float]:
        """Alternatives keyed by token text; tokens with the same text (byte fragments) keep the best."""
        out: dict[str, float] = {}
        for t, v in top.items():
            key = self._token(t)
            out[key] = max(v, out.get(key, v))
        return out

    def _text_logprobs(self, c: Choice, lps: list) -> dict | None:
        if not lps:
            return None
        tokens, offsets = [], []
        for token_id, _, _ in lps:
            s = self._token(token_id)
            tokens.append(s)
            offsets.append(self.offsets[c.index])
            self.offsets[c.index] += len(s)
        tops = [self._top_by_text(top) if top else None for _, _, top in lps]
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in lps],
            "top_logprobs": tops if any(t is not None for t in tops) else None,
            "text_offset": offsets,
        }
