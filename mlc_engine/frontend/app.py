"""The Falcon ASGI app: routes, API key and CORS middleware, errors rendered OpenAI's way, and
the engine handshake started at startup (the port answers, with 503s, while engines load)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import falcon
import falcon.asgi

from mlc_engine.frontend import chat_page, docs, openai_routes, routes
from mlc_engine.frontend.disconnect import ASGIApp, track_receive
from mlc_engine.frontend.errors import APIError, UnauthorizedError
from mlc_engine.frontend.service import Service
from mlc_engine.frontend.settings import ServeSettings

log = logging.getLogger("mlc_engine.serve")
OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", f"{chat_page.STATIC_PREFIX}/")


class APIKey:
    """Every route but health, metrics, docs and the chat page (which asks for the key) needs
    `Authorization: Bearer <key>`."""

    def __init__(self, key: str):
        self.expected = f"Bearer {key}"

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if req.method == "OPTIONS" or req.path == "/" or req.path.startswith(OPEN_PATHS):
            return
        if req.get_header("Authorization") != self.expected:
            raise UnauthorizedError("a valid API key is needed: Authorization: Bearer <key>")


class Lifespan:
    """Connects to the engines in the background at startup; closes the clients at shutdown."""

    def __init__(self, service: Service):
        self.service = service
        self.task: asyncio.Task[None] | None = None

    async def process_startup(self, scope: Any, event: Any) -> None:
        self.task = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        await self.service.engines.connect()
        if self.service.engines.ready:
            settings = self.service.settings
            log.info("ready: %s serving %s", settings.url, settings.model_name)
            print(f"mlc-engine: ready at {settings.url} ({settings.model_name})", flush=True)

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.service.engines.close()


async def _render_api_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: APIError, params: Any
) -> None:
    resp.status = falcon.code_to_http_status(error.status)
    resp.media = error.body()
    for name, value in error.headers.items():
        resp.set_header(name, value)


async def _render_http_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: falcon.HTTPError, params: Any
) -> None:
    """Falcon's own errors (404, 405, ...) in the same shape as ours."""
    resp.status = error.status
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = error.title if not error.description else f"{error.title}: {error.description}"
    resp.media = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    for name, value in dict(error.headers or {}).items():
        resp.set_header(name, value)


async def _render_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: Any
) -> None:
    log.exception("unexpected error in %s %s", req.method, req.path)
    await _render_api_error(req, resp, APIError(f"internal error: {error}"), params)


def create_app(settings: ServeSettings) -> ASGIApp:
    service = Service(settings)
    middleware: list[Any] = [Lifespan(service)]
    if settings.api_key:
        middleware.append(APIKey(settings.api_key))
    if settings.allowed_origins:
        middleware.append(falcon.CORSMiddleware(allow_origins=settings.allowed_origins))
    app = falcon.asgi.App(middleware=middleware)
    app.add_error_handler(Exception, _render_unexpected)
    app.add_error_handler(falcon.HTTPError, _render_http_error)
    app.add_error_handler(APIError, _render_api_error)
    app.add_route("/v1/chat/completions", openai_routes.ChatCompletions(service))
    app.add_route("/v1/completions", openai_routes.Completions(service))
    app.add_route("/v1/models", routes.Models(service))
    app.add_route("/chat/reset", routes.ChatReset(service))
    app.add_route("/stats", routes.Stats(service, verbose=False))
    app.add_route("/verbose_stats", routes.Stats(service, verbose=True))
    app.add_route("/health", routes.Health(service))
    app.add_route("/metrics", routes.PrometheusMetrics(service))
    app.add_route("/tokenize", routes.Tokenize(service))
    app.add_route("/detokenize", routes.Detokenize(service))
    title = f"mlc-engine: {settings.model_name}"
    app.add_route("/openapi.json", docs.OpenAPI(title, settings.api_style))
    app.add_route("/docs", docs.SwaggerUI(title))
    app.add_static_route("/docs/static", str(docs.static_folder()))
    app.add_route("/", chat_page.ChatPage())
    app.add_static_route(chat_page.STATIC_PREFIX, str(chat_page.static_folder()))
    return track_receive(app)


def create_app_from_env() -> ASGIApp:
    """The app for a uvicorn worker: `mlc-engine serve` leaves its settings in the environment."""
    return create_app(ServeSettings.from_env())
