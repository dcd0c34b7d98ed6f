"""POST /v1/chat/completions and /v1/completions, streamed (SSE) or not.

A stream waits for the engine's first output before it commits to HTTP 200, so failures
before that are real error statuses; a failure after it is an error event ending the stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import falcon.asgi

from mlc_engine.frontend.disconnect import until_disconnected
from mlc_engine.frontend.errors import APIError
from mlc_engine.frontend.generation import Delta, Generation, Usage
from mlc_engine.frontend.responses import (
    ResponseIds,
    chat_logprobs,
    completion_logprobs,
    mlc_chat_events,
    prompt_token_choices,
    sse,
)
from mlc_engine.frontend.schemas import ChatCompletionRequest, CompletionRequest
from mlc_engine.frontend.service import Service
from mlc_engine.frontend.tool_parser import ParsedCall, ToolCallParser

log = logging.getLogger(__name__)


async def _started(deltas: AsyncGenerator[Delta, None]) -> AsyncGenerator[Delta, None]:
    """`deltas` with its first item already awaited, so errors before it raise here."""
    first = await anext(deltas, None)

    async def chained() -> AsyncGenerator[Delta, None]:
        async with contextlib.aclosing(deltas):
            if first is not None:
                yield first
            async for delta in deltas:
                yield delta

    return chained()


async def _events(
    deltas: AsyncGenerator[Delta, None], render: Any, tail: Any
) -> AsyncIterator[bytes]:
    """SSE bytes: each delta rendered, then the tail; an error becomes an error event."""
    try:
        async for delta in deltas:
            for event in render(delta):
                yield event
        for event in tail():
            yield event
    except APIError as error:
        log.warning("stream ended by an error: %s", error)
        yield sse(error.body())


async def _merged(deltas: AsyncGenerator[Delta, None], count: int) -> list[Delta]:
    """Each choice's deltas joined into one (a reply that is not streamed)."""
    whole = [Delta(index, "", [], "stop") for index in range(count)]
    async for delta in deltas:
        choice = whole[delta.index]
        choice.text += delta.text
        choice.tokens += delta.tokens
        choice.finish_reason = delta.finish_reason or choice.finish_reason
    return whole


def _stream_end(ids: ResponseIds, object_type: str, usage: Usage | None) -> list[bytes]:
    """The usage chunk when asked for, then [DONE]."""
    events = []
    if usage is not None:
        events.append(sse({**ids.head(object_type), "choices": [], "usage": usage.as_dict()}))
    return [*events, sse("[DONE]")]


class _GenerationRoute:
    """What chat completions and completions share: the service, and answering with a stream
    or a whole response rendered by the route's `_stream` / `_whole`."""

    def __init__(self, service: Service):
        self.service = service

    async def _respond(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        generation: Generation,
        body: Any,
        id_prefix: str,
    ) -> None:
        ids = ResponseIds(id_prefix, generation.request_id, self.service.model_name)
        deltas = until_disconnected(generation.deltas(), req.scope)
        if body.stream:
            started = await _started(deltas)
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-cache")
            resp.stream = self._stream(started, generation, ids, body)
        else:
            resp.media = await self._whole(deltas, generation, ids, body)

    def _stream(
        self,
        deltas: AsyncGenerator[Delta, None],
        generation: Generation,
        ids: ResponseIds,
        body: Any,
    ) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def _whole(
        self,
        deltas: AsyncGenerator[Delta, None],
        generation: Generation,
        ids: ResponseIds,
        body: Any,
    ) -> dict[str, Any]:
        raise NotImplementedError


class ChatCompletions(_GenerationRoute):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        service = self.service
        body = await service.read(req, ChatCompletionRequest)
        await service.engines.wait_ready()
        prompt = service.chat_prompt(body.messages, body.called_tools())
        top = body.top_logprobs or 0
        params = service.sampling_params(body, [prompt], body.logprobs, top)
        generation = service.start([prompt], params, body.stop_strings())
        await self._respond(req, resp, generation, body, "chatcmpl")

    def _stream(
        self,
        deltas: AsyncGenerator[Delta, None],
        generation: Generation,
        ids: ResponseIds,
        body: ChatCompletionRequest,
    ) -> AsyncIterator[bytes]:
        service = self.service
        if service.settings.api_style == "mlc-chat":
            return _events(deltas, mlc_chat_events, lambda: [])
        usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if usage else {}

        def chunk(choices: list[dict[str, Any]]) -> bytes:
            return sse({**ids.head("chat.completion.chunk"), "choices": choices, **extra})

        opened: set[int] = set()
        parsers = {i: service.tool_call_parser(body) for i in range(body.n)}

        def render(delta: Delta) -> list[bytes]:
            events = []
            index = delta.index
            if index not in opened:
                opened.add(index)
                role = {"role": "assistant", "content": ""}
                events.append(chunk([{"index": index, "delta": role, "finish_reason": None}]))
            text, calls = _split_calls(parsers[index], delta)
            if text or delta.tokens:
                choice: dict[str, Any] = {
                    "index": index,
                    "delta": {"content": text},
                    "finish_reason": None,
                }
                if body.logprobs:
                    choice["logprobs"] = chat_logprobs(delta.tokens, service.token_text)
                events.append(chunk([choice]))
            for call in calls:  # its id and name, then its arguments
                head = {"index": call.index, "id": call.id, "type": "function"}
                head["function"] = {"name": call.name, "arguments": ""}
                arguments = {"index": call.index, "function": {"arguments": call.arguments}}
                for part in (head, arguments):
                    tool_delta = {"tool_calls": [part]}
                    events.append(
                        chunk([{"index": index, "delta": tool_delta, "finish_reason": None}])
                    )
            if delta.finish_reason:
                reason = _finish_reason(parsers[index], delta.finish_reason)
                events.append(chunk([{"index": index, "delta": {}, "finish_reason": reason}]))
            return events

        def tail() -> list[bytes]:
            return _stream_end(ids, "chat.completion.chunk", generation.usage if usage else None)

        return _events(deltas, render, tail)

    async def _whole(
        self,
        deltas: AsyncGenerator[Delta, None],
        generation: Generation,
        ids: ResponseIds,
        body: ChatCompletionRequest,
    ) -> dict[str, Any]:
        choices = []
        for whole in await _merged(deltas, body.n):
            parser = self.service.tool_call_parser(body)
            text, calls = _split_calls(parser, whole)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["content"] = text or None
                message["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                    for call in calls
                ]
            choice: dict[str, Any] = {
                "index": whole.index,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(parser, whole.finish_reason or "stop"),
            }
            if body.logprobs:
                choice["logprobs"] = chat_logprobs(whole.tokens, self.service.token_text)
            choices.append(choice)
        return {
            **ids.head("chat.completion"),
            "choices": choices,
            "usage": generation.usage.as_dict(),
        }


def _split_calls(parser: ToolCallParser | None, delta: Delta) -> tuple[str, list[ParsedCall]]:
    """A choice's new text as content and the tool calls it completed (all of it is content
    when the request offers no tools)."""
    if parser is None:
        return delta.text, []
    text, calls = parser.push(delta.text)
    if delta.finish_reason:
        rest, more = parser.finish()
        text, calls = text + rest, calls + more
    return text, calls


def _finish_reason(parser: ToolCallParser | None, reason: str) -> str:
    """OpenAI's "tool_calls" for a choice that stopped after calling tools."""
    called = parser is not None and parser.calls
    return "tool_calls" if called and reason == "stop" else reason


class Completions(_GenerationRoute):
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        service = self.service
        body = await service.read(req, CompletionRequest)
        await service.engines.wait_ready()
        prompts = service.completion_prompts(body)
        wants_logprobs = body.logprobs is not None
        params = service.sampling_params(body, prompts, wants_logprobs, body.logprobs or 0)
        params.prompt_logprobs = body.echo and wants_logprobs
        generation = service.start(prompts, params, body.stop_strings())
        await self._respond(req, resp, generation, body, "cmpl")

    def _echo(self, generation: Generation, index: int) -> tuple[str, list]:
        """The prompt's text and tokens (with logprobs when asked) of choice `index`."""
        prompt_index = index // generation.params.n
        prompt = generation.prompts[prompt_index]
        text = self.service.tokenizer.decode(prompt)
        logprobs = generation.prompt_logprobs.get(prompt_index)
        return text, prompt_token_choices(prompt, logprobs)

    def _choice(
        self, body: CompletionRequest, index: int, text: str, tokens: list, offset: int
    ) -> dict[str, Any]:
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(tokens, self.service.token_text, offset)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def _stream(
        self,
        deltas: AsyncGenerator[Delta, None],
        generation: Generation,
        ids: ResponseIds,
        body: CompletionRequest,
    ) -> AsyncIterator[bytes]:
        usage = body.stream_options is not None and body.stream_options.include_usage
        extra = {"usage": None} if usage else {}
        offsets: dict[int, int] = {}

        def render(delta: Delta) -> list[bytes]:
            text, tokens = delta.text, delta.tokens
            if delta.index not in offsets:
                offsets[delta.index] = 0
                if body.echo:
                    echo_text, echo_tokens = self._echo(generation, delta.index)
                    text, tokens = echo_text + text, echo_tokens + tokens
            choice = self._choice(body, delta.index, text, tokens, offsets[delta.index])
            choice["finish_reason"] = delta.finish_reason
            offsets[delta.index] += len(text)
            return [sse({**ids.head("text_completion"), "choices": [choice], **extra})]

        def tail() -> list[bytes]:
            return _stream_end(ids, "text_completion", generation.usage if usage else None)

        return _events(deltas, render, tail)

    async def _whole(
        self,
        deltas: AsyncGenerator[Delta, None],
        generation: Generation,
        ids: ResponseIds,
        body: CompletionRequest,
    ) -> dict[str, Any]:
        choices = []
        for whole in await _merged(deltas, len(generation.choices)):
            text, tokens = whole.text, whole.tokens
            if body.echo:
                echo_text, echo_tokens = self._echo(generation, whole.index)
                text, tokens = echo_text + text, echo_tokens + tokens
            choice = self._choice(body, whole.index, text, tokens, 0)
            choice["finish_reason"] = whole.finish_reason
            choices.append(choice)
        return {
            **ids.head("text_completion"),
            "choices": choices,
            "usage": generation.usage.as_dict(),
        }
