"""GET /, the chat page: HTML, CSS and JavaScript shipped in this package (`chat/`), no build
step and nothing from the network. The page talks to the OpenAI routes from the browser; it is
served without the API key, and asks for the key when the routes answer 401."""

from __future__ import annotations

from pathlib import Path

import falcon
import falcon.asgi

STATIC_PREFIX = "/static"
# Only this origin's own files run, so text that slipped into the markup could not run script.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def static_folder() -> Path:
    return Path(__file__).with_name("chat")


class ChatPage:
    def __init__(self) -> None:
        self.page = (static_folder() / "index.html").read_bytes()

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.set_header("Content-Security-Policy", POLICY)
        resp.data = self.page
