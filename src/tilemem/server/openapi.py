"""The server's own OpenAPI schema, served at `GET /openapi.json`.

FastAPI lists the routes; the request bodies of the OpenAI endpoints come from the pydantic models
in `protocol.py` (the same ones that validate requests), `model` is the one name this server answers
to, and every error is the OpenAI error body. Property-based fuzzers (schemathesis) test the running
server from this schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tilemem.server.protocol import ChatCompletionRequest, CompletionRequest

BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
"""Request body model of each POST endpoint."""

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
"""The OpenAI error body every error response carries."""


def install_openapi(app: FastAPI, model_name: str) -> None:
    """Make `app.openapi()` (served at `app.openapi_url`) return the schema described above."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, model_name)
        return app.openapi_schema

    app.openapi = openapi


def build_schema(app: FastAPI, model_name: str) -> dict[str, Any]:
    """The OpenAPI document of `app`, serving `model_name`."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"] = ERROR_SCHEMA
    error = {"description": "an OpenAI error body", "content": {"application/json": {"schema": _ref("Error")}}}
    for path, model in BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        body["properties"]["model"] = {"type": "string", "enum": [model_name], "description": "the served model"}
        components[model.__name__] = body
        op = schema["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(model.__name__)}}}
        op["responses"]["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    for item in schema["paths"].values():
        for op in item.values():
            op["responses"]["default"] = error
    return schema


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}
