"""OpenAI-compatible HTTP server: continuous batching on one engine thread, SSE streaming,
Prometheus metrics, and a live page with the plan's residency heatmap and throughput charts.

Files: `config` (ServerConfig), `api_key` (where the key comes from), `protocol` (pydantic request
bodies with their ranges, OpenAI errors), `openapi` (the schema at /openapi.json), `body_limit` (413
for large bodies), `worker` (the engine thread), `openai_api` (completions and chat), `metrics`
(Prometheus + live stats), `placement_view` (plan and residency), `app` (routes, auth), `run`
(uvicorn, graceful shutdown), `static/index.html` (the page).
"""

from tilemem.server.app import create_app
from tilemem.server.config import ServerConfig
from tilemem.server.run import BackgroundServer, serve

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]
