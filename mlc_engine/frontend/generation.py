"""One API request running in an engine, turned from token ids into text.

A request has one or more prompts (completions take lists) and n choices of each; choice
`prompt_index * n + i` is choice i of that prompt, as OpenAI numbers them. Each prompt is one
engine request. Text comes out of an incremental detokenizer and a stop-string matcher per
choice; once every choice of a prompt has stopped, its engine request is aborted. A stop token
the engine sampled is reported with its logprob and counted in the usage, but has no text (as
vLLM does, so that lm-evaluation-harness reads the spans it expects). Any failure in one of
the request's tasks ends the whole request with that error at once, except one: an engine that
dies before the request has heard anything from it. Nothing has reached the client then, so the
request starts again on another live engine, as if it had been routed there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from mlc_engine.common.client import EngineClient, EngineUnavailableError
from mlc_engine.common.protocol import ErrorCode, SamplingParams, SequenceOutput, TokenLogprob
from mlc_engine.frontend.errors import (
    APIError,
    BadRequestError,
    EngineFailureError,
    QueueFullError,
    UnavailableError,
)
from mlc_engine.frontend.metrics import Metrics
from mlc_engine.frontend.text import IncrementalDetokenizer, Tokenizer
from mlc_engine.frontend.text.stop import StopStringMatcher

log = logging.getLogger(__name__)

# How many times a request that has heard nothing yet follows its engine's death to another;
# each death takes one engine out of the choice, so this only bounds a cluster losing several.
REROUTES = 3


@dataclass
class TokenChoice:
    """A generated (or echoed prompt) token with its logprob and the top alternatives; `text`
    overrides the token's own text (a stop token's is "")."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)
    text: str | None = None


@dataclass
class Delta:
    """New text of one choice; `finish_reason` is set on the choice's last delta."""

    index: int
    text: str
    tokens: list[TokenChoice] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Choice:
    index: int
    prompt_index: int
    detokenizer: IncrementalDetokenizer
    stops: StopStringMatcher
    token_count: int = 0
    finished: bool = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache

    def as_dict(self) -> dict[str, Any]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class Generation:
    """Runs `prompts` x `params.n` choices on `client`; iterate it for `Delta`s."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        stops: list[str],
        metrics: Metrics,
        reroute: Callable[[], EngineClient] | None = None,
    ):
        self.client = client
        self.reroute = reroute  # another live engine for the request (raises an APIError if none)
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.metrics = metrics
        self.usage = Usage(prompt_tokens=sum(len(prompt) for prompt in prompts))
        self.prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
        self.choices = [
            Choice(
                index=p * params.n + i,
                prompt_index=p,
                detokenizer=IncrementalDetokenizer(tokenizer, prompt),
                stops=StopStringMatcher(stops),
            )
            for p, prompt in enumerate(prompts)
            for i in range(params.n)
        ]
        # Each prompt's outputs, then None when it is done or the error that ended it.
        self._queue: asyncio.Queue[tuple[int, SequenceOutput | APIError | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._start = time.monotonic()
        self._last_token: float | None = None
        self._heard = False  # any output of the request accepted: it can no longer move
        self._reroutes = REROUTES if reroute is not None else 0

    def _engine_id(self, prompt_index: int) -> str:
        return f"{self.request_id}-{prompt_index}"

    async def _pump(self, prompt_index: int) -> None:
        stream = self.client.generate(
            self._engine_id(prompt_index), self.prompts[prompt_index], self.params
        )
        end: APIError | None = None
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    self._queue.put_nowait((prompt_index, output))
        except EngineUnavailableError as error:
            end = UnavailableError(str(error))
        except Exception as error:  # whatever it is, the request must end, not wait forever
            log.exception("request %s failed", self.request_id)
            end = EngineFailureError(f"the request failed: {error!r}")
        self._queue.put_nowait((prompt_index, end))

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        """Deltas as the engine produces them; EngineFailureError if the engine fails the
        request. Closing the iterator early aborts what is still running."""
        self._tasks = [asyncio.create_task(self._pump(p)) for p in range(len(self.prompts))]
        done: set[int] = set()
        try:
            while len(done) < len(self.prompts):
                prompt_index, output = await self._queue.get()
                if output is None:
                    done.add(prompt_index)
                    continue
                error = self._error(output) if isinstance(output, SequenceOutput) else output
                if isinstance(error, UnavailableError) and self._movable():
                    log.warning("request %s: %s; starting it again", self.request_id, error)
                    await self._move()
                    continue
                if error is not None:
                    raise error
                assert isinstance(output, SequenceOutput)
                delta = self._accept(prompt_index, output)
                if delta is not None:
                    yield delta
                if self._prompt_done(prompt_index):
                    self._tasks[prompt_index].cancel()  # aborts what still runs in the engine
                    done.add(prompt_index)
        finally:
            await self._stop_tasks()

    def _movable(self) -> bool:
        return not self._heard and self._reroutes > 0 and self.client.dead is not None

    async def _move(self) -> None:
        """Start the whole request again on another engine (none of it was heard yet)."""
        assert self.reroute is not None
        await self._stop_tasks()
        self._reroutes -= 1
        self.client = self.reroute()
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(p)) for p in range(len(self.prompts))]

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _error(self, output: SequenceOutput) -> APIError | None:
        """The error that `output` ends the request with, if any."""
        if output.finish_reason != "error":
            return None
        message = output.error or "the engine failed the request"
        if output.error_code == ErrorCode.QUEUE_FULL:
            return QueueFullError(message)
        if output.error_code == ErrorCode.INVALID_REQUEST:
            return BadRequestError(message)
        if self.client.dead is not None:
            return UnavailableError(message)
        return EngineFailureError(message)

    def _prompt_done(self, prompt_index: int) -> bool:
        mine = [c for c in self.choices if c.prompt_index == prompt_index]
        return all(choice.finished for choice in mine)

    def _accept(self, prompt_index: int, output: SequenceOutput) -> Delta | None:
        self._heard = True
        choice = self.choices[prompt_index * self.params.n + output.index]
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = output.prompt_logprobs
        self.usage.cached_tokens += output.cached_tokens or 0
        if choice.finished:
            return None
        self._observe(output)
        choice.token_count += len(output.token_ids)
        self.usage.completion_tokens += len(output.token_ids)
        reason = output.finish_reason
        # The stop token that ended a choice has no text.
        texts = output.token_ids[:-1] if reason == "stop" else output.token_ids
        text = choice.stops.push(choice.detokenizer.push(texts))
        tokens = _token_choices(output)
        if reason == "stop" and tokens:
            tokens[-1].text = ""
        if choice.stops.stopped:
            reason = "stop"
        elif reason is not None:
            text += choice.stops.push(choice.detokenizer.flush()) + choice.stops.flush()
            reason = "stop" if reason == "abort" else reason
        if reason is not None:
            choice.finished = True
            self.metrics.finished(reason)
        if not text and not tokens and reason is None:
            return None
        return Delta(choice.index, text, tokens, reason)

    def _observe(self, output: SequenceOutput) -> None:
        if not output.token_ids:
            return
        now = time.monotonic()
        if self._last_token is None:
            self.metrics.first_token(now - self._start)
        else:
            self.metrics.token_gap(now - self._last_token)
        self._last_token = now
        self.metrics.generated(len(output.token_ids))


def _token_choices(output: SequenceOutput) -> list[TokenChoice]:
    if not output.logprobs:
        return []
    return [
        TokenChoice(token, logprob.logprob, logprob.top)
        for token, logprob in zip(output.token_ids, output.logprobs, strict=True)
    ]
