"""GET /openapi.json, generated from the request and response models, and /docs, Swagger UI
served from the swagger-ui-bundle package (no network needed)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import falcon
import falcon.asgi
import swagger_ui_bundle
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from mlc_engine.frontend import response_schemas as out
from mlc_engine.frontend import schemas

REF = "#/components/schemas/{model}"
ERRORS = {
    "400": "The request is invalid; `param` names the field at fault.",
    "401": "An API key is set and the request does not carry it.",
    "413": "The body is larger than the server accepts.",
    "429": "Every engine's queue is full; retry after `Retry-After` seconds.",
    "500": "The engine failed the request.",
    "503": "The model is still loading, or an engine is dead.",
}
GENERATION_ERRORS = ("400", "401", "413", "429", "500", "503")


@dataclass
class Endpoint:
    """One route and method, as /openapi.json documents it."""

    method: str
    path: str
    summary: str
    request: type[BaseModel] | None
    # The 200 body: a response model, or a schema for text; a stream's events when streamed.
    reply: type[BaseModel] | dict[str, Any]
    errors: tuple[str, ...] = ("401", "503")
    stream: type[BaseModel] | None = None
    media_type: str = falcon.MEDIA_JSON


HELLO = [{"role": "user", "content": "Say hello"}]
# Request bodies to start from in /docs ("Try it out"), by route.
EXAMPLES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "whole": {"messages": HELLO, "max_tokens": 16},
        "streamed": {
            "messages": HELLO,
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    },
    "/v1/completions": {
        "whole": {"prompt": "Once upon a time", "max_tokens": 16},
        "scored": {"prompt": "Paris is in", "max_tokens": 1, "logprobs": 2, "echo": True},
        "streamed": {"prompt": ["Once upon a time", "Long ago"], "max_tokens": 16, "stream": True},
    },
    "/tokenize": {"text": {"prompt": "Hello world"}, "chat": {"messages": HELLO}},
    "/detokenize": {"tokens": {"tokens": [40, 41, 42]}},
}
TEXT: dict[str, Any] = {"type": "string"}
NULL: dict[str, Any] = {"type": "object", "nullable": True, "enum": [None], "description": "null"}
STATS_TEXT = {"type": "string", "description": "MLC-Chat style: the statistics as text."}


def endpoints(api_style: str) -> list[Endpoint]:
    stats: Any = STATS_TEXT if api_style == "mlc-chat" else out.Stats
    verbose: Any = STATS_TEXT if api_style == "mlc-chat" else out.VerboseStats
    chat, completion = schemas.ChatCompletionRequest, schemas.CompletionRequest
    return [
        Endpoint("post", "/v1/chat/completions", "Chat completion, streamed as SSE or not",
                 chat, out.ChatCompletion, GENERATION_ERRORS, out.StreamEvent),
        Endpoint("post", "/v1/completions", "Text completion, streamed as SSE or not",
                 completion, out.Completion, GENERATION_ERRORS, out.StreamEvent),
        Endpoint("get", "/v1/models", "The model served", None, out.ModelList, ("401",)),
        Endpoint("post", "/chat/reset", "Reset the chat (and the statistics)", None, NULL),
        Endpoint("get", "/chat/reset", "Reset the chat (and the statistics)", None, NULL),
        Endpoint("get", "/stats", "Prefill and decode speed", None, stats),
        Endpoint("get", "/verbose_stats",
                 "Prefill and decode speed, total tokens and total time", None, verbose),
        Endpoint("get", "/health", "200 while an engine serves; 503 while loading or when none can",
                 None, out.Health, ("503",)),
        Endpoint("get", "/metrics", "Prometheus metrics", None, TEXT, (),
                 media_type="text/plain"),
        Endpoint("post", "/tokenize", "Text (or chat messages) to token ids",
                 schemas.TokenizeRequest, out.Tokens, ("400", "401", "413")),
        Endpoint("post", "/detokenize", "Token ids to text",
                 schemas.DetokenizeRequest, out.Text, ("400", "401", "413")),
    ]  # fmt: skip


SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>
"""


def _schema(model: type[BaseModel] | dict[str, Any]) -> dict[str, Any]:
    return model if isinstance(model, dict) else {"$ref": REF.format(model=model.__name__)}


def _responses(endpoint: Endpoint) -> dict[str, Any]:
    content = {endpoint.media_type: {"schema": _schema(endpoint.reply)}}
    description = "OK"
    if endpoint.stream is not None:
        content["text/event-stream"] = {"schema": _schema(endpoint.stream)}
        description = "OK: the whole reply, or with `stream: true` its events (SSE)"
    error = {"application/json": {"schema": _schema(out.ErrorResponse)}}
    responses: dict[str, Any] = {"200": {"description": description, "content": content}}
    for status in endpoint.errors:
        responses[status] = {"description": ERRORS[status], "content": error}
    responses["default"] = {"description": "An OpenAI-style error", "content": error}
    return responses


def _openapi_30(node: Any) -> Any:
    """Pydantic's JSON Schema (2020-12) in OpenAPI 3.0's dialect: `nullable` for a union with
    null, `enum` for `const`, and exclusive bounds as flags on `minimum` / `maximum`."""
    if isinstance(node, list):
        return [_openapi_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _openapi_30(value) for key, value in node.items()}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(node.get(flag), float | int) and not isinstance(node[flag], bool):
            node[bound], node[flag] = node[flag], True
    options = node.get("anyOf", [])
    if {"type": "null"} in options:
        rest = [option for option in options if option != {"type": "null"}]
        del node["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            node.update(rest[0])
        else:
            node["anyOf"] = rest
        node["nullable"] = True
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
    return node


def openapi_spec(title: str, api_style: str = "openai") -> dict[str, Any]:
    routes = endpoints(api_style)
    # Errors, and the chunks a stream's events carry, beside what the routes name.
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (out.ErrorResponse, "serialization"),
        (out.ChatCompletionChunk, "serialization"),
    ]
    for endpoint in routes:
        if endpoint.request is not None:
            models.append((endpoint.request, "validation"))
        for reply in (endpoint.reply, endpoint.stream):
            if isinstance(reply, type):
                models.append((reply, "serialization"))
    _, definitions = models_json_schema(models, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in routes:
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "responses": _responses(endpoint),
        }
        if endpoint.request is not None:
            body: dict[str, Any] = {"schema": _schema(endpoint.request)}
            if endpoint.path in EXAMPLES:
                examples = copy.deepcopy(EXAMPLES[endpoint.path])
                body["examples"] = {name: {"value": value} for name, value in examples.items()}
            operation["requestBody"] = {"required": True, "content": {"application/json": body}}
        paths.setdefault(endpoint.path, {})[endpoint.method] = operation
    return {
        "openapi": "3.0.3",  # what the bundled Swagger UI 4 renders
        "info": {"title": title, "version": "1"},
        "paths": paths,
        "components": {"schemas": _openapi_30(definitions.get("$defs", {}))},
    }


class OpenAPI:
    def __init__(self, title: str, api_style: str):
        self.spec = openapi_spec(title, api_style)

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
