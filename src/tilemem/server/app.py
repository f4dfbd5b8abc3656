"""The FastAPI application: OpenAI endpoints, health, Prometheus metrics, plan/stats and the live page.

app = create_app(llm, ServerConfig(api_key="sk-..."))   # then run it with uvicorn (see run.py)

Every endpoint but `/health` needs `Authorization: Bearer KEY` when an API key is set. Every error is
an OpenAI error body; a failing request never takes the server down.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tilemem.engine.args import EngineArgs
from tilemem.engine.llm import LLM
from tilemem.server.body_limit import BodyLimitMiddleware
from tilemem.server.config import ServerConfig
from tilemem.server.metrics import ServerMetrics
from tilemem.server.openai_api import OpenAIService
from tilemem.server.openapi import install_openapi
from tilemem.server.placement_view import PlacementView
from tilemem.server.protocol import APIError
from tilemem.server.worker import EngineWorker

log = logging.getLogger(__name__)

ENDPOINTS = (
    "/",
    "/health",
    "/metrics",
    "/openapi.json",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/tilemem/plan",
    "/v1/tilemem/stats",
)


class ServerState:
    """Everything one server instance owns (no module-level state)."""

    def __init__(self, llm: LLM, config: ServerConfig) -> None:
        self.llm = llm
        self.config = config
        self.model_name = config.model_name or llm.path.name
        # A dedicated engine (KV cache) for the server, built as every engine is (`build_engine`), the
        # speculator and its draft model included; the LLM must not generate while it serves.
        engine = llm.parts.engine(config.max_batch, llm.max_model_len, config.prefill_chunk)
        self.engine = engine
        self.view = PlacementView(llm, self.model_name)
        self.metrics = ServerMetrics(lambda: self.worker.queue_depth(), llm.tiered)

        def on_step(eng, events, seconds) -> None:
            self.metrics.on_step(eng, events, seconds)
            self.view.refresh()

        self.worker = EngineWorker(engine, config.max_queue, on_step, self.metrics.on_finish, self.view.refresh)
        self.openai = OpenAIService(llm, self.worker, self.model_name)

    def stats(self) -> dict:
        """The `/v1/tilemem/stats` body."""
        running, waiting = self.worker.queue_depth()
        out = {"model": self.model_name, **self.metrics.live.snapshot()}
        out["requests"] = {"running": running, "waiting": waiting, "max_queue": self.config.max_queue}
        out["kv_cache"] = {"rows": self.engine.max_batch, "max_model_len": self.engine.max_model_len}
        out["kv_cache"] |= self.engine.kv_stats()
        out["residency_version"] = self.view.version
        out["tiered"] = self.llm.tiered is not None
        out["state"] = self.health()[0]
        return out

    def health(self) -> tuple[str, int]:
        """(state, HTTP status) for /health."""
        if self.worker.stopped.is_set():
            return "stopped", 503
        if self.worker.draining:
            return "draining", 503
        return "ok", 200


class GuardMiddleware:
    """Bearer-token check (all but /health) and per-endpoint request counts, as plain ASGI so that
    streamed responses and client disconnects pass through untouched."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.config.api_key
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and path != "/health" and not self._authorized(scope):
                err = APIError(
                    401, "Missing or incorrect API key; send 'Authorization: Bearer KEY'.", code="invalid_api_key"
                )
                response = JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.state.metrics.http_requests.labels(endpoint, str(status[0])).inc()

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)
        return False


def create_app(llm: LLM | EngineArgs, config: ServerConfig | None = None) -> FastAPI:
    """The ASGI app serving `llm` (an LLM, or the EngineArgs to build one from); its engine thread starts
    and stops with the app's lifespan."""
    config = config or ServerConfig()
    if isinstance(llm, EngineArgs):
        llm = LLM.from_args(llm, kv_sequences=config.max_batch)  # it allocates max_batch full-length slots
    state = ServerState(llm, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="TileMEM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.tilemem = state
    install_openapi(app, state.model_name)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(GuardMiddleware, state=state)  # added last: runs first (auth before reading bodies)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        err = APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), 500)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, code = state.health()
        return JSONResponse({"status": status}, code)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return state.openai.models()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await state.openai.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await state.openai.chat(request)

    @app.get("/v1/tilemem/plan")
    async def plan() -> dict:
        return state.view.as_json()

    @app.get("/v1/tilemem/stats")
    async def stats() -> dict:
        return state.stats()

    page = resources.files("tilemem.server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app
