"""A cap on request bodies: a body over `max_bytes` gets 413 (an OpenAI error body) before it is read
in full, whether it announces its size (`Content-Length`) or streams in chunks.

Without it one client could send a 20 MB prompt and hold the server's memory and time while it is read,
parsed and tokenized.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from tilemem.server.protocol import APIError


class BodyLimitMiddleware:
    """Plain ASGI middleware; see the module docstring. The body is read here (up to the cap) and
    replayed to the app, after which `receive` is the server's own (so disconnects still arrive)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.max_bytes:
            await self._reject(scope, receive, send, f"{length:,} bytes")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, f"more than {self.max_bytes:,} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send, got: str) -> None:
        err = APIError(
            413,
            f"the request body ({got}) is larger than this server accepts ({self.max_bytes:,} bytes); send a "
            "smaller request (fewer or shorter prompts), or start the server with a larger --max-body-bytes.",
            code="request_too_large",
        )
        # Connection: close, since the rest of the body is never read.
        response = JSONResponse(err.body(), 413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
