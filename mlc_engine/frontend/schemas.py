"""Request bodies of the HTTP API as pydantic models: they validate input (errors name the field)
and give the JSON schemas behind /openapi.json.

As OpenAI does, a field sent as `null` gets its default. A field this server does not implement
(`tools`, say) is refused with a 400 naming it, rather than dropped: a client relying on it would
otherwise get an answer that silently ignores what it asked for. A few fields that change nothing
about the answer (`store`, `metadata`, `service_tier`) are accepted and ignored. Every integer is
bounded, and no string may hold a lone UTF-16 surrogate (JSON's "\\ud800"), which no tokenizer
can encode.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]  # token counts, token ids, top_k
MAX_PROMPTS = 64  # prompts in one /v1/completions call
# The least top_p and repetition_penalty: the engine samples in float32, where far smaller values
# round to 0 or overflow the logits; a top_p this small keeps only the most likely token already.
LEAST_FACTOR = 1e-6


def _default(neutral: str) -> str:
    return f"Default: the model's recommendation, else {neutral}."


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    IGNORED: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_unknowns(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = {key: value for key, value in data.items() if value is not None}
        known = {field.alias or name for name, field in cls.model_fields.items()}
        for key in given:
            if key not in known and key not in cls.IGNORED:
                raise ValueError(f"{key}: this server does not support this field")
        for key, value in given.items():
            _check_text(value, key)
        return {key: value for key, value in given.items() if key not in cls.IGNORED}


def _check_text(value: Any, path: str) -> None:
    """ValueError naming `path` if a string in `value` cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"{path}: the text holds a lone UTF-16 surrogate") from None
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_text(item, f"{path}.{index}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path)
            _check_text(item, f"{path}.{key}")


class TextPart(Body):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]


class FunctionCall(Body):
    name: FunctionName
    arguments: str = Field(description="The arguments as a JSON object, in a string.")


class ToolCall(Body):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's calls.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaFormat(Body):
    """OpenAI's `response_format.json_schema`."""

    name: str = Field("response", max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = Field(None, description="Accepted: the schema is always enforced.")


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema: give it exactly when type is json_schema")
        return self


class StructuredOutputs(Body):
    """Beyond OpenAI, as vLLM names it: constrain the output by one of these."""

    json_schema: dict[str, Any] | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = Field(None, description="A regular expression (Rust regex syntax).")
    grammar: str | None = Field(None, description="A Lark grammar (llguidance's) or a GBNF one.")
    choice: list[str] | None = Field(None, min_length=1, description="One of these strings.")

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [self.json_schema, self.regex, self.grammar, self.choice]
        if sum(item is not None for item in given) != 1:
            raise ValueError("structured_outputs: give exactly one of json, regex, grammar, choice")
        return self


class SamplingFields(Body):
    """Fields chat and completions share."""

    IGNORED = frozenset({"store", "metadata", "service_tier"})

    model: str | None = Field(None, description="Accepted and ignored: one model is served.")
    # Left out or null: the model's recommendation (mlc-chat-config.json's `sampling`).
    temperature: float | None = Field(None, ge=0.0, le=2.0, description=_default("1.0; 0: greedy"))
    top_p: float | None = Field(None, ge=LEAST_FACTOR, le=1.0, description=_default("1.0"))
    top_k: Count | None = Field(None, description=_default("0: no top-k filtering"))
    min_p: Probability | None = Field(None, description=_default("0.0"))
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    seed: Int64 | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: float | None = Field(
        None, ge=LEAST_FACTOR, le=10.0, description=_default("1.0")
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingFields:
        formatted = self.response_format is not None and self.response_format.type != "text"
        if formatted and self.structured_outputs is not None:
            raise ValueError("structured_outputs: not together with a response_format")
        return self

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]

    @model_validator(mode="after")
    def _check_stop(self) -> SamplingFields:
        if len(self.stop_strings()) > 4:
            raise ValueError("stop: at most 4 stop strings")
        return self


class FunctionDefinition(Body):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="A JSON schema of the arguments object.",
    )
    strict: bool | None = Field(None, description="Accepted: arguments always follow the schema.")


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Body):
    name: FunctionName


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto when tools are given, else none."
    )
    parallel_tool_calls: bool = True
    max_tokens: Count | None = Field(None, ge=1)
    max_completion_tokens: Count | None = Field(None, ge=1)
    max_gen_len: Count | None = Field(None, ge=1, description="MLC-Chat 2023: max_tokens.")
    mean_gen_len: Count | None = Field(None, description="MLC-Chat 2023: accepted and ignored.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens or self.max_gen_len

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {choice.function.name!r}")
        if choice == "required" and not names:
            raise ValueError("tool_choice: required needs tools")
        calls = bool(self.called_tools())
        if calls and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: not together with tool calls")
        if calls and self.structured_outputs is not None:
            raise ValueError("structured_outputs: not together with tool calls")
        return self

    def called_tools(self) -> list[Tool]:
        """The tools the model may call (none with tool_choice none)."""
        return [] if self.tool_choice == "none" else list(self.tools or [])


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"Text, texts, token ids, or lists of token ids ({MAX_PROMPTS} at most)."
    )
    max_tokens: Count = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None

    def token_limit(self) -> int | None:
        return self.max_tokens

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        several = isinstance(self.prompt, list) and isinstance(self.prompt[0], str | list)
        if several and len(self.prompt) > MAX_PROMPTS:
            raise ValueError(f"prompt: at most {MAX_PROMPTS} prompts in one request")
        if self.suffix:
            raise ValueError("suffix: not supported")
        return self


class TokenizeRequest(Body):
    model: str | None = Field(None, description="Accepted and ignored: one model is served.")
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_of(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give either prompt or messages")
        return self


class DetokenizeRequest(Body):
    model: str | None = Field(None, description="Accepted and ignored: one model is served.")
    tokens: list[Count]
