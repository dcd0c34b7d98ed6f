"""The routes beside the completions: MLC-Chat's /chat/reset, /stats and /verbose_stats, and
/v1/models, /health, /metrics, /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi

from mlc_engine.common.protocol import StatsSnapshot
from mlc_engine.frontend.errors import BadRequestError, UnavailableError
from mlc_engine.frontend.schemas import DetokenizeRequest, TokenizeRequest
from mlc_engine.frontend.service import Service


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _totals(snapshots: list[StatsSnapshot]) -> dict[str, Any]:
    prefill_tokens = sum(s.prefill_tokens for s in snapshots)
    prefill_seconds = sum(s.prefill_seconds for s in snapshots)
    decode_tokens = sum(s.decode_tokens for s in snapshots)
    decode_seconds = sum(s.decode_seconds for s in snapshots)
    return {
        "prefill_tokens_per_second": _rate(prefill_tokens, prefill_seconds),
        "decode_tokens_per_second": _rate(decode_tokens, decode_seconds),
        "prefill_tokens": prefill_tokens,
        "prefill_seconds": prefill_seconds,
        "decode_tokens": decode_tokens,
        "decode_seconds": decode_seconds,
    }


class Stats:
    """MLC-Chat style: one line of text (a JSON string); OpenAI style: an object."""

    def __init__(self, service: Service, verbose: bool):
        self.service = service
        self.verbose = verbose

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        snapshots = await self.service.engines.fetch_stats()
        totals = _totals(snapshots)
        if self.service.settings.api_style == "mlc-chat":
            resp.media = self._text(totals)
        elif self.verbose:
            resp.media = {**totals, "engines": [vars(s) for s in snapshots]}
        else:
            resp.media = {key: totals[key] for key in list(totals)[:2]}

    def _text(self, totals: dict[str, Any]) -> str:
        prefill, decode = totals["prefill_tokens_per_second"], totals["decode_tokens_per_second"]
        if not self.verbose:
            return f"prefill: {prefill:.1f} tok/s, decode: {decode:.1f} tok/s"
        return (
            "----------- prefill -----------\n"
            f"throughput: {prefill:.1f} tok/s\n"
            f"total tokens: {totals['prefill_tokens']} tok\n"
            f"total time: {totals['prefill_seconds']:.1f} s\n"
            "------------ decode ------------\n"
            f"throughput: {decode:.1f} tok/s\n"
            f"total tokens: {totals['decode_tokens']} tok\n"
            f"total time: {totals['decode_seconds']:.1f} s\n"
        )


class ChatReset:
    """Zeroes the engines' statistics (no prompt state is kept between requests)."""

    def __init__(self, service: Service):
        self.service = service

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        await self.service.engines.fetch_stats(reset=True)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = "null"  # Falcon would send no body at all for media None

    on_get = on_post


class Models:
    def __init__(self, service: Service):
        self.service = service

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        model = {
            "id": self.service.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "mlc-engine",
            "capabilities": self.service.capabilities(),
            "max_model_len": self.service.config.context_window_size,
            "sampling": self.service.sampling_defaults(),
        }
        resp.media = {"object": "list", "data": [model]}


class Health:
    def __init__(self, service: Service):
        self.service = service

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        problem = self.service.engines.health()
        if problem:
            raise UnavailableError(problem)
        resp.media = {"status": "ok"}


class PrometheusMetrics:
    def __init__(self, service: Service):
        self.service = service

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self.service.metrics.render()


class Tokenize:
    def __init__(self, service: Service):
        self.service = service

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        service = self.service
        body = await service.read(req, TokenizeRequest)
        if body.messages is not None:
            tokens = service.chat_prompt(body.messages)
        else:
            # As the completions endpoint encodes it, or with no special tokens at all.
            add_bos = None if body.add_special_tokens else False
            tokens = service.tokenizer.encode(body.prompt or "", add_bos=add_bos)
        resp.media = {
            "tokens": tokens,
            "count": len(tokens),
            "max_model_len": service.config.context_window_size,
        }


class Detokenize:
    def __init__(self, service: Service):
        self.service = service

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        service = self.service
        body = await service.read(req, DetokenizeRequest)
        vocab = service.config.vocab_size
        if any(token >= vocab for token in body.tokens):
            raise BadRequestError(f"tokens: token ids must be below {vocab}", param="tokens")
        resp.media = {"prompt": service.tokenizer.decode(body.tokens)}
