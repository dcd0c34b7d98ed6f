"""GET /openapi.json, generated from the request models, and /docs, Swagger UI served from the
swagger-ui-bundle package (no network needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import falcon
import falcon.asgi
import swagger_ui_bundle
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from mlc_engine.frontend import schemas

REF = "#/components/schemas/{model}"
ERROR_RESPONSE = {"description": "An OpenAI-style error: {error: {message, type, param, code}}"}

CHAT, COMPLETION = schemas.ChatCompletionRequest, schemas.CompletionRequest
# (method, path, summary, request model or None)
ENDPOINTS: list[tuple[str, str, str, type[BaseModel] | None]] = [
    ("post", "/v1/chat/completions", "Chat completion, streamed as SSE or not", CHAT),
    ("post", "/v1/completions", "Text completion, streamed as SSE or not", COMPLETION),
    ("get", "/v1/models", "The model served", None),
    ("post", "/chat/reset", "Reset the chat (and the statistics)", None),
    ("get", "/chat/reset", "Reset the chat (and the statistics)", None),
    ("get", "/stats", "Prefill and decode speed", None),
    ("get", "/verbose_stats", "Prefill and decode speed, total tokens and total time", None),
    ("get", "/health", "200 when ready; 503 while loading or when an engine is dead", None),
    ("get", "/metrics", "Prometheus metrics", None),
    ("post", "/tokenize", "Text (or chat messages) to token ids", schemas.TokenizeRequest),
    ("post", "/detokenize", "Token ids to text", schemas.DetokenizeRequest),
]

SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>
"""


def openapi_spec(title: str) -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Literal["validation"]]] = [
        (model, "validation") for _, _, _, model in ENDPOINTS if model is not None
    ]
    _, definitions = models_json_schema(models, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, model in ENDPOINTS:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {"200": {"description": "OK"}, "default": ERROR_RESPONSE},
        }
        if model is not None:
            schema = {"$ref": REF.format(model=model.__name__)}
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.3",  # what the bundled Swagger UI 4 renders
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {"schemas": definitions.get("$defs", {})},
    }


class OpenAPI:
    def __init__(self, title: str):
        self.spec = openapi_spec(title)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = self.spec


class SwaggerUI:
    def __init__(self, title: str):
        self.page = SWAGGER_PAGE.format(title=title)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = self.page


def static_folder() -> Path:
    return Path(swagger_ui_bundle.swagger_ui_path)
