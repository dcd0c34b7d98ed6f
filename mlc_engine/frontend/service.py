"""What every route shares: the engines, the tokenizer and chat template, the metrics, and the
steps that turn an API request into engine requests (prompts, sampling parameters, limits)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, TypeVar

import falcon.asgi
import pydantic

from mlc_engine.common.config import SAMPLING_FIELDS, ModelConfig
from mlc_engine.common.protocol import SamplingParams
from mlc_engine.frontend.engines import EnginePool
from mlc_engine.frontend.errors import BadRequestError, PayloadTooLargeError
from mlc_engine.frontend.generation import Generation
from mlc_engine.frontend.metrics import Metrics
from mlc_engine.frontend.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Tool,
)
from mlc_engine.frontend.settings import ServeSettings
from mlc_engine.frontend.structured import request_grammar
from mlc_engine.frontend.text import ChatTemplate, ChatTemplateError, Tokenizer
from mlc_engine.frontend.tool_parser import ToolCallParser
from mlc_engine.frontend.tools import (
    parser_for,
    prompt_messages,
    template_takes_tools,
    tool_grammar,
)

Body = TypeVar("Body", bound=pydantic.BaseModel)
# MLC-Chat's 2023 server capped replies at its config's max_gen_len, 512 by default.
MLC_CHAT_MAX_GEN_LEN = 512


class Service:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        folder = Path(settings.model_folder)
        self.config = ModelConfig.load(folder)
        self.tokenizer = Tokenizer.from_folder(folder, self.config)
        self.template = ChatTemplate.from_config(self.config, self.tokenizer)
        self.template_takes_tools = template_takes_tools(self.template.source)
        self.tool_parser = settings.tool_call_parser or parser_for(self.template.source)
        self.engines = EnginePool(
            settings.engines,
            settings.max_queue,
            Path(settings.engine_table) if settings.engine_table else None,
            Path(settings.frontend_keys) if settings.frontend_keys else None,
        )
        self.metrics = Metrics(self.engines.snapshots, self.engines.states)
        self.model_name = settings.model_name

    async def read(self, req: falcon.asgi.Request, model: type[Body]) -> Body:
        """The JSON body as `model`: 413 when too large, 400 naming the field when invalid."""
        limit = self.settings.max_body_bytes
        if (req.content_length or 0) > limit:
            raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
        raw = await req.stream.read(limit + 1)
        if len(raw) > limit:
            raise PayloadTooLargeError(f"the request body is larger than {limit} bytes")
        try:
            data = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequestError(f"the body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise BadRequestError("the body must be a JSON object")
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as error:
            raise _bad_field(error) from None

    def chat_prompt(
        self, messages: list[ChatMessage], tools: list[Tool] | None = None
    ) -> list[int]:
        """The prompt of a conversation, with the tools the model may call."""
        rendered, tools_variable = prompt_messages(
            messages, tools or [], self.template_takes_tools, self.tool_parser
        )
        try:
            return self.tokenizer.encode(self.template.render(rendered, tools=tools_variable))
        except ChatTemplateError as error:
            raise BadRequestError(str(error), param="messages") from None

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif all(isinstance(item, str) for item in prompt):
            prompts = [self.tokenizer.encode(str(item)) for item in prompt]
        elif all(isinstance(item, int) for item in prompt):
            prompts = [[int(item) for item in prompt]]  # type: ignore[arg-type]
        else:
            prompts = [list(item) for item in prompt]  # type: ignore[arg-type]
        vocab = self.config.vocab_size
        for ids in prompts:
            if not ids:
                raise BadRequestError("prompt: must not be empty", param="prompt")
            if min(ids) < 0 or max(ids) >= vocab:
                raise BadRequestError(f"prompt: token ids must be in [0, {vocab})", "prompt")
        return prompts

    def sampling_params(
        self,
        request: ChatCompletionRequest | CompletionRequest,
        prompts: list[list[int]],
        logprobs: bool,
        top_logprobs: int,
    ) -> SamplingParams:
        window = self.engines.info.context_window
        longest = max(len(prompt) for prompt in prompts)
        if longest >= window:
            field = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
            raise BadRequestError(
                f"{field}: the prompt has {longest} tokens; the model's context window is "
                f"{window} tokens, with room needed for the answer",
                param=field,
                code="context_length_exceeded",
            )
        limit = request.token_limit()
        if limit is not None and longest + limit > window:
            raise BadRequestError(
                f"max_tokens: the prompt ({longest} tokens) plus max_tokens ({limit}) exceed "
                f"the model's context window of {window} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if limit is None and self.settings.api_style == "mlc-chat":
            limit = min(MLC_CHAT_MAX_GEN_LEN, window - longest)
        params = SamplingParams(
            max_tokens=window - longest if limit is None else limit,
            **self._sampling(request),
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            logit_bias=self._logit_bias(request.logit_bias),
            seed=request.seed,
            n=request.n,
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            grammar=self._grammar(request),
        )
        try:
            params.check(self.config.vocab_size)
        except ValueError as error:
            raise BadRequestError(str(error), param=str(error).split()[0]) from None
        return params

    def capabilities(self) -> dict[str, Any]:
        """What /v1/models says the served model can do beyond plain text."""
        return {
            "response_format": ["text", "json_object", "json_schema"],
            "structured_outputs": ["json", "regex", "grammar", "choice"],
            "tools": True,
            "tool_call_parser": self.tool_parser,
            "chat_template_takes_tools": self.template_takes_tools,
        }

    def sampling_defaults(self) -> dict[str, float]:
        """What a request that leaves out a sampling field gets: the model's recommendation,
        else the engine's neutral value."""
        neutral = SamplingParams()
        return {name: getattr(neutral, name) for name in SAMPLING_FIELDS} | self.config.sampling

    def _grammar(self, request: ChatCompletionRequest | CompletionRequest) -> str | None:
        if isinstance(request, ChatCompletionRequest) and request.called_tools():
            return tool_grammar(request, self.tool_parser)
        return request_grammar(request)

    def tool_call_parser(self, request: ChatCompletionRequest) -> ToolCallParser | None:
        """A parser of one choice's tool calls, when the request offers tools."""
        tools = request.called_tools()
        if not tools:
            return None
        return ToolCallParser(self.tool_parser, {tool.function.name for tool in tools})

    def _sampling(self, request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        """The request's temperature, top_p, top_k, min_p and repetition_penalty; the model's
        recommendation for each it leaves out (SamplingParams' neutral value if it has none)."""
        given = {name: getattr(request, name) for name in SAMPLING_FIELDS}
        return {**self.config.sampling, **{k: v for k, v in given.items() if v is not None}}

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        try:
            return {int(token): value for token, value in (bias or {}).items()}
        except ValueError:
            raise BadRequestError("logit_bias: keys must be token ids", "logit_bias") from None

    def start(
        self, prompts: list[list[int]], params: SamplingParams, stops: list[str]
    ) -> Generation:
        """Route to an engine (429 / 503 when none can take it); runs once iterated."""
        sequences = len(prompts) * params.n
        client = self.engines.pick(sequences)
        self.metrics.prompt(sum(len(prompt) for prompt in prompts))
        return Generation(
            client,
            self.tokenizer,
            uuid.uuid4().hex,
            prompts,
            params,
            stops,
            self.metrics,
            reroute=lambda: self.engines.pick(sequences),
        )

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _bad_field(error: pydantic.ValidationError) -> BadRequestError:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if not location and ":" in message:
        location = message.split(":")[0]
    text = message if message.startswith(location) else f"{location}: {message}"
    return BadRequestError(text, param=location or None)
