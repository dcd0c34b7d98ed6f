"""Response bodies of the HTTP API as pydantic models: the JSON schemas behind /openapi.json's
responses. The routes build their bodies as plain dicts (see responses.py and the routes); the
fuzz test in tests/frontend/test_fuzz.py checks every body it gets against these models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mlc_engine.common.protocol import StatsSnapshot

FinishReason = Literal["stop", "length", "tool_calls"]


class Reply(BaseModel):
    """A body holds the fields documented and no others."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Reply):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, server_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="context_length_exceeded, queue_full, ...")


class ErrorResponse(Reply):
    """Every status but 200, and the last event of a stream that fails after it started."""

    error: ErrorDetail


class PromptTokensDetails(Reply):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")


class Usage(Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class _Head(Reply):
    id: str
    created: int = Field(description="Unix time, in seconds.")
    model: str


class TopLogprob(Reply):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's text as UTF-8 bytes.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Reply):
    content: list[TokenLogprob]


class CalledFunction(Reply):
    name: str
    arguments: str = Field(description="The arguments as a JSON object, in a string.")


class ToolCall(Reply):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(Reply):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is only tool calls.")
    tool_calls: list[ToolCall] | None = None


class FunctionDelta(Reply):
    name: str | None = None
    arguments: str


class ToolCallDelta(Reply):
    """A call's first delta has its id, type and name; the next its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatChoice(Reply):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Head):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Reply):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Reply):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Head):
    """One event of a streamed chat completion; with stream_options.include_usage, every chunk
    has `usage` null but the last, which has no choices and the usage."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Reply):
    """OpenAI's legacy shape; with echo, the prompt's first token has no logprob."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Reply):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None = Field(description="null only in a stream's chunks.")


class Completion(_Head):
    """A whole text completion, and each event of a streamed one (with `usage` as in chat)."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None


class StreamEvent(Reply):
    """One server-sent event: `data` is a ChatCompletionChunk or Completion as JSON, an
    ErrorResponse if the stream fails after it started, or `[DONE]` at the end."""

    data: str
    event: Literal["message"] = Field("message", description="SSE's default: never sent.")


class Capabilities(Reply):
    """What the served model can do beyond plain text."""

    response_format: list[str]
    structured_outputs: list[str]
    tools: bool
    tool_call_parser: str = Field(description="hermes or llama3_json")
    chat_template_takes_tools: bool


class SamplingDefaults(Reply):
    """What a request that leaves a sampling field out (or sends null) gets: the model's
    recommendation (`sampling` in mlc-chat-config.json), else the neutral value."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float


class Model(Reply):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    capabilities: Capabilities
    max_model_len: int = Field(description="The context window: prompt and answer, in tokens.")
    sampling: SamplingDefaults


class ModelList(Reply):
    object: Literal["list"]
    data: list[Model]


class Stats(Reply):
    prefill_tokens_per_second: float
    decode_tokens_per_second: float


class VerboseStats(Stats):
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    engines: list[StatsSnapshot]


class Health(Reply):
    status: Literal["ok"]


class Tokens(Reply):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="The model's context window, in tokens.")


class Text(Reply):
    prompt: str
